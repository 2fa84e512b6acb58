"""Running the key broker: uvicorn (TLS) in a thread or in the foreground, plus secret provisioning.

``BrokerServer(store, host, port, tls_cert=..., tls_key=...)`` serves ``create_app(store)``
with uvicorn, programmatically: ``start()`` runs it in a thread and returns once it is
listening (``port`` 0 picks a free port; ``.port`` tells which), ``stop()`` asks it to exit
and waits; ``serve_forever()`` runs it in the calling thread (uvicorn handles SIGINT and
SIGTERM). Without a certificate it serves plain HTTP: for tests behind TLS termination
only. ``client_ca`` turns on mutual TLS: every connection must present a client
certificate issued by that CA, checked in the TLS handshake, before and in addition to the
signed-request authentication of each request. ``self_tee``: the TEE the broker runs in;
it then answers ``GET /v1/broker/evidence`` (``self_attestation.py``, bi-attestation).

``secret_prov_port`` also starts a Gramine secret provisioning server
(``secret_prov.py``) with the same certificate; the secret is the 16-byte Gramine wrap key
derived from the primary version of the key ``secret_prov_key`` (``derive_wrap_key``),
released to a client whose RA-TLS evidence satisfies a policy bound to that key (the same
policies and audit entries as ``POST /v1/keys/{name}/release``).

``make_self_signed(dir)`` writes a self-signed P-256 certificate for 127.0.0.1 / localhost
(tests and the demo); clients trust it with ``ca=cert``.

``serve_workers(n, make_server)`` (``_workers.py``) runs ``n`` broker processes on one port,
each with its own store over the same database: the scale-out beyond one core.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclaveml.attestation.claims import Claims
from enclaveml.attestation.collateral_source import CollateralSource, resolve_collateral
from enclaveml.attestation.evidence import verify_evidence
from enclaveml.attestation.policy import Policy
from enclaveml.attestation.ratls import Evidence
from enclaveml.attestation.tee import Tee
from enclaveml.broker._http_protocol import CoalescingHttpToolsProtocol
from enclaveml.broker._workers import WorkerPool, serve_workers
from enclaveml.broker.app import create_app, self_attestation_route
from enclaveml.broker.secret_prov import SecretProvisioningServer
from enclaveml.broker.store import BrokerStore
from enclaveml.crypto.gramine_pf import derive_wrap_key
from enclaveml.errors import ConfigError, PolicyError

__all__ = ["BrokerServer", "WorkerPool", "make_self_signed", "serve_workers"]

logger = logging.getLogger("enclaveml.broker")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def make_self_signed(directory: Path | str, *, days: int = 30) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` (0600) for 127.0.0.1 and localhost; returns their paths."""
    where = Path(directory)
    where.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclaveml broker (self-signed)")])
    now = datetime.now(UTC)
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = where / "cert.pem", where / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


class BrokerServer:
    """The broker's HTTPS API (and optionally secret provisioning), see the module docstring."""

    def __init__(
        self,
        store: BrokerStore,
        host: str = "127.0.0.1",
        port: int = 8443,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        secret_prov_port: int | None = None,
        *,
        secret_prov_key: str | None = None,
        now_fn: Callable[[], datetime] = _utc_now,
        sim_trusted_keys: Sequence[Ed25519PublicKey] | None = None,
        result_signing_key: ec.EllipticCurvePrivateKey | None = None,
        collateral: CollateralSource = None,
        client_ca: str | Path | None = None,
        self_tee: Tee | None = None,
        log_level: str = "warning",
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("give both --tls-cert and --tls-key, or neither")
        if client_ca is not None and tls_cert is None:
            raise ConfigError("mutual TLS (--client-ca) needs the broker's own certificate", "add --tls-cert/--tls-key")
        if client_ca is not None and not Path(client_ca).is_file():
            raise ConfigError(
                f"client CA file {client_ca} not found", "give the PEM of the CA that issues client certificates"
            )
        self.store, self.host = store, host
        self._now_fn = now_fn
        self._sim_keys = tuple(sim_trusted_keys or ())
        self._collateral = collateral
        extra = []
        if self_tee is not None:
            if tls_cert is None:
                raise ConfigError("a self-attesting broker needs its TLS certificate", "add --tls-cert/--tls-key")
            leaf = x509.load_pem_x509_certificate(Path(tls_cert).read_bytes())  # the first PEM: the leaf
            extra.append(self_attestation_route(self_tee.kind, self_tee.evidence, leaf))
        self.app = create_app(
            store,
            extra_routes=extra,
            now_fn=now_fn,
            sim_trusted_keys=sim_trusted_keys,
            result_signing_key=result_signing_key,
            collateral=collateral,
        )
        self.tls = tls_cert is not None
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            ssl_certfile=None if tls_cert is None else str(tls_cert),
            ssl_keyfile=None if tls_key is None else str(tls_key),
            ssl_ca_certs=None if client_ca is None else str(client_ca),
            ssl_cert_reqs=ssl.CERT_NONE if client_ca is None else ssl.CERT_REQUIRED,
            log_level=log_level,
            http=CoalescingHttpToolsProtocol,  # one write per response (_http_protocol.py)
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.secret_prov: SecretProvisioningServer | None = None
        if secret_prov_port is not None:
            if tls_cert is None or tls_key is None:
                raise ConfigError("secret provisioning needs the broker's TLS certificate", "add --tls-cert/--tls-key")
            if secret_prov_key is None:
                raise ConfigError("secret provisioning needs the key it hands out", "add --secret-prov-key NAME")
            self.secret_prov = SecretProvisioningServer(
                host,
                secret_prov_port,  # 0: any free port (tests); the CLI says 4433
                cert_pem=Path(tls_cert).read_bytes(),
                key_pem=Path(tls_key).read_bytes(),
                verifier=self._verify_ratls_evidence,
                decide=self._decider(secret_prov_key),
                now_fn=now_fn,
                audit=self._audit_secret_prov,
            )

    # -- secret provisioning ------------------------------------------------------------

    def _verify_ratls_evidence(self, evidence: Evidence, at: datetime) -> Claims:
        collateral = resolve_collateral(self._collateral, evidence.raw, at)
        verified = verify_evidence(evidence.raw, now=at, collateral=collateral, sim_trusted_keys=self._sim_keys or None)
        return verified.claims

    def _decider(self, key_name: str) -> Callable[[Claims], bytes | None]:
        def decide(claims: Claims) -> bytes | None:
            now = self._now_fn()
            failures: list[str] = []
            for record in self.store.policies_for_key(key_name):
                decision = Policy.from_text(record.document).evaluate(claims, now=now)
                if decision.allowed:
                    released = self.store.release_key_material(record.policy_id, key_name, actor="secret-prov", now=now)
                    primary = released[-1]  # the newest enabled version
                    # Gramine's SECRET_PROVISION_SET_KEY takes exactly 16 bytes: the derived wrap key
                    # (`enclaveml kms gramine-pf-key` gives the owner the same bytes).
                    return derive_wrap_key(primary.material, primary.key_id, primary.version)
                failures.append(f"policy {record.name}: {decision.failures[0].what}")
            raise PolicyError("; ".join(failures) or f"no policy may receive key {key_name}")

        return decide

    def _audit_secret_prov(self, event: str, details: dict[str, object]) -> None:
        if event.endswith(".refused"):
            reason = str(details.get("reason", "refused"))
            self.store.record_refusal("secret_prov", actor="secret-prov", subject="ra-tls", reason=reason)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the API listens on (after ``start()``)."""
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> BrokerServer:
        """Serve in a daemon thread; returns once listening (``ConfigError`` if it could not)."""
        if self._thread is not None:
            raise RuntimeError("the broker server is already started")
        self._thread = threading.Thread(target=self._server.run, name="broker-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                raise ConfigError(f"the key broker could not listen on {self.host}:{self._server.config.port}")
            time.sleep(0.02)
        if self.secret_prov is not None:
            self.secret_prov.start()
        return self

    def preflight(self) -> None:
        """uvicorn's start-up checks now (the TLS certificate and key load): ``ConfigError`` if they fail."""
        config = self._server.config
        if not config.loaded:
            try:
                config.load()
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"the key broker cannot start: {exc}", "check --tls-cert / --tls-key") from None

    def serve_forever(self, sock: socket.socket | None = None) -> None:
        """Serve in this thread until SIGINT / SIGTERM; on ``sock`` (already listening) if given
        (a worker of ``serve_workers``), else on ``host``:``port``.

        The process is the server's from here on: everything created so far (modules, the app,
        the store) moves out of the garbage collector's sight (``gc.freeze``). A full
        collection then scans only what requests create: its pauses, which stall every
        request in flight, went from ~70 ms to under 10 ms (docs/performance.md).
        """
        gc.freeze()
        if self.secret_prov is not None:
            self.secret_prov.start()
        try:
            self._server.run(sockets=None if sock is None else [sock])
        finally:
            if self.secret_prov is not None:
                self.secret_prov.shutdown(timeout=5)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self.secret_prov is not None:
            self.secret_prov.shutdown(timeout=5)
            self.secret_prov = None

    def __enter__(self) -> BrokerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
