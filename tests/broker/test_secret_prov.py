"""Gramine secret provisioning (tee-formats.md §2.3) over real TLS on 127.0.0.1: our server,
our client, a raw TLS client driven by hand to check the bytes, a client presenting a
self-signed RA-TLS certificate as Gramine's libsecret_prov_attest does, and the CLI in a
subprocess."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclaveml.attestation.claims import Claims
from enclaveml.attestation.evidence import verify_evidence
from enclaveml.attestation.policy import Policy
from enclaveml.attestation.ratls import (
    GRAMINE_LEGACY_QUOTE_OID,
    TCG_EVIDENCE_CBOR_TAG,
    TCG_TAGGED_EVIDENCE_OID,
    Evidence,
    create_ratls_certificate,
)
from enclaveml.attestation.ratls_tls import _open_anchor_key, client_context, open_anchor_certificate
from enclaveml.attestation.sim import SimulationKey, create_sim_evidence, measure_workload
from enclaveml.broker.secret_prov import RESPONSE_HEADER_SIZE, SecretProvisioningServer
from enclaveml.broker.secret_prov_client import fetch_secret
from enclaveml.errors import AttestationError

ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
TIMEOUT = 10.0
HOST = "127.0.0.1"
# Gramine's strings with their NUL, written out here rather than imported (secret_prov.h).
GRAMINE_REQUEST = b"SECRET_PROVISION_RA_TLS_REQUEST_V1\x00"
GRAMINE_RESPONSE = b"SECRET_PROVISION_RA_TLS_RESPONSE_V1:\x00"
# 300 bytes: the size 0x0000012c tells big- from little-endian; the pattern is easy to spot.
SECRET = bytes(range(256)) + b"wrap-key-for-the-model-0123456789abcdef-0123"
PEM = serialization.Encoding.PEM


# -- fixtures: a CA-issued server identity, a simulated TEE and its workload -----------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class ServerIdentity:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


@pytest.fixture(scope="module")
def identity() -> ServerIdentity:
    """A CA and a server certificate for 127.0.0.1 and localhost (what Gramine's server presents)."""
    now = datetime.now(UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secret-prov test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    names = [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(2)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ServerIdentity(ca.public_bytes(PEM), cert.public_bytes(PEM), _key_pem(server_key))


@pytest.fixture(scope="module")
def tee_key() -> SimulationKey:
    return SimulationKey.generate()


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workload")
    (root / "job.py").write_text('print("training")\n')
    return root


@pytest.fixture(scope="module")
def measurement(workload: Path) -> bytes:
    return measure_workload([Path("job.py")], [], root=workload)


def sim_evidence_for(key: SimulationKey, measurement: bytes) -> Callable[[bytes], bytes]:
    return lambda report_data: create_sim_evidence(key, measurement, report_data, b"", datetime.now(UTC))


def ratls_pair(key: SimulationKey, measurement: bytes) -> tuple[bytes, bytes]:
    now = datetime.now(UTC)
    return create_ratls_certificate(sim_evidence_for(key, measurement), kind="sim", now=now)


# -- the server under test -----------------------------------------------------------------


@dataclass
class AuditLog:
    """The audit callback: records every event and lets a test wait for one."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, event: str, details: dict[str, Any]) -> None:
        with self.changed:
            self.events.append((event, dict(details)))
            self.changed.notify_all()

    def wait_for(self, event: str) -> dict[str, Any]:
        with self.changed:
            assert self.changed.wait_for(lambda: any(e == event for e, _ in self.events), TIMEOUT), self.events
            return next(d for e, d in self.events if e == event)


@dataclass
class Running:
    server: SecretProvisioningServer
    audit: AuditLog
    identity: ServerIdentity

    @property
    def port(self) -> int:
        return self.server.port


ServerFactory = Callable[..., Running]


@pytest.fixture
def start_server(identity: ServerIdentity, tee_key: SimulationKey, measurement: bytes) -> Iterator[ServerFactory]:
    """Starts servers whose verifier trusts ``tee_key`` and whose policy pins ``measurement``."""
    started: list[SecretProvisioningServer] = []
    policy = Policy(name="model-server", allow_simulation=True, mr_enclave=(measurement,))

    def verifier(evidence: Evidence, now: datetime) -> Claims:
        return verify_evidence(evidence.raw, now=now, collateral=None, sim_trusted_keys=[tee_key.public_key]).claims

    def release_if_allowed(claims: Claims) -> bytes | None:
        policy.verify(claims, now=datetime.now(UTC))  # raises PolicyViolation: its checks are audited
        return SECRET

    def start(decide: Callable[[Claims], bytes | None] = release_if_allowed, **kwargs: Any) -> Running:
        audit = AuditLog()
        server = SecretProvisioningServer(
            HOST, 0, cert_pem=identity.cert_pem, key_pem=identity.key_pem, verifier=verifier, decide=decide,
            audit=audit, timeout=kwargs.pop("timeout", TIMEOUT), **kwargs,
        )  # fmt: skip
        started.append(server)
        server.start()
        return Running(server, audit, identity)

    yield start
    for server in started:
        server.shutdown()


def fetch(running: Running, key: SimulationKey, measurement: bytes) -> bytes:
    return fetch_secret(
        HOST, running.port, tee_evidence_for=sim_evidence_for(key, measurement), kind="sim",
        ca_pem=running.identity.ca_pem, now=datetime.now(UTC), timeout=TIMEOUT,
    )  # fmt: skip


def raw_exchange(running: Running, cert_pem: bytes, key_pem: bytes, request: bytes) -> bytes:
    """Our client's TLS context (the certificate re-issued under the open anchor), driven by hand."""
    context = client_context(cert_pem=cert_pem, key_pem=key_pem, server_ca_pem=running.identity.ca_pem)
    return exchange(running, context, request)


def exchange(running: Running, context: ssl.SSLContext, request: bytes) -> bytes:
    """A TLS client driven by hand: send ``request`` and return every byte until the server closes.

    A server that closes while our request is unread resets the connection: that is the end too.
    """
    received = bytearray()
    with (
        socket.create_connection((HOST, running.port), timeout=TIMEOUT) as sock,
        context.wrap_socket(sock, server_hostname=HOST) as tls,
    ):
        try:
            tls.sendall(request)
            while chunk := tls.recv(4096):
                received += chunk
        except (ConnectionError, ssl.SSLError):
            pass
    return bytes(received)


# -- acceptance and the exact bytes ---------------------------------------------------------------


def test_an_attested_workload_receives_the_exact_secret(
    start_server: ServerFactory, tee_key: SimulationKey, measurement: bytes
) -> None:
    running = start_server()

    assert fetch(running, tee_key, measurement) == SECRET

    release = running.audit.wait_for("secret_prov.release")
    assert release["measurement"] == measurement.hex()
    assert release["secret_size"] == len(SECRET)
    assert release["tee"] == "sim"
    assert release["insecure"] is True
    recorded = repr(running.audit.events)
    assert SECRET.hex() not in recorded
    assert repr(SECRET) not in recorded


def test_the_response_is_framed_exactly_as_gramines_server_frames_it(
    start_server: ServerFactory, tee_key: SimulationKey, measurement: bytes
) -> None:
    running = start_server()

    received = raw_exchange(running, *ratls_pair(tee_key, measurement), GRAMINE_REQUEST)

    assert (len(GRAMINE_REQUEST), len(GRAMINE_RESPONSE), RESPONSE_HEADER_SIZE) == (35, 37, 41)
    assert received[:37] == GRAMINE_RESPONSE
    assert received[37:41] == bytes.fromhex("0000012c")  # htonl(300)
    assert received[41:] == SECRET  # then close_notify: nothing else follows
    assert received == GRAMINE_RESPONSE + len(SECRET).to_bytes(4, "big") + SECRET


def test_connections_are_served_concurrently_and_a_silent_client_times_out(
    start_server: ServerFactory, tee_key: SimulationKey, measurement: bytes
) -> None:
    running = start_server(timeout=1.0)
    with socket.create_connection((HOST, running.port), timeout=TIMEOUT):  # never says a word
        assert fetch(running, tee_key, measurement) == SECRET
        refusal = running.audit.wait_for("secret_prov.refused")
    assert refusal["reason"] == "timeout"


# -- refusals: nothing sent, a reason audited -------------------------------------------------------


def test_evidence_for_another_measurement_is_refused_with_nothing_sent(
    start_server: ServerFactory, tee_key: SimulationKey
) -> None:
    running = start_server()
    other = measure_workload([], ["python", "modified_job.py"], root=Path.cwd())

    with pytest.raises(AttestationError) as caught:
        fetch(running, tee_key, other)
    assert caught.value.reason == "secret_prov_refused"

    refusal = running.audit.wait_for("secret_prov.refused")
    assert refusal["reason"] == "policy_violation"
    assert refusal["failed_checks"] == ["mr_enclave"]
    assert refusal["measurement"] == other.hex()
    assert "secret_prov.release" not in [event for event, _ in running.audit.events]

    assert raw_exchange(running, *ratls_pair(tee_key, other), GRAMINE_REQUEST) == b""


def test_decide_returning_none_is_a_refusal(
    start_server: ServerFactory, tee_key: SimulationKey, measurement: bytes
) -> None:
    running = start_server(decide=lambda claims: None)

    assert raw_exchange(running, *ratls_pair(tee_key, measurement), GRAMINE_REQUEST) == b""
    assert running.audit.wait_for("secret_prov.refused")["reason"] == "not_entitled"


def test_evidence_signed_by_an_untrusted_key_is_refused(start_server: ServerFactory, measurement: bytes) -> None:
    running = start_server()

    assert raw_exchange(running, *ratls_pair(SimulationKey.generate(), measurement), GRAMINE_REQUEST) == b""
    assert running.audit.wait_for("secret_prov.refused")["reason"] == "sim_key_untrusted"


def _certificate(
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    extensions: Sequence[x509.Extension[x509.ExtensionType]] = (),
) -> bytes:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclaveml")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
    )
    for ext in extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(signer, hashes.SHA256()).public_bytes(PEM)


def test_an_open_anchor_certificate_without_evidence_is_refused(start_server: ServerFactory) -> None:
    running = start_server()
    key = ec.generate_private_key(ec.SECP384R1())
    anchored = _certificate(key, open_anchor_certificate().subject, _open_anchor_key())

    assert raw_exchange(running, anchored, _key_pem(key), GRAMINE_REQUEST) == b""
    assert running.audit.wait_for("secret_prov.refused")["reason"] == "ratls_no_evidence"


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_a_client_without_a_certificate_is_refused_in_the_handshake(
    start_server: ServerFactory, tls: ssl.TLSVersion
) -> None:
    running = start_server()
    context = client_context(server_ca_pem=running.identity.ca_pem)
    context.maximum_version = tls
    received = b""
    with (
        contextlib.suppress(ConnectionError, ssl.SSLError),  # TLS 1.2 would fail in the handshake itself
        socket.create_connection((HOST, running.port), timeout=TIMEOUT) as sock,
        context.wrap_socket(sock, server_hostname=HOST) as tls,
    ):
        tls.sendall(GRAMINE_REQUEST)
        received = tls.recv(4096)

    assert received == b""
    assert running.audit.wait_for("secret_prov.refused")["reason"] == "tls_no_client_certificate"


def test_evidence_bound_to_another_key_is_refused(
    start_server: ServerFactory, tee_key: SimulationKey, measurement: bytes
) -> None:
    running = start_server()
    genuine, _ = ratls_pair(tee_key, measurement)
    copied = [ext for ext in x509.load_pem_x509_certificate(genuine).extensions if ext.oid.dotted_string != "2.5.29.35"]
    thief = ec.generate_private_key(ec.SECP384R1())
    forged = _certificate(thief, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclaveml")]), thief, copied)

    assert raw_exchange(running, forged, _key_pem(thief), GRAMINE_REQUEST) == b""
    assert running.audit.wait_for("secret_prov.refused")["reason"] == "ratls_key_binding_mismatch"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"SECRET_PROVISION_RA_TLS_REQUEST_V2\x00",  # another version
        b"SECRET_PROVISION_RA_TLS_REQUEST_V1X",  # strlen + 1 bytes, but not the NUL
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ],
)
def test_a_wrong_request_string_is_closed_without_an_answer(
    start_server: ServerFactory, tee_key: SimulationKey, measurement: bytes, request_bytes: bytes
) -> None:
    running = start_server()

    assert raw_exchange(running, *ratls_pair(tee_key, measurement), request_bytes) == b""
    refusal = running.audit.wait_for("secret_prov.refused")
    assert refusal["reason"] == "bad_request"
    assert refusal["measurement"] == measurement.hex()


def test_the_server_stops_on_shutdown(start_server: ServerFactory, tee_key: SimulationKey, measurement: bytes) -> None:
    running = start_server()
    port = running.port
    started = time.monotonic()
    running.server.shutdown()

    assert time.monotonic() - started < 5
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection((HOST, port), timeout=2).close()


# -- a stock Gramine client: its RA-TLS certificate is self-signed ---------------------------------

GRAMINE_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, "RATLS"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GramineDevelopers"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ]
)
GRAMINE_1_8 = (GRAMINE_LEGACY_QUOTE_OID, TCG_TAGGED_EVIDENCE_OID)  # Gramine >= 1.8 writes both extensions
GRAMINE_1_4 = (GRAMINE_LEGACY_QUOTE_OID,)  # 1.4 to 1.7: the legacy one only


def spki_sha256(key: ec.EllipticCurvePrivateKey) -> bytes:
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def gramine_ratls_certificate(
    evidence_for: Callable[[bytes], bytes],
    *,
    embed: Sequence[x509.ObjectIdentifier] = GRAMINE_1_8,
    binds: ec.EllipticCurvePrivateKey | None = None,
    signed_by: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Name = GRAMINE_NAME,
    alter_signature: bool = False,
) -> tuple[bytes, bytes]:
    """``(cert_pem, key_pem)`` as Gramine's ``ra_tls_attest.c`` makes them (tee-formats.md §2.2).

    A fresh P-384 key signs its own certificate (SHA-256); issuer = subject =
    ``CN=RATLS,O=GramineDevelopers,C=US``, serial 1. The legacy extension (under Gramine's
    mis-encoded OID) holds evidence over ``SHA-256(SPKI) || 0^32``; the TCG one holds
    ``tag(60000)[evidence, claims]``, that evidence over ``SHA-256(claims) || 0^32``. The
    attacks: ``binds`` hashes another key, ``signed_by`` signs with another key, ``issuer``
    names another issuer, ``embed=()`` leaves the evidence out, ``alter_signature`` flips a
    bit of the signature.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    key_hash = spki_sha256(binds or key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(GRAMINE_NAME)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(1)
        # Gramine's default window, 2001 to 2030 (RA_TLS_CERT_TIMESTAMP_NOT_AFTER moves its end).
        .not_valid_before(datetime(2001, 1, 1, tzinfo=UTC))
        .not_valid_after(max(datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC), datetime.now(UTC) + timedelta(days=1)))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    )
    for oid in embed:
        if oid == TCG_TAGGED_EVIDENCE_OID:
            claims = cbor2.dumps({"pubkey-hash": cbor2.dumps([1, key_hash])})
            evidence = evidence_for(hashlib.sha256(claims).digest() + bytes(32))
            value = cbor2.dumps(cbor2.CBORTag(TCG_EVIDENCE_CBOR_TAG, [evidence, claims]))
        else:
            value = evidence_for(key_hash + bytes(32))
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    der = bytearray(builder.sign(signed_by or key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    if alter_signature:
        der[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    return x509.load_der_x509_certificate(bytes(der)).public_bytes(PEM), _key_pem(key)


def gramine_client(
    running: Running, cert_pem: bytes, key_pem: bytes, tmp_path: Path, tls: ssl.TLSVersion
) -> ssl.SSLContext:
    """A plain TLS client that presents the certificate as it is, as libsecret_prov_attest does.

    It verifies the server by the CA and host name (``SECRET_PROVISION_CA_CHAIN_PATH``); no
    open anchor is involved.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = tls
    context.load_verify_locations(cadata=running.identity.ca_pem.decode())
    chain = tmp_path / "ratls-cert-and-key.pem"
    chain.write_bytes(cert_pem + key_pem)
    context.load_cert_chain(chain)
    return context


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("embed", [GRAMINE_1_8, GRAMINE_1_4], ids=["gramine-1.8", "gramine-1.4"])
def test_a_gramine_client_presenting_a_self_signed_ratls_certificate_receives_the_secret(
    start_server: ServerFactory,
    tee_key: SimulationKey,
    measurement: bytes,
    tmp_path: Path,
    tls: ssl.TLSVersion,
    embed: Sequence[x509.ObjectIdentifier],
) -> None:
    running = start_server()
    cert_pem, key_pem = gramine_ratls_certificate(sim_evidence_for(tee_key, measurement), embed=embed)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.issuer == cert.subject == GRAMINE_NAME
    cert.verify_directly_issued_by(cert)  # really self-signed: no open anchor anywhere

    received = exchange(running, gramine_client(running, cert_pem, key_pem, tmp_path, tls), GRAMINE_REQUEST)

    assert received == GRAMINE_RESPONSE + len(SECRET).to_bytes(4, "big") + SECRET
    release = running.audit.wait_for("secret_prov.release")
    assert release["measurement"] == measurement.hex()
    assert release["secret_size"] == len(SECRET)


def _p384() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.mark.parametrize(
    ("defect", "reason"),
    [
        pytest.param(lambda: {"binds": _p384()}, "ratls_key_binding_mismatch", id="evidence_binds_another_key"),
        pytest.param(lambda: {"embed": ()}, "ratls_no_evidence", id="no_ratls_extension"),
        pytest.param(lambda: {"alter_signature": True}, "ratls_certificate_signature_invalid", id="signature_altered"),
        pytest.param(lambda: {"signed_by": _p384()}, "ratls_certificate_signature_invalid", id="signed_by_another_key"),
        pytest.param(
            lambda: {"signed_by": _p384(), "issuer": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some CA")])},
            "ratls_certificate_issuer_unknown",
            id="issued_by_an_unknown_ca",
        ),
    ],
)
def test_a_defective_self_signed_certificate_is_refused_with_nothing_sent(
    start_server: ServerFactory,
    tee_key: SimulationKey,
    measurement: bytes,
    tmp_path: Path,
    defect: Callable[[], dict[str, Any]],
    reason: str,
) -> None:
    running = start_server()
    # Apart from its one defect, each certificate carries valid evidence of the trusted workload.
    cert_pem, key_pem = gramine_ratls_certificate(sim_evidence_for(tee_key, measurement), **defect())
    context = gramine_client(running, cert_pem, key_pem, tmp_path, ssl.TLSVersion.MAXIMUM_SUPPORTED)

    assert exchange(running, context, GRAMINE_REQUEST) == b""

    refusal = running.audit.wait_for("secret_prov.refused")
    assert refusal["reason"] == reason
    assert "measurement" not in refusal  # refused before the evidence counted for anything
    assert "secret_prov.release" not in [event for event, _ in running.audit.events]


# -- the CLI in a subprocess ------------------------------------------------------------------------


def run_fetch(running: Running, tmp_path: Path, workload: Path, key: SimulationKey, *more: str) -> Any:
    (tmp_path / "ca.pem").write_bytes(running.identity.ca_pem)
    key_file = tmp_path / "sim-key.pem"
    key_file.write_bytes(key.to_pem())
    args = ["secret-prov", "fetch", "--host", HOST, "--port", str(running.port), "--ca", str(tmp_path / "ca.pem"),
            "--tee", "sim", "--sim-key", str(key_file), "--root", str(workload),
            "-o", str(tmp_path / "secret.bin"), *more]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([ENCLAVEML, *args], env=env, capture_output=True, text=True, check=False, timeout=60)


def test_the_cli_writes_the_secret_file(
    start_server: ServerFactory, tee_key: SimulationKey, workload: Path, tmp_path: Path
) -> None:
    running = start_server()

    done = run_fetch(running, tmp_path, workload, tee_key, "--measure", "job.py")

    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # the secret is never printed
    written = tmp_path / "secret.bin"
    assert written.read_bytes() == SECRET
    assert written.stat().st_mode & 0o777 == 0o600


def test_the_cli_exits_3_with_one_error_line_and_no_file_on_refusal(
    start_server: ServerFactory, tee_key: SimulationKey, workload: Path, tmp_path: Path
) -> None:
    running = start_server()

    done = run_fetch(running, tmp_path, workload, tee_key, "--measure", "job.py", "--", "python", "job.py")

    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert "refused to provision the secret" in lines[0]
    assert not (tmp_path / "secret.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".secret.bin")] == []
    assert running.audit.wait_for("secret_prov.refused")["reason"] == "policy_violation"


def test_the_cli_help_shows_an_example() -> None:
    done = subprocess.run([ENCLAVEML, "secret-prov", "fetch", "--help"], capture_output=True, text=True, check=True)
    assert "Example:" in done.stdout
    assert "--tee sim" in done.stdout


def test_the_cli_takes_real_evidence_from_the_tee_it_runs_in_and_never_falls_back_to_simulation(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    running = start_server()
    output = tmp_path / "secret.bin"
    args = ["secret-prov", "fetch", "--host", HOST, "--port", str(running.port), "--tee", "sgx", "-o", str(output)]

    done = subprocess.run([ENCLAVEML, *args], capture_output=True, text=True, check=False, timeout=60)

    assert done.returncode == 2, done.stderr  # tests never run inside a Gramine enclave
    assert done.stderr.startswith("error: no SGX found"), done.stderr
    assert not output.exists()
