"""The simulated TEE: a workload measurement and evidence signed by a per-host key.

Simulation proves nothing about the host (anyone holding the key can sign anything); it
still measures the workload, so a changed job gets no keys. Claims from simulated
evidence are always ``insecure`` and a policy accepts them only with
``allow_simulation = true``. Byte-exact definitions: ``docs/attestation/sim-and-policy.md``.

Measurement (SHA-384, 48 bytes; note: *not* SHA-256 like an SGX MRENCLAVE)::

    SHA-384( "enclaveml-sim-measurement-v1\\0"
             ‖ u32be(n_files) ‖ for each file, sorted by path bytes:
                   u32be(len(path)) ‖ path ‖ SHA-384(content)
             ‖ u32be(n_args)  ‖ for each argument: u32be(len(arg)) ‖ arg )

Evidence v1 (big-endian integers; the Ed25519 signature covers every byte before it)::

    offset      size  field
    0           8     magic "EMLSIMEV"
    8           2     version = 1
    10          48    measurement
    58          64    report_data
    122         1     nonce length N (0..64)
    123         N     nonce
    123+N       8     issued_at, u64 seconds since the Unix epoch
    131+N       32    signer Ed25519 public key (raw)
    163+N       64    Ed25519 signature over bytes [0, 163+N)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.errors import AttestationError, ConfigError, EvidenceParseError

__all__ = [
    "EVIDENCE_MAGIC",
    "EVIDENCE_VERSION",
    "MAX_CLOCK_SKEW_S",
    "MEASUREMENT_LABEL",
    "SimEvidence",
    "SimulationKey",
    "create_sim_evidence",
    "load_sim_public_key",
    "measure_workload",
    "verify_sim_evidence",
]

MEASUREMENT_LABEL = b"enclaveml-sim-measurement-v1\x00"
EVIDENCE_MAGIC = b"EMLSIMEV"
EVIDENCE_VERSION = 1
MEASUREMENT_SIZE = 48
REPORT_DATA_SIZE = 64
MAX_NONCE_SIZE = 64
MAX_CLOCK_SKEW_S = 60  # evidence issued this far after `now` is still accepted
_PUBLIC_KEY_SIZE = 32
_SIGNATURE_SIZE = 64
_CHUNK = 1 << 20


# -- measurement -------------------------------------------------------------------------


def measure_workload(files: Iterable[Path], command: Sequence[str], *, root: Path) -> bytes:
    """SHA-384 measurement of ``files`` (under ``root``) and the ``command`` argv.

    Relative entries in ``files`` are taken relative to ``root``; every entry must lie
    under ``root``. Directories expand recursively to every file beneath them (symbolic
    links are followed; a link cycle is an error). Listing order and duplicates do not
    change the result; any content byte, file name or argument does.
    """
    collected: dict[bytes, Path] = {}
    for entry in files:
        _collect(root / entry, root, collected, active=frozenset())
    out = bytearray(MEASUREMENT_LABEL)
    out += struct.pack(">I", len(collected))
    for rel in sorted(collected):
        out += struct.pack(">I", len(rel)) + rel + _sha384_file(collected[rel])
    out += struct.pack(">I", len(command))
    for arg in command:
        raw = arg.encode("utf-8", "surrogateescape")
        out += struct.pack(">I", len(raw)) + raw
    return hashlib.sha384(bytes(out)).digest()


def _collect(path: Path, root: Path, into: dict[bytes, Path], *, active: frozenset[str]) -> None:
    rel = _relative_posix(path, root)
    if path.is_dir():
        real = os.path.realpath(path)
        if real in active:
            raise ConfigError(f"symbolic link cycle at {rel!r}", "remove the link loop from the workload")
        for child in sorted(path.iterdir()):
            _collect(child, root, into, active=active | {real})
    elif path.is_file():
        into[os.fsencode(rel)] = path
    else:
        raise ConfigError(
            f"cannot measure {rel!r}: not a regular file or directory",
            "list only existing files and directories of the workload",
        )


def _relative_posix(path: Path, root: Path) -> str:
    rel = os.path.relpath(os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root)))
    if rel == os.curdir:
        return rel
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise ConfigError(f"{path} is outside the workload root {root}", "list only files under --root")
    return Path(rel).as_posix()


def _sha384_file(path: Path) -> bytes:
    digest = hashlib.sha384()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


# -- the simulation key ------------------------------------------------------------------


class SimulationKey:
    """An Ed25519 key that signs this host's simulated evidence. Callers store the PEM."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key

    @classmethod
    def generate(cls) -> SimulationKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> SimulationKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError("simulation key is not a readable PEM private key", "regenerate the key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("simulation key is not an Ed25519 key", "regenerate the key")
        return cls(key)

    def to_pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted: store it with mode 0600."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)


def load_sim_public_key(pem: bytes) -> Ed25519PublicKey:
    """A trusted simulation public key from PEM (SubjectPublicKeyInfo)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ConfigError("not a readable PEM public key", "export it with SimulationKey.public_pem()") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("simulation public key is not an Ed25519 key", "export it with SimulationKey.public_pem()")
    return key


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- evidence ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SimEvidence:
    """Parsed simulated evidence. ``from_bytes`` parses only; nothing here is verified."""

    version: int
    measurement: bytes
    report_data: bytes
    nonce: bytes
    issued_at: int  # seconds since the Unix epoch
    signer: bytes  # raw Ed25519 public key
    signature: bytes

    def signed_bytes(self) -> bytes:
        """The canonical encoding the signature covers (every byte before it)."""
        return (
            EVIDENCE_MAGIC
            + struct.pack(">H", self.version)
            + self.measurement
            + self.report_data
            + bytes([len(self.nonce)])
            + self.nonce
            + struct.pack(">Q", self.issued_at)
            + self.signer
        )

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> SimEvidence:
        reader = _Reader(data)
        if reader.take("magic", len(EVIDENCE_MAGIC)) != EVIDENCE_MAGIC:
            raise EvidenceParseError("magic", 0, "not simulated enclaveml evidence")
        (version,) = struct.unpack(">H", reader.take("version", 2))
        if version != EVIDENCE_VERSION:
            raise EvidenceParseError("version", 8, f"unsupported simulated evidence version {version}")
        measurement = reader.take("measurement", MEASUREMENT_SIZE)
        report_data = reader.take("report_data", REPORT_DATA_SIZE)
        nonce_len = reader.take("nonce_length", 1)[0]
        if nonce_len > MAX_NONCE_SIZE:
            raise EvidenceParseError("nonce_length", reader.offset - 1, f"nonce of {nonce_len} bytes exceeds 64")
        nonce = reader.take("nonce", nonce_len)
        (issued_at,) = struct.unpack(">Q", reader.take("issued_at", 8))
        signer = reader.take("signer", _PUBLIC_KEY_SIZE)
        signature = reader.take("signature", _SIGNATURE_SIZE)
        if reader.offset != len(data):
            raise EvidenceParseError("trailing", reader.offset, f"{len(data) - reader.offset} bytes after signature")
        return cls(version, measurement, report_data, nonce, issued_at, signer, signature)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.offset = 0

    def take(self, field: str, size: int) -> bytes:
        if self.offset + size > len(self._data):
            raise EvidenceParseError(field, self.offset, f"truncated: needs {size} bytes")
        chunk = self._data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def create_sim_evidence(
    key: SimulationKey, measurement: bytes, report_data: bytes, nonce: bytes, now: datetime
) -> bytes:
    """Sign ``measurement`` and ``report_data`` (and the verifier's ``nonce``) at ``now``."""
    if len(measurement) != MEASUREMENT_SIZE:
        raise ValueError(f"measurement must be {MEASUREMENT_SIZE} bytes, got {len(measurement)}")
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    if len(nonce) > MAX_NONCE_SIZE:
        raise ValueError(f"nonce must be at most {MAX_NONCE_SIZE} bytes, got {len(nonce)}")
    issued_at = int(now.timestamp())
    if issued_at < 0:
        raise ValueError("now is before the Unix epoch")
    unsigned = SimEvidence(EVIDENCE_VERSION, measurement, report_data, nonce, issued_at, _raw(key.public_key), b"")
    return unsigned.signed_bytes() + key.sign(unsigned.signed_bytes())


def verify_sim_evidence(
    evidence: bytes,
    *,
    trusted_keys: Sequence[Ed25519PublicKey] | None,
    expected_nonce: bytes | None,
    now: datetime,
    max_age_s: int = 300,
) -> Claims:
    """Verify simulated evidence into insecure ``Claims`` (tee ``sim``, status ``Simulated``).

    Steps, in order: parse (``malformed_evidence``); signature by the embedded key
    (``sim_signature_invalid``); signer in ``trusted_keys`` unless that is ``None``
    (``sim_key_untrusted``); nonce equals ``expected_nonce`` unless that is ``None``
    (``nonce_mismatch``); issued at most ``max_age_s`` before ``now``
    (``evidence_expired``) and at most ``MAX_CLOCK_SKEW_S`` after it
    (``evidence_not_yet_valid``). ``mr_enclave`` holds the 48-byte SHA-384 measurement.
    """
    # 1. Parse. Malformed input never reaches the signature check.
    parsed = SimEvidence.from_bytes(evidence)
    # 2. Signature over the canonical encoding, by the key the evidence names.
    try:
        Ed25519PublicKey.from_public_bytes(parsed.signer).verify(parsed.signature, parsed.signed_bytes())
    except (InvalidSignature, ValueError) as exc:
        raise AttestationError(
            "sim_signature_invalid", "simulated evidence signature is invalid", "the evidence was modified in transit"
        ) from exc
    fingerprint = hashlib.sha256(parsed.signer).hexdigest()
    # 3. The signer must be one of this verifier's trusted simulation keys.
    if trusted_keys is not None and not any(hmac.compare_digest(parsed.signer, _raw(k)) for k in trusted_keys):
        raise AttestationError(
            "sim_key_untrusted",
            f"simulation key sha256:{fingerprint[:16]} is not trusted",
            "add the host's simulation public key to the trusted keys",
        )
    # 4. Freshness: the verifier's nonce, then the evidence age.
    if expected_nonce is not None and not hmac.compare_digest(parsed.nonce, expected_nonce):
        raise AttestationError(
            "nonce_mismatch",
            f"evidence nonce {parsed.nonce.hex() or '(empty)'} differs from the expected {expected_nonce.hex()}",
            "request fresh evidence for this challenge",
        )
    age = int(now.timestamp()) - parsed.issued_at
    issued = datetime.fromtimestamp(parsed.issued_at, UTC).isoformat()
    if age > max_age_s:
        raise AttestationError(
            "evidence_expired",
            f"evidence issued at {issued} is {age} s old, older than {max_age_s} s",
            "request fresh evidence; check both clocks",
        )
    if age < -MAX_CLOCK_SKEW_S:
        raise AttestationError(
            "evidence_not_yet_valid",
            f"evidence issued at {issued} is {-age} s in the future",
            "check the clocks of the workload host and the verifier",
        )
    return Claims(
        tee=TeeType.SIM,
        source="sim",
        report_data=parsed.report_data,
        debug=False,
        tcb_status=TcbStatus.SIMULATED,
        mr_enclave=parsed.measurement,
        insecure=True,
        extra={"sim_signer_sha256": fingerprint, "sim_issued_at": issued},
    )
