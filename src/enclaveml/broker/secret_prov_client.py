"""The enclave side of Gramine's secret provisioning protocol (``libsecret_prov_attest``).

``fetch_secret`` does what Gramine's ``secret_provision_start`` does (tee-formats.md §2.3):
create a fresh RA-TLS key and certificate whose evidence binds it, connect over TLS
verifying the *server* by a CA certificate and host name, send
``SECRET_PROVISION_RA_TLS_REQUEST_V1\\0``, read ``SECRET_PROVISION_RA_TLS_RESPONSE_V1:\\0`` with
the 4-byte big-endian secret size, then the secret. A server that refuses closes the
connection without a response: that is ``AttestationError("secret_prov_refused")``.

The client certificate is re-issued under the open anchor (``ratls_tls.client_context``):
Python's ``ssl`` client cannot present a certificate a stdlib server could not verify
otherwise. Our server accepts it as well as Gramine's self-signed certificates, and
Gramine's server accepts it too (its verifier reads only the certificate at depth 0).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from datetime import datetime

from enclaveml.attestation.ratls import EvidenceKind, create_ratls_certificate
from enclaveml.attestation.ratls_tls import client_context, wrap_client
from enclaveml.broker.secret_prov import (
    DEFAULT_PORT,
    REQUEST,
    RESPONSE_HEADER_SIZE,
    parse_response_header,
)
from enclaveml.errors import AttestationError, ConfigError

__all__ = ["DEFAULT_MAX_SECRET_SIZE", "fetch_secret"]

DEFAULT_MAX_SECRET_SIZE = 1 << 20  # Gramine accepts up to INT_MAX; a key or a path is far smaller
_REFUSED_HINT = "the server found the evidence or the workload unacceptable; its audit log has the reason"


def fetch_secret(
    host: str,
    port: int = DEFAULT_PORT,
    *,
    tee_evidence_for: Callable[[bytes], bytes],
    kind: EvidenceKind,
    ca_pem: bytes | None,
    now: datetime,
    timeout: float = 30.0,
    max_secret_size: int = DEFAULT_MAX_SECRET_SIZE,
) -> bytes:
    """Attest to the secret provisioning server at ``host:port`` and return the secret.

    ``tee_evidence_for(report_data)`` returns ``kind`` evidence over 64 bytes of report
    data (called once per RA-TLS extension). ``ca_pem`` is the CA that issued the server's
    certificate (Gramine's ``SECRET_PROVISION_CA_CHAIN_PATH``); ``None`` uses the system's
    trusted CAs. The server's name must match ``host``. ``timeout`` bounds the whole exchange.

    Raises ``AttestationError``: ``secret_prov_refused`` (the server closed without a
    response), ``secret_prov_server_untrusted`` (the server certificate failed), or
    ``secret_prov_protocol_error``; ``ConfigError`` when the server cannot be reached or
    does not answer in time.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    deadline = time.monotonic() + timeout
    cert_pem, key_pem = create_ratls_certificate(tee_evidence_for, kind=kind, now=now)
    context = client_context(cert_pem=cert_pem, key_pem=key_pem, server_ca_pem=ca_pem)
    if ca_pem is None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise ConfigError(f"no connection to {where} within {timeout:g} s", "is the server running?") from None
    except OSError as exc:
        raise ConfigError(f"cannot connect to {where}: {exc.strerror or exc}", "is the server running?") from None
    try:
        conn = wrap_client(sock, None, policy_check=None, context=context, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        raise AttestationError(
            "secret_prov_server_untrusted",
            f"the certificate of {where} failed verification: {exc.verify_message}",
            "pass the CA that issued the server's certificate (--ca), and the host name it was issued for",
        ) from None
    except (ssl.SSLError, ConnectionError) as exc:
        raise _refused(where, f"the TLS handshake failed ({_ssl_reason(exc)})") from None
    except TimeoutError:
        raise ConfigError(f"{where} did not complete the TLS handshake in time", "check the server") from None
    with conn.sock as tls:
        try:
            tls.settimeout(_remaining(deadline, where))
            tls.sendall(REQUEST)
            header = _read_exact(tls, RESPONSE_HEADER_SIZE, deadline, where)
            if len(header) < RESPONSE_HEADER_SIZE:
                if not header:
                    raise _refused(where, "the server closed the connection without a response")
                raise _protocol_error(where, f"the response header ended after {len(header)} bytes")
            size = parse_response_header(header)
            if size > max_secret_size:
                raise _protocol_error(where, f"the announced secret of {size} bytes exceeds {max_secret_size}")
            secret = _read_exact(tls, size, deadline, where)
        except (ssl.SSLError, ConnectionError) as exc:
            # TLS 1.3: a server that rejects our certificate or evidence after the handshake
            # is seen here, as an alert, a reset or EOF on the first read.
            raise _refused(where, f"the server closed the connection ({_ssl_reason(exc)})") from None
    if len(secret) < size:
        raise _protocol_error(where, f"the secret ended after {len(secret)} of {size} bytes")
    return secret


def _read_exact(tls: ssl.SSLSocket, size: int, deadline: float, where: str) -> bytes:
    """Up to ``size`` bytes: fewer only at EOF."""
    data = bytearray()
    while len(data) < size:
        tls.settimeout(_remaining(deadline, where))
        try:
            chunk = tls.recv(min(size - len(data), 1 << 16))
        except TimeoutError:
            raise ConfigError(f"{where} did not answer in time", "check the server and --timeout") from None
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _remaining(deadline: float, where: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ConfigError(f"{where} did not answer in time", "check the server and --timeout")
    return left


def _ssl_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return exc.strerror or type(exc).__name__


def _refused(where: str, why: str) -> AttestationError:
    return AttestationError("secret_prov_refused", f"{where} refused to provision the secret: {why}", _REFUSED_HINT)


def _protocol_error(where: str, what: str) -> AttestationError:
    return AttestationError(
        "secret_prov_protocol_error", f"{where}: {what}", "is this a Gramine-compatible secret provisioning server?"
    )
