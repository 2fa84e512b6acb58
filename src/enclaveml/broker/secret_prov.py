"""A Gramine-compatible secret provisioning server over mutual RA-TLS.

The enclave (client) presents an RA-TLS certificate; this server presents a CA-issued
certificate, as Gramine's ``secret_provision_start_server`` does (tee-formats.md §2.3). Per
connection, in this order:

1. TLS handshake (pyOpenSSL, TLS >= 1.2) requiring a client certificate, which the TLS layer
   takes as it is: a *self-signed* RA-TLS certificate as Gramine's ``libsecret_prov_attest``
   presents it, or ours issued by the open anchor (``ratls_tls``). The handshake proves only
   that the client holds the certificate's key;
2. the client certificate is verified *before* any application byte is read: its signature
   (by its own key, or by the open anchor), then its evidence and that evidence's binding to
   the key (``verify_ratls_certificate``, as ``ratls_tls.verify_peer`` does). Trust comes
   from the evidence, never from the TLS layer;
3. the request, exactly ``SECRET_PROVISION_RA_TLS_REQUEST_V1\\0`` (35 bytes), is read;
4. ``decide(claims)`` returns the secret, or ``None`` (or raises) to refuse;
5. ``audit("secret_prov.release", ...)`` is recorded, then the response is sent as Gramine
   frames it: ``SECRET_PROVISION_RA_TLS_RESPONSE_V1:\\0`` (37 bytes), the secret size as a
   4-byte big-endian integer, then the secret; then close_notify.

Any refusal closes the connection with nothing sent and calls
``audit("secret_prov.refused", {"reason": ..., ...})``. Secret bytes are never logged or
audited, only their size. Protocol details: ``docs/secret-provisioning.md``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL

from enclaveml.attestation.claims import Claims
from enclaveml.attestation.policy import PolicyViolation
from enclaveml.attestation.ratls import EvidenceVerifier, verify_ratls_certificate
from enclaveml.attestation.ratls_tls import open_anchor_certificate
from enclaveml.errors import AttestationError, EnclaveMLError, EvidenceParseError, PolicyError

__all__ = [
    "DEFAULT_PORT",
    "MAX_SECRET_SIZE",
    "REQUEST",
    "RESPONSE",
    "RESPONSE_HEADER_SIZE",
    "AuditFn",
    "SecretProvisioningServer",
    "parse_response_header",
    "response_header",
]

logger = logging.getLogger("enclaveml.broker")

# Gramine's secret_prov.h strings, sent with their NUL terminator (sizeof, not strlen).
REQUEST = b"SECRET_PROVISION_RA_TLS_REQUEST_V1\x00"
RESPONSE = b"SECRET_PROVISION_RA_TLS_RESPONSE_V1:\x00"
RESPONSE_HEADER_SIZE = len(RESPONSE) + 4  # then a u32 big-endian (htonl) secret size: 41 bytes
DEFAULT_PORT = 4433
MAX_SECRET_SIZE = 0x7FFFFFFF  # both Gramine sides refuse sizes above INT_MAX
_CLOSE_NOTIFY_WAIT_S = 2.0
# The stdlib ssl module's default cipher string (TLS 1.2; TLS 1.3 suites are OpenSSL's defaults).
_TLS12_CIPHERS = b"@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM"
_SERVER_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
_T = TypeVar("_T")

AuditFn = Callable[[str, dict[str, Any]], None]
"""``audit(event, details)``: details hold names, sizes and reasons, never secret bytes."""


def response_header(secret_size: int) -> bytes:
    """The 41 bytes Gramine's server sends before a secret of ``secret_size`` bytes."""
    if not 0 <= secret_size <= MAX_SECRET_SIZE:
        raise ValueError(f"secret size {secret_size} is outside 0..{MAX_SECRET_SIZE}")
    return RESPONSE + struct.pack(">I", secret_size)


def parse_response_header(header: bytes) -> int:
    """The secret size announced by a 41-byte response header; ``secret_prov_protocol_error`` if malformed."""
    if len(header) != RESPONSE_HEADER_SIZE or header[: len(RESPONSE)] != RESPONSE:
        raise AttestationError(
            "secret_prov_protocol_error",
            "the server's response is not SECRET_PROVISION_RA_TLS_RESPONSE_V1",
            "is this a Gramine-compatible secret provisioning server?",
        )
    size = int.from_bytes(header[len(RESPONSE) :], "big")
    if size > MAX_SECRET_SIZE:
        raise AttestationError(
            "secret_prov_protocol_error", f"the server announced a secret of {size} bytes (above INT_MAX)"
        )
    return size


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Refusal(Exception):
    def __init__(
        self, reason: str, what: str, claims: Claims | None = None, *, extra: dict[str, object] | None = None
    ) -> None:
        super().__init__(what)
        self.reason, self.what, self.claims, self.extra = reason, what, claims, extra or {}


class SecretProvisioningServer:
    """Gramine's secret provisioning protocol for attested clients; one thread per connection.

    ``cert_pem`` (with any intermediates) and ``key_pem`` are the server's CA-issued
    identity; point the enclave's ``SECRET_PROVISION_CA_CHAIN_PATH`` at that CA. Clients
    present Gramine's self-signed RA-TLS certificate, or ours under the open anchor.
    ``verifier`` checks the client's evidence; ``decide(claims)`` returns the secret for that
    workload, or ``None`` to refuse (it may also raise ``AttestationError``/``PolicyError``,
    whose reason is audited). At most ``max_connections`` connections are served at once
    (more wait in the listen backlog); each has ``timeout`` seconds in total.

    ``serve_forever()`` blocks until ``shutdown()``; ``start()`` runs it in a thread. The
    listening socket is bound on construction, so ``port`` is known at once (pass 0 for any).
    """

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        cert_pem: bytes,
        key_pem: bytes,
        verifier: EvidenceVerifier,
        decide: Callable[[Claims], bytes | None],
        now_fn: Callable[[], datetime] = _utc_now,
        audit: AuditFn | None = None,
        timeout: float = 30.0,
        max_connections: int = 32,
        backlog: int = 128,
    ) -> None:
        if timeout <= 0 or max_connections < 1:
            raise ValueError("timeout must be positive and max_connections at least 1")
        self._context = _server_context(cert_pem, key_pem)
        self._verifier, self._decide, self._now_fn, self._audit_fn = verifier, decide, now_fn, audit
        self._timeout = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._lock = threading.Lock()
        self._workers: set[threading.Thread] = set()
        self._thread: threading.Thread | None = None
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._listener = socket.create_server((host, port), family=family, backlog=backlog)
        self._listener.setblocking(False)  # accept() never blocks the loop: select() says when

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        name = self._listener.getsockname()
        return str(name[0]), int(name[1])

    @property
    def port(self) -> int:
        return self.address[1]

    def __enter__(self) -> SecretProvisioningServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def start(self) -> threading.Thread:
        """Run ``serve_forever`` in a daemon thread and return the thread."""
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        self._stopped.clear()  # so that an immediate shutdown() waits for the loop
        self._thread = threading.Thread(target=self.serve_forever, name="secret-prov-accept", daemon=True)
        self._thread.start()
        return self._thread

    def serve_forever(self, poll_interval: float = 0.25) -> None:
        """Accept connections until ``shutdown()``; each is served in its own thread."""
        if self._stopping.is_set():
            raise RuntimeError("the server was shut down")
        self._stopped.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._listener, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    if not selector.select(poll_interval) or not self._slots.acquire(timeout=poll_interval):
                        continue
                    try:
                        conn, address = self._listener.accept()
                    except OSError as exc:  # BlockingIOError: the client left before accept
                        self._slots.release()
                        if not isinstance(exc, BlockingIOError | InterruptedError | ConnectionAbortedError):
                            logger.warning("secret provisioning: accept failed: %s", exc)
                        continue
                    self._spawn(conn, address)
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, wait for the connections being served (at most ``timeout`` s each), close."""
        self._stopping.set()
        self._stopped.wait()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(self._timeout + _CLOSE_NOTIFY_WAIT_S if timeout is None else timeout)
        self._listener.close()

    # -- one connection ------------------------------------------------------------------

    def _spawn(self, conn: socket.socket, address: Any) -> None:
        worker = threading.Thread(target=self._handle, args=(conn, address), name="secret-prov-conn", daemon=True)
        with self._lock:
            self._workers.add(worker)
        try:
            worker.start()
        except BaseException:
            with self._lock:
                self._workers.discard(worker)
            self._slots.release()
            conn.close()
            raise

    def _handle(self, conn: socket.socket, address: Any) -> None:
        peer = _peer(address)
        try:
            self._serve(conn, peer)
        except _Refusal as refusal:
            self._refused(peer, refusal)
        except Exception as exc:  # a bug must not kill the server nor leak details to the client
            logger.exception("secret provisioning: internal error serving %s", peer)
            self._refused(peer, _Refusal("internal_error", f"internal error ({type(exc).__name__})"))
        finally:
            conn.close()
            with self._lock:
                self._workers.discard(threading.current_thread())
            self._slots.release()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        tls = self._handshake(conn, deadline=time.monotonic() + self._timeout)
        claims = self._verify_client(tls)  # on failure nothing was read: _handle closes the socket
        request = _read_exact(tls, len(REQUEST), claims)
        if request != REQUEST:
            raise _Refusal("bad_request", "the request is not SECRET_PROVISION_RA_TLS_REQUEST_V1", claims)
        secret = self._secret_for(claims)
        details = {"peer": peer, **_summary(claims), "secret_size": len(secret)}
        try:  # the release is recorded before any byte of it leaves
            if self._audit_fn is not None:
                self._audit_fn("secret_prov.release", details)
        except Exception as exc:
            failure = type(exc).__name__
            logger.error("secret provisioning: audit failed (%s); secret for %s not sent", failure, peer)
            raise _Refusal("audit_failed", f"the release could not be audited ({failure})", claims) from None
        try:
            tls.sendall(response_header(len(secret)))  # two writes, as Gramine's server does
            tls.sendall(secret)
        except (SSL.Error, OSError) as exc:  # TimeoutError included
            what = f"the connection failed while the response was sent ({type(exc).__name__})"
            raise _Refusal("connection_closed", what, claims) from None
        level = logging.WARNING if claims.insecure else logging.INFO
        insecure = "INSECURE (simulated or weakened evidence): " if claims.insecure else ""
        logger.log(level, "%ssecret provisioning: released %d bytes to %s", insecure, len(secret), peer)
        tls.close_notify(_CLOSE_NOTIFY_WAIT_S)  # as Gramine does

    def _handshake(self, conn: socket.socket, *, deadline: float) -> _TlsConnection:
        tls = _TlsConnection(self._context, conn, deadline)
        try:
            tls.handshake()
        except TimeoutError:
            raise _Refusal("timeout", f"no TLS handshake within {self._timeout:g} s") from None
        except (SSL.ZeroReturnError, SSL.SysCallError, OSError):  # EOF or reset
            raise _Refusal("connection_closed", "the client closed the connection during the handshake") from None
        except SSL.Error as exc:
            reasons = _openssl_reasons(exc)
            if "peer did not return a certificate" in reasons:
                what = "the client presented no certificate; an RA-TLS client certificate is required"
                raise _Refusal("tls_no_client_certificate", what) from None
            raise _Refusal("tls_handshake_failed", f"TLS handshake failed: {'; '.join(reasons) or 'unknown'}") from None
        return tls

    def _verify_client(self, tls: _TlsConnection) -> Claims:
        """The client certificate as ``ratls_tls.verify_peer`` checks it, after its signature."""
        try:
            cert = tls.peer_certificate()
            _verify_certificate_signature(cert)
            return verify_ratls_certificate(cert, self._verifier, now=self._now_fn(), policy_check=None)
        except EnclaveMLError as exc:
            raise _Refusal(_reason_of(exc), exc.what, extra=_failed_checks(exc)) from None

    def _secret_for(self, claims: Claims) -> bytes:
        try:
            secret = self._decide(claims)
        except EnclaveMLError as exc:
            raise _Refusal(_reason_of(exc), exc.what, claims, extra=_failed_checks(exc)) from None
        except Exception as exc:
            logger.error("secret provisioning: decide() raised %s", type(exc).__name__)
            raise _Refusal("decide_failed", f"the secret lookup failed ({type(exc).__name__})", claims) from None
        if secret is None:
            raise _Refusal("not_entitled", "no secret is released to this workload", claims)
        if not isinstance(secret, bytes | bytearray | memoryview) or not 0 < len(secret) <= MAX_SECRET_SIZE:
            what = f"decide() returned no usable secret ({type(secret).__name__}); Gramine needs 1..INT_MAX bytes"
            raise _Refusal("invalid_secret", what, claims)
        return bytes(secret)

    def _refused(self, peer: str, refusal: _Refusal) -> None:
        details: dict[str, Any] = {"peer": peer, "reason": refusal.reason, "what": refusal.what}
        if refusal.claims is not None:
            details |= _summary(refusal.claims)
        details |= refusal.extra
        logger.warning("secret provisioning refused %s: %s (%s)", peer, refusal.reason, refusal.what)
        if self._audit_fn is None:
            return
        try:
            self._audit_fn("secret_prov.refused", details)
        except Exception as exc:
            logger.error("secret provisioning: audit of a refusal failed (%s)", type(exc).__name__)


def _read_exact(tls: _TlsConnection, size: int, claims: Claims) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = tls.recv(size - len(data))
        except TimeoutError:
            raise _Refusal("timeout", "the request did not arrive in time", claims) from None
        except (SSL.Error, OSError) as exc:
            what = f"the connection failed before a full request: {'; '.join(_openssl_reasons(exc)) or exc}"
            raise _Refusal("no_request", what, claims) from None
        if not chunk:
            raise _Refusal("no_request", f"the client closed after {len(data)} of {size} request bytes", claims)
        data += chunk
    return bytes(data)


def _reason_of(exc: EnclaveMLError) -> str:
    if isinstance(exc, AttestationError):
        return exc.reason
    if isinstance(exc, PolicyError):
        return "policy_violation"
    return "verifier_error"


def _failed_checks(exc: EnclaveMLError) -> dict[str, object]:
    if isinstance(exc, PolicyViolation):
        return {"failed_checks": [failure.check for failure in exc.decision.failures]}
    return {}


def _summary(claims: Claims) -> dict[str, Any]:
    """Who the client is, for the audit record: the TEE, its measurement and TCB verdict."""
    measurement = claims.mr_enclave if claims.mr_enclave is not None else claims.mr_td
    out: dict[str, Any] = {"tee": str(claims.tee), "tcb_status": str(claims.tcb_status), "insecure": claims.insecure}
    if measurement is not None:
        out["measurement"] = measurement.hex()
    if claims.mr_signer is not None:
        out["mr_signer"] = claims.mr_signer.hex()
    return out


def _peer(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


# -- the TLS layer: takes any client certificate; trust comes from the evidence -------------------


def _server_context(cert_pem: bytes, key_pem: bytes) -> SSL.Context:
    """TLS >= 1.2 presenting ``cert_pem`` (leaf, then intermediates), requiring a client certificate.

    Python's ``ssl`` has no verify callback, so it cannot take a self-signed client certificate
    it does not already trust. Here the callback takes any; OpenSSL still checks the client's
    CertificateVerify, so the client holds the certificate's key. No session cache and no
    tickets: every connection presents, and has verified, its certificate.
    """
    chain = x509.load_pem_x509_certificates(cert_pem)  # ValueError if unreadable: bad config fails here
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, _SERVER_KEY_TYPES):
        raise ValueError(f"unsupported server key type {type(key).__name__}")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(_TLS12_CIPHERS)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET | SSL.OP_CIPHER_SERVER_PREFERENCE)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.use_certificate(chain[0])
    for intermediate in chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(key)
    context.check_privatekey()
    # Any certificate passes: Gramine's is self-signed, so OpenSSL's chain verdict is always
    # "untrusted", and like Gramine's ra_tls_verify_callback we ignore it. _verify_client checks
    # the certificate right after the handshake, before any application byte is read.
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *_: True)
    return context


def _verify_certificate_signature(cert: x509.Certificate) -> None:
    """The client certificate is signed by its own key (Gramine) or by the open anchor (ours).

    The signature adds nothing to the handshake's proof of possession, but a certificate
    that claims to be self-signed and is not has been altered after it was signed: refused.
    """
    anchor = open_anchor_certificate()
    if cert.issuer == cert.subject:
        issuer, signer = cert, "its own key"
    elif cert.issuer == anchor.subject:
        issuer, signer = anchor, "the open anchor"
    else:
        what = f"the client certificate's issuer {cert.issuer.rfc4514_string()!r} is neither itself nor the open anchor"
        hint = "an RA-TLS client certificate is self-signed (Gramine) or re-issued under the open anchor (enclaveml)"
        raise AttestationError("ratls_certificate_issuer_unknown", what, hint)
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise AttestationError(
            "ratls_certificate_signature_invalid",
            f"the client certificate's signature does not verify with {signer}",
            "the certificate was altered after it was signed",
        ) from None


def _openssl_reasons(exc: BaseException) -> list[str]:
    """OpenSSL's reason strings in a pyOpenSSL ``SSL.Error`` (whose argument is OpenSSL's error queue)."""
    queue = exc.args[0] if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list) else []
    return [str(entry[-1]) for entry in queue if isinstance(entry, tuple) and entry]


class _TlsConnection:
    """The server side of one pyOpenSSL connection on a non-blocking socket. Every call waits
    at most until ``deadline`` (``time.monotonic()``), then raises ``TimeoutError``."""

    def __init__(self, context: SSL.Context, sock: socket.socket, deadline: float) -> None:
        sock.setblocking(False)  # OpenSSL uses the descriptor itself: we wait with selectors
        self._sock, self._deadline = sock, deadline
        self._conn = SSL.Connection(context, sock)
        self._conn.set_accept_state()

    def handshake(self) -> None:
        self._call(self._conn.do_handshake)

    def peer_certificate(self) -> x509.Certificate:
        try:
            cert = self._conn.get_peer_certificate(as_cryptography=True)
        except ValueError:  # OpenSSL parsed it, cryptography does not
            raise EvidenceParseError("certificate", 0, "the client certificate is not well-formed X.509") from None
        if cert is None:  # unreachable with VERIFY_FAIL_IF_NO_PEER_CERT; checked all the same
            raise AttestationError("ratls_no_peer_certificate", "the client presented no certificate")
        return cert

    def recv(self, size: int) -> bytes:
        """At most ``size`` bytes; ``b""`` once the client has closed (close_notify or plain EOF)."""
        try:
            return self._call(functools.partial(self._conn.recv, size))
        except (SSL.ZeroReturnError, SSL.SysCallError) as exc:
            if isinstance(exc, SSL.SysCallError) and exc.args[:1] != (-1,):  # a reset, not "Unexpected EOF"
                raise
            return b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # after WantWrite OpenSSL needs the very same buffer again: _call retries it
            view = view[self._call(functools.partial(self._conn.send, view)) :]

    def close_notify(self, wait: float) -> None:
        """Send close_notify, then wait up to ``wait`` s for the client's (or its EOF)."""
        self._deadline = time.monotonic() + wait
        with contextlib.suppress(SSL.Error, OSError):  # the client may be gone already
            if not self._call(self._conn.shutdown):
                self._call(self._conn.shutdown)

    def _call(self, operation: Callable[[], _T]) -> _T:
        while True:
            try:
                return operation()
            except SSL.WantReadError:
                events = selectors.EVENT_READ
            except SSL.WantWriteError:
                events = selectors.EVENT_WRITE
            remaining = self._deadline - time.monotonic()
            with selectors.DefaultSelector() as selector:
                selector.register(self._sock, events)
                if remaining <= 0 or not selector.select(remaining):
                    raise TimeoutError
