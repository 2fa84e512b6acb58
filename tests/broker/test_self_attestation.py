"""Bi-attestation and mutual TLS against a real broker over TLS on 127.0.0.1.

The workload verifies the broker (its simulated evidence, bound to the TLS certificate the
connection reached) before sending anything; a relay with another certificate, another
measurement or a broker that does not attest are refused. Mutual TLS refuses clients
without a certificate from the configured CA in the handshake.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attestation"))
from pki import issue

from enclaveml.attestation.policy import Policy, PolicyViolation
from enclaveml.attestation.sim import SimulationKey
from enclaveml.attestation.tee import SimulatedTee
from enclaveml.broker.client import BrokerClient
from enclaveml.broker.server import BrokerServer, make_self_signed
from enclaveml.broker.store import BrokerStore
from enclaveml.errors import AttestationError, ConfigError

ROOT_KEY = bytes(range(32))
BROKER_MEASUREMENT = hashlib.sha384(b"the broker").digest()
ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))


def _policy(measurement: bytes) -> Policy:
    return Policy.from_text(
        f'name = "broker"\ntee = ["sgx"]\nallow_simulation = true\nmr_enclave = ["{measurement.hex()}"]\n'
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BrokerStore]:
    with BrokerStore(f"sqlite:///{tmp_path / 'broker.db'}", ROOT_KEY) as opened:
        yield opened


@pytest.fixture
def sim_key() -> SimulationKey:
    return SimulationKey.generate()


def _serve(store: BrokerStore, tls: Path, sim_key: SimulationKey | None, **kwargs: object) -> BrokerServer:
    cert, key = make_self_signed(tls)
    tee = SimulatedTee(sim_key, BROKER_MEASUREMENT, b"") if sim_key is not None else None
    return BrokerServer(store, "127.0.0.1", 0, cert, key, self_tee=tee, **kwargs).start()  # type: ignore[arg-type]


def _client(server: BrokerServer, ca: Path, **kwargs: object) -> BrokerClient:
    return BrokerClient(server.url, "a-0000000000000000", b"k" * 32, ca=str(ca), **kwargs)  # type: ignore[arg-type]


def test_the_workload_verifies_the_broker_before_sending_anything(
    store: BrokerStore, sim_key: SimulationKey, tmp_path: Path
) -> None:
    server = _serve(store, tmp_path / "tls", sim_key)
    try:
        with _client(server, tmp_path / "tls" / "cert.pem") as client:
            verified = client.verify_broker(
                _policy(BROKER_MEASUREMENT), now=datetime.now(UTC), sim_trusted_keys=[sim_key.public_key]
            )
            assert verified.claims.mr_enclave == BROKER_MEASUREMENT
            assert verified.claims.insecure
            with pytest.raises(PolicyViolation, match="MR_ENCLAVE"):  # another broker build
                client.verify_broker(_policy(bytes(48)), now=datetime.now(UTC))
            with pytest.raises(AttestationError):  # evidence signed by a key we do not trust
                client.verify_broker(
                    _policy(BROKER_MEASUREMENT),
                    now=datetime.now(UTC),
                    sim_trusted_keys=[SimulationKey.generate().public_key],
                )
        assert not list(store.iter_audit())  # verifying the broker sent no request that reached the store
    finally:
        server.stop()


def test_evidence_relayed_by_another_tls_endpoint_is_refused(
    store: BrokerStore, sim_key: SimulationKey, tmp_path: Path
) -> None:
    """A relay that terminates TLS with its own certificate and forwards the genuine broker's
    evidence: the evidence names the genuine broker's TLS key, not the relay's."""
    genuine = _serve(store, tmp_path / "genuine", sim_key)
    relay_cert, relay_key = make_self_signed(tmp_path / "relay")

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    upstream = httpx.Client(
        base_url=genuine.url, verify=ssl.create_default_context(cafile=tmp_path / "genuine" / "cert.pem")
    )

    async def forward(request: Request) -> Response:
        answer = upstream.get(request.url.path, params=dict(request.query_params))
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    relay_store = BrokerStore(f"sqlite:///{tmp_path / 'relay.db'}", ROOT_KEY)
    relay = BrokerServer(relay_store, "127.0.0.1", 0, relay_cert, relay_key)
    relay.app.router.routes.insert(0, Route("/v1/broker/evidence", forward, methods=["GET"]))
    assert isinstance(relay.app, Starlette)
    relay.start()
    try:
        with _client(relay, relay_cert) as client, pytest.raises(AttestationError) as refused:
            client.verify_broker(_policy(BROKER_MEASUREMENT), now=datetime.now(UTC))
        assert refused.value.reason == "broker_binding_mismatch"
    finally:
        relay.stop()
        genuine.stop()
        upstream.close()
        relay_store.close()


def test_a_broker_that_does_not_attest_is_refused(store: BrokerStore, tmp_path: Path) -> None:
    server = _serve(store, tmp_path / "tls", None)
    try:
        with _client(server, tmp_path / "tls" / "cert.pem") as client, pytest.raises(AttestationError) as refused:
            client.verify_broker(_policy(BROKER_MEASUREMENT), now=datetime.now(UTC))
        assert refused.value.reason == "broker_not_attesting"
        bad = httpx.get(
            f"{server.url}/v1/broker/evidence",
            params={"challenge": "00"},
            verify=ssl.create_default_context(cafile=tmp_path / "tls" / "cert.pem"),
        )
        assert bad.status_code == 404
    finally:
        server.stop()


def _client_ca(where: Path) -> tuple[Path, Path, Path]:
    """A client CA and one client certificate it issued: (ca.pem, client.pem, client.key)."""
    where.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    window = {"not_before": now - timedelta(minutes=5), "not_after": now + timedelta(days=1)}
    ca = issue("test client CA", None, ca=True, **window)
    client_auth = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    client = issue("workload-1", ca, ca=False, extensions=[client_auth], **window)
    paths = where / "ca.pem", where / "client.pem", where / "client.key"
    paths[0].write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(client.cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        client.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(store: BrokerStore, tmp_path: Path) -> None:
    ca, client_cert, client_key = _client_ca(tmp_path / "clients")
    _, stranger_cert, stranger_key = _client_ca(tmp_path / "strangers")  # same shape, another CA
    server = _serve(store, tmp_path / "tls", None, client_ca=ca)
    broker_ca = tmp_path / "tls" / "cert.pem"
    try:
        with _client(server, broker_ca, client_cert=(str(client_cert), str(client_key))) as client:
            assert client.health()["status"] == "ok"
        for cert in (None, (str(stranger_cert), str(stranger_key))):
            with _client(server, broker_ca, client_cert=cert) as client, pytest.raises(ConfigError, match="reach"):
                client.health()
    finally:
        server.stop()


def test_mutual_tls_needs_the_brokers_own_certificate(store: BrokerStore, tmp_path: Path) -> None:
    ca, _, _ = _client_ca(tmp_path / "clients")
    with pytest.raises(ConfigError, match="mutual TLS"):
        BrokerServer(store, "127.0.0.1", 0, client_ca=ca)


def test_run_refuses_to_talk_to_an_unverified_broker(
    store: BrokerStore, sim_key: SimulationKey, tmp_path: Path
) -> None:
    server = _serve(store, tmp_path / "tls", sim_key)
    policy = tmp_path / "broker-policy.toml"
    policy.write_text(f'name = "b"\ntee = ["sgx"]\nallow_simulation = true\nmr_enclave = ["{"00" * 48}"]\n')
    marker = tmp_path / "job-ran"
    (tmp_path / "job.py").write_text(f"open({str(marker)!r}, 'w')\n")
    env = {
        **os.environ,
        "ENCLAVEML_HOME": str(tmp_path / "home"),
        "ENCLAVEML_APP_ID": "a-0000000000000000",
        "ENCLAVEML_API_KEY": "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2U=",
    }
    try:
        done = subprocess.run(
            [ENCLAVEML, "run", "--broker", server.url, "--ca", str(tmp_path / "tls" / "cert.pem"), "--keys", "k",
             "--tee", "sim", "--verify-broker", str(policy), "--",
             sys.executable, "job.py"],
            env=env, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        )  # fmt: skip
    finally:
        server.stop()
    assert done.returncode == 3, done.stderr
    assert "Broker attestation failed:" in done.stderr
    assert "MR_ENCLAVE" in done.stderr
    assert not marker.exists()
    assert not list(store.iter_audit())  # nothing reached the broker's API
