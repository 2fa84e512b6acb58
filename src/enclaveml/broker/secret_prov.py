"""A Gramine-compatible secret provisioning server over mutual RA-TLS.

The enclave (client) presents an RA-TLS certificate; this server presents a CA-issued
certificate, as Gramine's ``secret_provision_start_server`` does (tee-formats.md §2.3). Per
connection, in this order:

1. TLS handshake requiring an RA-TLS client certificate (``ratls_tls``, open anchor);
2. the client's evidence and its binding to the TLS key are verified (``verify_peer``)
   *before* any application byte is read;
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
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from enclaveml.attestation.claims import Claims
from enclaveml.attestation.policy import PolicyViolation
from enclaveml.attestation.ratls import EvidenceVerifier
from enclaveml.attestation.ratls_tls import server_context, verify_peer
from enclaveml.errors import AttestationError, EnclaveMLError, PolicyError

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
    identity; point the enclave's ``SECRET_PROVISION_CA_CHAIN_PATH`` at that CA.
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
        self._context = server_context(cert_pem, key_pem, require_client_ratls=True)
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
        deadline = time.monotonic() + self._timeout
        tls = self._handshake(conn)
        with tls:
            try:  # closes the connection itself on failure: no application byte was read
                claims = verify_peer(tls, self._verifier, policy_check=None, now_fn=self._now_fn)
            except EnclaveMLError as exc:
                raise _Refusal(_reason_of(exc), exc.what, extra=_failed_checks(exc)) from None
            request = _read_exact(tls, len(REQUEST), deadline, claims)
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
            tls.settimeout(max(deadline - time.monotonic(), 0.001))
            tls.sendall(response_header(len(secret)))  # two writes, as Gramine's server does
            tls.sendall(secret)
            level = logging.WARNING if claims.insecure else logging.INFO
            insecure = "INSECURE (simulated or weakened evidence): " if claims.insecure else ""
            logger.log(level, "%ssecret provisioning: released %d bytes to %s", insecure, len(secret), peer)
            with contextlib.suppress(OSError, ValueError):  # close_notify, as Gramine does; the peer may be gone
                tls.settimeout(_CLOSE_NOTIFY_WAIT_S)
                tls.unwrap()

    def _handshake(self, conn: socket.socket) -> ssl.SSLSocket:
        conn.settimeout(self._timeout)
        try:
            # What ratls_tls.accept_verified does for a socket it accepts itself (the base
            # method: the RA-TLS context refuses wrap_socket to callers that skip verification);
            # verify_peer follows immediately in _serve, before any application byte is read.
            return ssl.SSLContext.wrap_socket(self._context, conn, server_side=True, do_handshake_on_connect=True)
        except ssl.SSLCertVerificationError as exc:
            raise _Refusal(
                "tls_client_certificate_rejected",
                f"TLS refused the client certificate ({exc.verify_message}); a self-signed RA-TLS certificate "
                "(e.g. from Gramine's libsecret_prov_attest) is not accepted, see docs/secret-provisioning.md",
            ) from None
        except ssl.SSLError as exc:
            if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
                raise _Refusal("connection_closed", "the client closed the connection during the handshake") from None
            raise _Refusal("tls_handshake_failed", f"TLS handshake failed: {exc.reason or exc}") from None
        except TimeoutError:
            raise _Refusal("timeout", f"no TLS handshake within {self._timeout:g} s") from None
        except OSError as exc:
            raise _Refusal("connection_closed", f"the connection failed during the handshake: {exc}") from None

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


def _read_exact(tls: ssl.SSLSocket, size: int, deadline: float, claims: Claims) -> bytes:
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refusal("timeout", "the request did not arrive in time", claims)
        tls.settimeout(remaining)
        try:
            chunk = tls.recv(size - len(data))
        except TimeoutError:
            raise _Refusal("timeout", "the request did not arrive in time", claims) from None
        except OSError as exc:  # ssl.SSLError included
            raise _Refusal("no_request", f"the connection failed before a full request: {exc}", claims) from None
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
