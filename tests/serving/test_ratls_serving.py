"""A client verifies the model server's attestation, then pins its certificate (RA-TLS serving).

The server runs with a simulated TEE: its certificate carries evidence bound to its TLS key.
The client checks that evidence against a policy over a real handshake, then makes the
certificate the only trust root of the real gRPC / HTTPS channel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from enclaveml.attestation.policy import Policy, PolicyViolation
from enclaveml.attestation.ratls import extract_evidence
from enclaveml.attestation.sim import SimulationKey
from enclaveml.attestation.tee import SimulatedTee
from enclaveml.errors import AttestationError, ConfigError
from enclaveml.serving.certs import create_ca, issue_client_certificate, issue_server_certificate
from enclaveml.serving.ratls import (
    evidence_verifier,
    fetch_verified_server_certificate,
    pinned_channel_options,
    ratls_server_tls,
    verify_server_certificate,
)
from enclaveml.serving.tls import (
    ServerTls,
    channel_credentials,
    client_ssl_context,
    grpc_server_credentials,
    uvicorn_ssl_options,
)

NOW = datetime.now(UTC)
MEASUREMENT = bytes.fromhex("5e" * 48)  # the simulated workload's SHA-384 measurement
SIM_KEY = SimulationKey.generate()
DEV_POLICY = Policy(name="serving-dev", allow_simulation=True, mr_enclave=(MEASUREMENT,))


def simulated_tee(measurement: bytes = MEASUREMENT, key: SimulationKey = SIM_KEY) -> SimulatedTee:
    return SimulatedTee(key, measurement, b"", clock=lambda: NOW)


@contextlib.contextmanager
def grpc_echo_server(tls: ServerTls, port: int = 0) -> Iterator[int]:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_secure_port(f"127.0.0.1:{port}", grpc_server_credentials(tls))
    assert bound != 0, "could not bind"
    server.start()
    try:
        yield bound
    finally:
        server.stop(grace=None).wait(timeout=5)


def pinned_call(channel: grpc.Channel) -> bytes:
    answer: bytes = channel.unary_unary("/test.Echo/Echo")(b"hello", timeout=5)
    return answer


@pytest.fixture(scope="module")
def server_tls() -> ServerTls:
    return ratls_server_tls(simulated_tee(), now=NOW, names=["serving.example.com"])


@pytest.fixture(scope="module")
def port(server_tls: ServerTls) -> Iterator[int]:
    with grpc_echo_server(server_tls) as bound:
        yield bound


# -- the server's certificate ----------------------------------------------------------------


def test_the_server_certificate_carries_evidence_bound_to_its_key_and_its_names(server_tls: ServerTls) -> None:
    cert = server_tls.certificate
    extracted = extract_evidence(cert)

    assert extracted.key_binding_ok
    assert extracted.evidence.kind == "sim"
    assert cert.subject.rfc4514_string() == "CN=serving.example.com"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["serving.example.com", "localhost"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert not server_tls.mutual


def test_names_are_checked_and_given_once() -> None:
    tls = ratls_server_tls(simulated_tee(), now=NOW, names=["IP:10.0.0.7", "DNS:serving.internal", "127.0.0.1"])
    sans = tls.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert tls.certificate.subject.rfc4514_string() == "CN=10.0.0.7"
    assert sans.get_values_for_type(x509.DNSName) == ["serving.internal", "localhost"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "127.0.0.1", "::1"]
    with pytest.raises(ConfigError, match="is not a valid DNS name"):
        ratls_server_tls(simulated_tee(), now=NOW, names=["not a host"])


# -- verify, then pin ------------------------------------------------------------------------


def test_a_verified_and_pinned_server_answers(port: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="enclaveml.attestation"):
        pem = fetch_verified_server_certificate("127.0.0.1", port, DEV_POLICY, now=NOW)

    assert any("INSECURE" in r.getMessage() for r in caplog.records)  # simulation is always logged
    credentials = channel_credentials(ca=None, crt=pem, key=None)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        assert pinned_call(channel) == b"echo:hello"


def test_the_verified_claims_are_the_workloads(server_tls: ServerTls) -> None:
    claims = verify_server_certificate(server_tls.cert_pem, DEV_POLICY, now=NOW)
    assert claims.mr_enclave == MEASUREMENT
    assert claims.insecure


def test_a_different_measurement_is_refused_by_the_policy(port: int) -> None:
    policy = Policy(name="serving-dev", allow_simulation=True, mr_enclave=(bytes(48),))
    with pytest.raises(PolicyViolation, match=r"MR_ENCLAVE 5e5e.* is not allowed by policy serving-dev"):
        fetch_verified_server_certificate("127.0.0.1", port, policy, now=NOW)


def test_simulated_evidence_is_refused_by_a_policy_without_allow_simulation(port: int) -> None:
    production = Policy(name="serving-prod", mr_enclave=(MEASUREMENT,))
    with pytest.raises(PolicyViolation, match="TEE sim is not allowed by policy serving-prod") as raised:
        fetch_verified_server_certificate("127.0.0.1", port, production, now=NOW)
    assert "allow_simulation" in raised.value.hint


def test_simulated_evidence_from_an_untrusted_key_is_refused(port: int) -> None:
    verifier = evidence_verifier(sim_trusted_keys=[SimulationKey.generate().public_key])
    with pytest.raises(AttestationError, match="is not trusted") as raised:
        fetch_verified_server_certificate("127.0.0.1", port, DEV_POLICY, now=NOW, verifier=verifier)
    assert raised.value.reason == "sim_key_untrusted"


def test_the_trusted_simulation_key_is_accepted(port: int) -> None:
    verifier = evidence_verifier(sim_trusted_keys=[SIM_KEY.public_key])
    pem = fetch_verified_server_certificate("127.0.0.1", port, DEV_POLICY, now=NOW, verifier=verifier)
    assert x509.load_pem_x509_certificate(pem).subject.rfc4514_string() == "CN=serving.example.com"


def test_a_server_that_swaps_its_certificate_after_the_pin_fails_the_handshake() -> None:
    original = ratls_server_tls(simulated_tee(), now=NOW)
    with grpc_echo_server(original) as bound:
        pem = fetch_verified_server_certificate("127.0.0.1", bound, DEV_POLICY, now=NOW)
    # Same address, a new key: even a genuine replica's fresh certificate is not the pinned one.
    replacement = ratls_server_tls(simulated_tee(), now=NOW)
    with (
        grpc_echo_server(replacement, port=bound),
        grpc.secure_channel(f"127.0.0.1:{bound}", channel_credentials(ca=None, crt=pem, key=None)) as channel,
    ):
        with pytest.raises(grpc.RpcError) as raised:
            pinned_call(channel)
        error: Any = raised.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "CERTIFICATE_VERIFY_FAILED" in error.details()
        # verifying again pins the new certificate
        fresh = fetch_verified_server_certificate("127.0.0.1", bound, DEV_POLICY, now=NOW)
        with grpc.secure_channel(f"127.0.0.1:{bound}", channel_credentials(ca=None, crt=fresh, key=None)) as again:
            assert pinned_call(again) == b"echo:hello"


def test_an_expired_ratls_certificate_is_refused() -> None:
    long_ago = NOW - timedelta(days=100)
    old = ratls_server_tls(simulated_tee(), now=long_ago, validity=timedelta(days=90))
    with grpc_echo_server(old) as bound, pytest.raises(AttestationError, match="RA-TLS certificate expired") as raised:
        fetch_verified_server_certificate("127.0.0.1", bound, DEV_POLICY, now=NOW)
    assert raised.value.reason == "ratls_certificate_expired"


def test_a_server_without_evidence_is_refused() -> None:
    ca = create_ca(now=NOW)
    plain = issue_server_certificate(ca, "serving.example.com", now=NOW)
    no_evidence = pytest.raises(AttestationError, match="carries no RA-TLS evidence")
    with grpc_echo_server(ServerTls(plain.cert_pem, plain.key_pem)) as bound, no_evidence as raised:
        fetch_verified_server_certificate("127.0.0.1", bound, DEV_POLICY, now=NOW)
    assert raised.value.reason == "ratls_no_evidence"


def test_an_unreachable_server_is_a_configuration_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match=f"cannot complete a TLS handshake with 127.0.0.1:{free_port}"):
        fetch_verified_server_certificate("127.0.0.1", free_port, DEV_POLICY, now=NOW, timeout=2)


def test_pinned_options_name_a_certificate_host_when_the_address_is_not_in_it(server_tls: ServerTls) -> None:
    assert pinned_channel_options(server_tls.cert_pem, "127.0.0.1") == []
    assert pinned_channel_options(server_tls.cert_pem, "SERVING.example.com") == []
    options = pinned_channel_options(server_tls.cert_pem, "10.1.2.3")
    assert options == [("grpc.ssl_target_name_override", "serving.example.com")]


def test_a_pinned_channel_reached_under_another_name_uses_the_override(port: int, server_tls: ServerTls) -> None:
    pem = fetch_verified_server_certificate("localhost", port, DEV_POLICY, now=NOW)
    options = pinned_channel_options(pem, "pod-7.serving.internal")
    credentials = channel_credentials(ca=None, crt=pem, key=None)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        assert pinned_call(channel) == b"echo:hello"


# -- RA-TLS with mutual TLS, and over REST ---------------------------------------------------


def test_ratls_server_that_also_requires_client_certificates() -> None:
    ca = create_ca(now=NOW)
    client = issue_client_certificate(ca, "analyst", now=NOW)
    tls = ratls_server_tls(simulated_tee(), now=NOW, client_ca_pem=ca.cert_pem)
    with grpc_echo_server(tls) as bound:
        # TLS 1.3 hands the client the server's certificate before the server judges the client's
        pem = fetch_verified_server_certificate("127.0.0.1", bound, DEV_POLICY, now=NOW)
        with_cert = channel_credentials(ca=pem, crt=client.cert_pem, key=client.key_pem)
        with grpc.secure_channel(f"127.0.0.1:{bound}", with_cert) as channel:
            assert pinned_call(channel) == b"echo:hello"
        without = channel_credentials(ca=None, crt=pem, key=None)
        with grpc.secure_channel(f"127.0.0.1:{bound}", without) as channel, pytest.raises(grpc.RpcError):
            pinned_call(channel)


async def ready(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ready")


def test_ratls_over_rest_verify_then_pin() -> None:
    tls = ratls_server_tls(simulated_tee(), now=NOW)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    bound = sock.getsockname()[1]
    app = Starlette(routes=[Route("/v2/health/ready", ready)])
    with uvicorn_ssl_options(tls) as options:
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **options))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            pem = fetch_verified_server_certificate("127.0.0.1", bound, DEV_POLICY, now=NOW)
            pinned = client_ssl_context(ca=None, crt=pem, key=None, check_hostname=False)
            with httpx.Client(verify=pinned, timeout=5) as http:
                assert http.get(f"https://127.0.0.1:{bound}/v2/health/ready").text == "ready"
            other = ratls_server_tls(simulated_tee(os.urandom(48)), now=NOW).cert_pem
            wrong_pin = client_ssl_context(ca=None, crt=other, key=None, check_hostname=False)
            with httpx.Client(verify=wrong_pin, timeout=5) as http, pytest.raises(httpx.ConnectError):
                http.get(f"https://127.0.0.1:{bound}/v2/health/ready")
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()
    assert not thread.is_alive()
