"""RA-TLS over Python's ``ssl``: verify the peer's evidence right after the handshake.

Trust comes from the evidence in the peer's RA-TLS certificate, not from a CA, so the side
that checks evidence does not let OpenSSL judge the certificate. ``wrap_client`` and
``accept_verified`` complete the handshake, verify the peer certificate with
``verify_ratls_certificate`` and close the connection on failure *before* the socket is
returned, so no application byte is sent or accepted from an unverified peer::

    server = server_context(cert_pem, key_pem)                 # inside the TEE
    conn = accept_verified(listener, server)
    client = wrap_client(socket.create_connection(address), verifier, policy_check=check)
    client.peer_claims                                          # who the server is

Mutual RA-TLS. Python's ``ssl`` has no verify callback, so a server cannot ask OpenSSL to
accept an unknown self-signed client certificate. Instead ``client_context`` re-issues the
client's RA-TLS certificate (same key, same extensions) under the *open anchor*: a CA whose
private key anyone can derive from a public label. It authenticates nothing; it only lets
OpenSSL accept the certificate and check the client's proof of possession of the key, after
which ``accept_verified`` checks the evidence. A context built with
``require_client_ratls=True`` therefore refuses ``wrap_socket``/``wrap_bio``: use
``accept_verified``. With TLS 1.3 the client finishes its handshake before the server has
judged its certificate; a rejected client sees EOF on its first read. (The secret
provisioning server, ``broker.secret_prov``, is built on pyOpenSSL instead: its verify
callback takes Gramine's self-signed client certificates as well as open-anchor ones.)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclaveml.attestation.claims import Claims
from enclaveml.attestation.ratls import (
    GRAMINE_LEGACY_QUOTE_OID,
    LEGACY_QUOTE_OID,
    TCG_TAGGED_EVIDENCE_OID,
    EvidenceVerifier,
    PolicyCheck,
    verify_ratls_certificate,
)
from enclaveml.errors import AttestationError

__all__ = [
    "OPEN_ANCHOR_LABEL",
    "RaTlsServerContext",
    "VerifiedConnection",
    "accept_verified",
    "client_context",
    "open_anchor_certificate",
    "server_context",
    "verify_peer",
    "wrap_client",
]

OPEN_ANCHOR_LABEL = b"enclaveml RA-TLS open client anchor v1: this key is public and authenticates nothing"
_P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
_EVIDENCE_OIDS = (TCG_TAGGED_EVIDENCE_OID, GRAMINE_LEGACY_QUOTE_OID, LEGACY_QUOTE_OID)


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class VerifiedConnection:
    """A TLS connection whose peer passed verification; ``peer_claims`` is None if not attested."""

    sock: ssl.SSLSocket
    peer_claims: Claims | None
    peer_address: Any = None


class RaTlsServerContext(ssl.SSLContext):
    """An ``SSLContext`` for an RA-TLS server; see ``server_context``."""

    requires_client_ratls: bool = False

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._refuse_unverified()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._refuse_unverified()
        return super().wrap_bio(*args, **kwargs)

    def _refuse_unverified(self) -> None:
        if self.requires_client_ratls:
            raise ValueError(
                "this context accepts any client certificate at the TLS level; "
                "use accept_verified() so that the client's evidence is checked"
            )


# -- contexts ----------------------------------------------------------------------------


def server_context(
    cert_pem: bytes, key_pem: bytes, *, require_client_ratls: bool = False, client_ca_pem: bytes | None = None
) -> RaTlsServerContext:
    """A TLS ≥ 1.2 server context presenting ``cert_pem`` (RA-TLS or CA-issued).

    ``require_client_ratls``: clients must present an RA-TLS certificate (mutual RA-TLS;
    ``accept_verified`` with a verifier then checks it). ``client_ca_pem``: plain mutual
    TLS with clients issued by that CA. At most one of the two. Session tickets are off, so
    every connection presents (and has verified) a certificate.
    """
    if require_client_ratls and client_ca_pem is not None:
        raise ValueError("choose either require_client_ratls or client_ca_pem")
    context = RaTlsServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 0
    _load_cert_chain(context, cert_pem, key_pem)
    if require_client_ratls:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(
            cadata=open_anchor_certificate().public_bytes(serialization.Encoding.PEM).decode()
        )
        context.requires_client_ratls = True
    elif client_ca_pem is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca_pem.decode())
    return context


def client_context(
    *, cert_pem: bytes | None = None, key_pem: bytes | None = None, server_ca_pem: bytes | None = None
) -> ssl.SSLContext:
    """A TLS ≥ 1.2 client context.

    Without ``server_ca_pem`` the server is an RA-TLS server: OpenSSL checks no chain and
    no host name (``wrap_client`` checks the evidence instead). With it, the server must
    present a certificate from that CA for the host name given to ``wrap_client``.
    ``cert_pem``/``key_pem``: the client's own certificate; an RA-TLS one is re-issued
    under the open anchor so that a Python server can accept it (module docstring).
    """
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("give both cert_pem and key_pem, or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if server_ca_pem is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cadata=server_ca_pem.decode())
    if cert_pem is not None and key_pem is not None:
        _load_cert_chain(context, _reissue_under_open_anchor(cert_pem), key_pem)
    return context


# -- connecting --------------------------------------------------------------------------


def wrap_client(
    sock: socket.socket,
    verifier: EvidenceVerifier | None,
    *,
    policy_check: PolicyCheck | None,
    now_fn: Callable[[], datetime] = _utc_now,
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> VerifiedConnection:
    """Handshake on connected ``sock``, then verify the server's RA-TLS certificate.

    ``verifier=None`` only with a ``context`` that verifies the server by CA. On failure
    the connection is closed and the error (``AttestationError``, ``PolicyError`` or
    ``ssl.SSLError``) raised; nothing was written to it. The socket's timeout applies.
    """
    context = context if context is not None else client_context()
    if verifier is None and context.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError("without a verifier the context must verify the server (client_context(server_ca_pem=...))")
    address = sock.getpeername()  # before the handshake: a refusing server may reset the connection
    tls = context.wrap_socket(sock, server_side=False, do_handshake_on_connect=True, server_hostname=server_hostname)
    claims = None if verifier is None else verify_peer(tls, verifier, policy_check=policy_check, now_fn=now_fn)
    return VerifiedConnection(tls, claims, address)


def accept_verified(
    server_sock: socket.socket,
    context: ssl.SSLContext,
    *,
    verifier: EvidenceVerifier | None = None,
    policy_check: PolicyCheck | None = None,
    now_fn: Callable[[], datetime] = _utc_now,
    timeout: float | None = 30.0,
) -> VerifiedConnection:
    """Accept one connection on listening ``server_sock``, handshake, verify the client.

    A ``verifier`` is required with a ``require_client_ratls`` context and checks the
    client's evidence; the connection is closed on failure, before any byte is read.
    ``timeout`` bounds the handshake and stays set on the returned socket.
    """
    requires_ratls = isinstance(context, RaTlsServerContext) and context.requires_client_ratls
    if requires_ratls and verifier is None:
        raise ValueError("a require_client_ratls context needs a verifier")
    if verifier is not None and context.verify_mode == ssl.CERT_NONE:
        raise ValueError("this context requests no client certificate; use server_context(require_client_ratls=True)")
    conn, address = server_sock.accept()
    try:
        conn.settimeout(timeout)
        # The base method: RaTlsServerContext refuses wrap_socket to callers that would skip verification.
        tls = ssl.SSLContext.wrap_socket(context, conn, server_side=True, do_handshake_on_connect=True)
    except BaseException:
        conn.close()
        raise
    claims = None if verifier is None else verify_peer(tls, verifier, policy_check=policy_check, now_fn=now_fn)
    return VerifiedConnection(tls, claims, address)


def verify_peer(
    tls: ssl.SSLSocket,
    verifier: EvidenceVerifier,
    *,
    policy_check: PolicyCheck | None,
    now_fn: Callable[[], datetime] = _utc_now,
) -> Claims:
    """Verify the RA-TLS certificate of the peer of a completed handshake; close ``tls`` on failure."""
    try:
        der = tls.getpeercert(binary_form=True)
        if der is None:
            raise AttestationError(
                "ratls_no_peer_certificate", "the TLS peer presented no certificate", "is the peer an RA-TLS endpoint?"
            )
        return verify_ratls_certificate(der, verifier, now=now_fn(), policy_check=policy_check)
    except BaseException:
        tls.close()
        raise


# -- the open anchor and certificate loading ---------------------------------------------


@functools.cache
def _open_anchor_key() -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(hashlib.sha384(OPEN_ANCHOR_LABEL).digest(), "big") % (_P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP384R1())


@functools.cache
def open_anchor_certificate() -> x509.Certificate:
    """The open anchor's self-signed CA certificate (its key derives from ``OPEN_ANCHOR_LABEL``)."""
    key = _open_anchor_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclaveml RA-TLS open anchor (authenticates nothing)")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2000, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2100, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, False, False, False), critical=True
        )  # keyCertSign only
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _reissue_under_open_anchor(cert_pem: bytes) -> bytes:
    """The same key, subject, validity and extensions, issued by the open anchor.

    The evidence binds the key (§2.2), so it stays valid. Certificates without an
    evidence extension (CA-issued client certificates) are returned unchanged.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    if not any(ext.oid in _EVIDENCE_OIDS for ext in cert.extensions):
        return cert_pem
    anchor = open_anchor_certificate()
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(anchor.subject)
        .public_key(cert.public_key())  # an RA-TLS key is EC or RSA
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_open_anchor_key().public_key()), critical=False
        )
    )
    for ext in cert.extensions:
        if ext.oid != x509.AuthorityKeyIdentifier.oid:
            builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(_open_anchor_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _load_cert_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` from memory: ``ssl`` reads only files, so use an anonymous memfd."""
    with _private_file(cert_pem + b"\n" + key_pem) as path:
        context.load_cert_chain(path)


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    fd = _memfd_with(data)
    if fd is not None:  # Linux: the PEM never touches a file system
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as tmp:  # elsewhere: a 0700 directory, removed at once
        path = Path(tmp) / "chain.pem"
        path.touch(mode=0o600)
        path.write_bytes(data)
        yield str(path)


def _memfd_with(data: bytes) -> int | None:
    if not hasattr(os, "memfd_create") or not Path("/proc/self/fd").is_dir():
        return None
    try:
        fd = os.memfd_create("enclaveml-ratls", os.MFD_CLOEXEC)
    except OSError:  # e.g. a TEE runtime without memfd support
        return None
    with os.fdopen(fd, "wb", closefd=False) as file:
        file.write(data)
    return fd
