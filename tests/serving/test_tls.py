"""Clients reach the model server over one-way and mutual TLS; real handshakes, gRPC and REST.

Every refusal is an attack: a server certificate from another CA, an expired certificate,
no client certificate, a client certificate from another CA.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from enclaveml.errors import ConfigError
from enclaveml.serving.certs import Issued, create_ca, issue_client_certificate, issue_server_certificate
from enclaveml.serving.tls import (
    ServerTls,
    channel_credentials,
    client_ssl_context,
    grpc_server_credentials,
    uvicorn_ssl_options,
)

NOW = datetime.now(UTC)
ECHO = "/test.Echo/Echo"


class Pki(NamedTuple):
    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    other_server: Issued  # a valid server certificate, but from another CA
    other_client: Issued


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, other = create_ca(now=NOW), create_ca(now=NOW)
    return Pki(
        ca,
        issue_server_certificate(ca, "serving.example.com", now=NOW),
        issue_client_certificate(ca, "analyst", now=NOW),
        other,
        issue_server_certificate(other, "serving.example.com", now=NOW),
        issue_client_certificate(other, "analyst", now=NOW),
    )


# -- a real gRPC server: one generic unary method, bytes in and out ----------------------------


@contextlib.contextmanager
def grpc_echo_server(tls: ServerTls) -> Iterator[int]:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(tls))
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def call(port: int, credentials: grpc.ChannelCredentials, options: list[tuple[str, str]] | None = None) -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options or []) as channel:
        answer: bytes = channel.unary_unary(ECHO)(b"hello", timeout=5)
    return answer


def refused(port: int, credentials: grpc.ChannelCredentials, options: list[tuple[str, str]] | None = None) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        call(port, credentials, options)
    error: Any = raised.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    details: str = error.details()
    return details


# -- one-way TLS -----------------------------------------------------------------------------


def test_one_way_tls_call_reaches_the_server(pki: Pki) -> None:
    with grpc_echo_server(ServerTls(pki.server.cert_pem, pki.server.key_pem)) as port:
        assert call(port, channel_credentials(ca=pki.ca.cert_pem, crt=None, key=None)) == b"echo:hello"


def test_cczoo_one_way_client_uses_crt_as_its_only_root(pki: Pki) -> None:
    # CCZoo's one-way client passes the certificate to trust as -crt (root = ca if ca else crt)
    with grpc_echo_server(ServerTls(pki.server.cert_pem, pki.server.key_pem)) as port:
        assert call(port, channel_credentials(ca=None, crt=pki.ca.cert_pem, key=None)) == b"echo:hello"


def test_a_server_certificate_from_another_ca_fails_the_handshake(pki: Pki) -> None:
    with grpc_echo_server(ServerTls(pki.other_server.cert_pem, pki.other_server.key_pem)) as port:
        details = refused(port, channel_credentials(ca=pki.ca.cert_pem, crt=None, key=None))
    assert "handshake failed" in details.lower()
    assert "CERTIFICATE_VERIFY_FAILED" in details


def test_a_server_certificate_for_another_name_fails_the_handshake(pki: Pki) -> None:
    with grpc_echo_server(ServerTls(pki.server.cert_pem, pki.server.key_pem)) as port:
        details = refused(
            port,
            channel_credentials(ca=pki.ca.cert_pem, crt=None, key=None),
            [("grpc.ssl_target_name_override", "evil.example.com")],
        )
    assert "Hostname Verification Check failed" in details


def test_an_expired_server_certificate_fails_the_handshake(pki: Pki) -> None:
    long_ago = NOW - timedelta(days=400)
    expired = issue_server_certificate(pki.ca, "serving.example.com", now=long_ago, days=365)
    with grpc_echo_server(ServerTls(expired.cert_pem, expired.key_pem)) as port:
        details = refused(port, channel_credentials(ca=pki.ca.cert_pem, crt=None, key=None))
    assert "certificate has expired" in details


# -- mutual TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_port(pki: Pki) -> Iterator[int]:
    with grpc_echo_server(ServerTls(pki.server.cert_pem, pki.server.key_pem, pki.ca.cert_pem)) as port:
        yield port


def test_mutual_tls_call_with_a_client_certificate(pki: Pki, mtls_port: int) -> None:
    credentials = channel_credentials(ca=pki.ca.cert_pem, crt=pki.client.cert_pem, key=pki.client.key_pem)
    assert call(mtls_port, credentials) == b"echo:hello"


def test_mutual_tls_refuses_a_client_without_a_certificate(pki: Pki, mtls_port: int) -> None:
    refused(mtls_port, channel_credentials(ca=pki.ca.cert_pem, crt=None, key=None))


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(pki: Pki, mtls_port: int) -> None:
    credentials = channel_credentials(ca=pki.ca.cert_pem, crt=pki.other_client.cert_pem, key=pki.other_client.key_pem)
    refused(mtls_port, credentials)


def test_mutual_tls_refuses_an_expired_client_certificate(pki: Pki, mtls_port: int) -> None:
    expired = issue_client_certificate(pki.ca, "analyst", now=NOW - timedelta(days=400), days=365)
    refused(mtls_port, channel_credentials(ca=pki.ca.cert_pem, crt=expired.cert_pem, key=expired.key_pem))


def test_mutual_tls_refuses_a_server_certificate_used_as_a_client_certificate(pki: Pki, mtls_port: int) -> None:
    # issued by the right CA, but for serverAuth only
    refused(mtls_port, channel_credentials(ca=pki.ca.cert_pem, crt=pki.server.cert_pem, key=pki.server.key_pem))


@pytest.mark.parametrize(
    ("ca", "crt", "key", "reason"),
    [
        (None, None, "client", "a client key without a CA"),
        ("ca", "client", None, "needs both the client certificate and its key"),
        ("ca", None, "client", "needs both the client certificate and its key"),
        ("client_key", None, None, r"the CA certificate \(-ca\) is not a PEM certificate"),
        ("ca", "client", "ca_cert", r"the client key \(-key\) is not an unencrypted PEM private key"),
    ],
)
def test_client_options_that_cczoo_would_misuse_are_refused(
    pki: Pki, ca: str | None, crt: str | None, key: str | None, reason: str
) -> None:
    files = {"ca": pki.ca.cert_pem, "client": pki.client.cert_pem, "client_key": pki.client.key_pem}
    files |= {"ca_cert": pki.ca.cert_pem}
    key_pem = pki.client.key_pem if key == "client" else files.get(key or "")
    with pytest.raises(ConfigError, match=reason):
        channel_credentials(ca=files.get(ca or ""), crt=files.get(crt or ""), key=key_pem)
    with pytest.raises(ConfigError, match=reason):
        client_ssl_context(ca=files.get(ca or ""), crt=files.get(crt or ""), key=key_pem)


# -- REST: uvicorn with the same ServerTls -----------------------------------------------------


async def whoami(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ready")


APP = Starlette(routes=[Route("/v2/health/ready", whoami)])


@contextlib.contextmanager
def uvicorn_server(tls: ServerTls) -> Iterator[int]:
    """uvicorn on a socket bound before it starts: clients connect at once, the kernel queues them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    with uvicorn_ssl_options(tls) as options:
        config = uvicorn.Config(APP, log_level="warning", lifespan="off", **options)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            yield sock.getsockname()[1]
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()
    assert not thread.is_alive()


def get(port: int, context: ssl.SSLContext, host: str = "localhost") -> httpx.Response:
    with httpx.Client(verify=context, timeout=5) as client:
        return client.get(f"https://{host}:{port}/v2/health/ready")


def test_rest_one_way_tls(pki: Pki) -> None:
    with uvicorn_server(ServerTls(pki.server.cert_pem, pki.server.key_pem)) as port:
        assert get(port, client_ssl_context(ca=pki.ca.cert_pem, crt=None, key=None)).text == "ready"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            get(port, client_ssl_context(ca=pki.other_ca.cert_pem, crt=None, key=None))


def test_rest_mutual_tls(pki: Pki) -> None:
    with uvicorn_server(ServerTls(pki.server.cert_pem, pki.server.key_pem, pki.ca.cert_pem)) as port:
        good = client_ssl_context(ca=pki.ca.cert_pem, crt=pki.client.cert_pem, key=pki.client.key_pem)
        assert get(port, good, host="127.0.0.1").text == "ready"
        # TLS 1.3: the client finishes first; the server's refusal arrives as a closed connection
        for bad in (
            client_ssl_context(ca=pki.ca.cert_pem, crt=None, key=None),
            client_ssl_context(ca=pki.ca.cert_pem, crt=pki.other_client.cert_pem, key=pki.other_client.key_pem),
        ):
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                get(port, bad)


def test_uvicorn_key_file_exists_only_while_the_block_runs(pki: Pki) -> None:
    tls = ServerTls(pki.server.cert_pem, pki.server.key_pem, pki.ca.cert_pem)
    with uvicorn_ssl_options(tls) as options:
        assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        key_file = Path(options["ssl_keyfile"])
        assert key_file.read_bytes() == pki.server.key_pem
        assert Path(options["ssl_ca_certs"]).read_bytes() == pki.ca.cert_pem
    assert not key_file.exists() or key_file.read_bytes() != pki.server.key_pem
