"""RA-TLS certificates: a TLS key whose certificate carries TEE evidence bound to that key.

Gramine compatible (tee-formats.md §2.2, §2.4; layout in ``docs/attestation/ratls.md``). The
legacy extension holds raw evidence with ``report_data[0:32] = SHA-256(DER SPKI)``; Gramine
writes its OID mis-encoded (``GRAMINE_LEGACY_QUOTE_OID``). The TCG DICE extension holds CBOR
``tag(60000)[evidence, claims]``, ``claims = {"pubkey-hash": bstr([alg-id, H(SPKI)])}``, and
that *separate* evidence has ``report_data[0:32] = SHA-256(claims)``. Verification prefers
the TCG extension, as Gramine does. Pure core: no sockets (``ratls_tls`` has them), time is
an argument, and the evidence itself is checked by an injected ``EvidenceVerifier``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, get_args

import cbor2
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from enclaveml.attestation.claims import Claims
from enclaveml.attestation.sim import EVIDENCE_MAGIC, SimEvidence
from enclaveml.errors import AttestationError, EvidenceParseError

__all__ = [
    "DEFAULT_VALIDITY",
    "GRAMINE_LEGACY_QUOTE_OID",
    "LEGACY_QUOTE_OID",
    "MAX_EVIDENCE_SIZE",
    "TCG_EVIDENCE_CBOR_TAG",
    "TCG_TAGGED_EVIDENCE_OID",
    "Evidence",
    "EvidenceKind",
    "EvidenceVerifier",
    "ExtractedEvidence",
    "PolicyCheck",
    "create_ratls_certificate",
    "extract_evidence",
    "parse_evidence",
    "verify_ratls_certificate",
]

logger = logging.getLogger("enclaveml.attestation")

LEGACY_QUOTE_OID = x509.ObjectIdentifier("1.2.840.113741.1337.6")
# Gramine hands mbedTLS the DER bytes 06 09 2A 86 48 86 F8 4D 8A 39 06 as the OID *content*,
# so its certificates carry 06 0B 06 09 ..., which parses as this OID (§2.2).
GRAMINE_LEGACY_QUOTE_OID = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
TCG_TAGGED_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
TCG_EVIDENCE_CBOR_TAG = 60000
MAX_EVIDENCE_SIZE = 65535  # Gramine's legacy parser reads a two-byte length
DEFAULT_VALIDITY = timedelta(days=90)
_CLOCK_SKEW = timedelta(minutes=5)  # not_before is back-dated so peers with slow clocks accept
_LEGACY_OIDS = (GRAMINE_LEGACY_QUOTE_OID, LEGACY_QUOTE_OID)  # preference order
# IANA "Named Information Hash Algorithm" ids Gramine's verifier accepts in "pubkey-hash".
_HASH_BY_ALG_ID = {1: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}

EvidenceKind = Literal["sgx-quote", "tdx-quote", "sim"]


@dataclass(frozen=True)
class Evidence:
    """One piece of evidence taken from a certificate: its kind, bytes and extension OID."""

    kind: EvidenceKind
    raw: bytes = field(repr=False)
    oid: str  # dotted OID of the extension it came from
    report_data: bytes = field(repr=False)  # as parsed, *not* verified


EvidenceVerifier = Callable[[Evidence, datetime], Claims]
"""Checks evidence at a time and returns its claims, or raises ``AttestationError``."""
PolicyCheck = Callable[[Claims], object]
"""Raises (e.g. ``PolicyError``) unless the claims are acceptable; its return value is ignored."""


@dataclass(frozen=True)
class ExtractedEvidence:
    """The evidence of a certificate and whether its report data binds the certificate key.

    ``binding`` names the equality checked; ``expected_binding`` is what it requires and
    ``actual_binding`` what the certificate holds. Nothing here is verified cryptographically.
    """

    evidence: Evidence
    key_binding_ok: bool
    binding: str
    expected_binding: bytes
    actual_binding: bytes
    public_key_hash: bytes  # SHA-256 of the certificate's DER SubjectPublicKeyInfo
    tcg_claims: bytes | None = None  # the serialised claims map (TCG extension only)
    present_oids: tuple[str, ...] = ()  # every evidence extension the certificate carries

    @property
    def oid(self) -> str:
        return self.evidence.oid


# -- creation ----------------------------------------------------------------------------


def create_ratls_certificate(
    evidence_for: Callable[[bytes], bytes],
    *,
    kind: EvidenceKind,
    now: datetime,
    common_name: str = "enclaveml",
    validity: timedelta = DEFAULT_VALIDITY,
    embed: Sequence[x509.ObjectIdentifier] = (GRAMINE_LEGACY_QUOTE_OID, TCG_TAGGED_EVIDENCE_OID),
) -> tuple[bytes, bytes]:
    """A fresh P-384 key and its self-signed RA-TLS certificate, as ``(cert_pem, key_pem)``.

    ``evidence_for(report_data)`` must return evidence of ``kind`` over those 64 bytes; it
    is called once per extension in ``embed`` (the TCG extension binds a different report
    data). The key PEM is unencrypted PKCS#8: keep it in TEE memory.
    """
    if kind not in get_args(EvidenceKind):
        raise ValueError(f"unknown evidence kind {kind!r}")
    _require_aware(now)
    known, legacy = (*_LEGACY_OIDS, TCG_TAGGED_EVIDENCE_OID), [oid for oid in embed if oid in _LEGACY_OIDS]
    if not embed or len(set(embed)) != len(embed) or len(legacy) > 1 or any(oid not in known for oid in embed):
        raise ValueError("embed names TCG_TAGGED_EVIDENCE_OID and/or one legacy OID, each once")
    key = ec.generate_private_key(ec.SECP384R1())
    key_hash = hashlib.sha256(_spki(key.public_key())).digest()

    def bound(report_data: bytes, oid: x509.ObjectIdentifier) -> bytes:
        evidence = evidence_for(report_data + bytes(32))
        if len(evidence) > MAX_EVIDENCE_SIZE:
            raise ValueError(f"evidence of {len(evidence)} bytes exceeds {MAX_EVIDENCE_SIZE}")
        parsed = parse_evidence(evidence, oid.dotted_string, "evidence")
        if parsed.kind != kind:
            raise ValueError(f"evidence_for returned {parsed.kind} evidence, not {kind}")
        if not hmac.compare_digest(parsed.report_data[:32], report_data):
            raise AttestationError(
                "ratls_key_binding_mismatch",
                "the TEE returned evidence whose report data is not the one requested",
                "check that the TEE adapter writes user_report_data before reading the quote",
            )
        return evidence

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    )
    for oid in embed:
        if oid == TCG_TAGGED_EVIDENCE_OID:
            claims = cbor2.dumps({"pubkey-hash": cbor2.dumps([1, key_hash])})
            quote = bound(hashlib.sha256(claims).digest(), oid)
            value = cbor2.dumps(cbor2.CBORTag(TCG_EVIDENCE_CBOR_TAG, [quote, claims]))
        else:
            value = bound(key_hash, oid)
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    cert = builder.sign(key, hashes.SHA256())  # Gramine signs with SHA-256 as well
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# -- extraction --------------------------------------------------------------------------


def extract_evidence(cert: bytes | x509.Certificate) -> ExtractedEvidence:
    """The evidence a certificate (PEM, DER or parsed) carries, and its key binding.

    Raises ``EvidenceParseError`` for a malformed certificate or extension and
    ``AttestationError`` (``ratls_no_evidence``) when no evidence extension is present.
    """
    certificate = _load_certificate(cert)
    try:
        extensions = {ext.oid: ext.value for ext in certificate.extensions}
    except ValueError as exc:  # includes x509.DuplicateExtension
        raise EvidenceParseError("extensions", 0, f"unreadable certificate extensions: {exc}") from exc
    found = {oid: v.value for oid, v in extensions.items() if isinstance(v, x509.UnrecognizedExtension)}
    present = tuple(o.dotted_string for o in (TCG_TAGGED_EVIDENCE_OID, *_LEGACY_OIDS) if o in found)
    spki = _spki(certificate)
    key_hash = hashlib.sha256(spki).digest()
    if TCG_TAGGED_EVIDENCE_OID in found:
        raw, claims = _parse_tcg_extension(found[TCG_TAGGED_EVIDENCE_OID])
        evidence = parse_evidence(raw, TCG_TAGGED_EVIDENCE_OID.dotted_string, "tcg_evidence")
        alg_id, claimed = _parse_pubkey_hash_claim(claims)
        expected_key_hash = _HASH_BY_ALG_ID[alg_id](spki).digest()
        if not hmac.compare_digest(claimed, expected_key_hash):
            binding = "claims pubkey-hash = H(SPKI)"
            return ExtractedEvidence(evidence, False, binding, expected_key_hash, claimed, key_hash, claims, present)
        binding, expected = "report_data[0:32] = SHA-256(claims)", hashlib.sha256(claims).digest()
    else:
        oid = next((o for o in _LEGACY_OIDS if o in found), None)
        if oid is None:
            raise AttestationError(
                "ratls_no_evidence",
                "the certificate carries no RA-TLS evidence extension",
                "the peer is not an RA-TLS endpoint; is it running inside the TEE?",
            )
        evidence = parse_evidence(found[oid], oid.dotted_string, "legacy_evidence")
        binding, expected, claims = "report_data[0:32] = SHA-256(SPKI)", key_hash, None
    actual = evidence.report_data[:32]
    ok = hmac.compare_digest(actual, expected)
    return ExtractedEvidence(evidence, ok, binding, expected, actual, key_hash, claims, present)


def _load_certificate(cert: bytes | x509.Certificate) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise EvidenceParseError("certificate", 0, "not a PEM or DER X.509 certificate") from exc


def _spki(key_of: x509.Certificate | ec.EllipticCurvePublicKey) -> bytes:
    """DER SubjectPublicKeyInfo, as mbedTLS ``pk_write_pubkey_der`` writes it (EC points uncompressed)."""
    try:
        public_key = key_of.public_key() if isinstance(key_of, x509.Certificate) else key_of
    except (ValueError, UnsupportedAlgorithm):
        public_key = None
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise AttestationError(
            "ratls_unsupported_key",
            f"RA-TLS certificate key ({type(public_key).__name__}) is not an EC or RSA key",
            "RA-TLS keys are ECDSA P-384 (Gramine >= 1.4) or RSA-3072 (Gramine 1.3)",
        )
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_evidence(raw: bytes, oid: str, field_name: str) -> Evidence:
    """Recognise the kind of ``raw`` and read its report data (tee-formats.md §1.2–1.4)."""
    if len(raw) > MAX_EVIDENCE_SIZE:
        raise EvidenceParseError(field_name, 0, f"evidence of {len(raw)} bytes exceeds {MAX_EVIDENCE_SIZE}")
    if raw.startswith(EVIDENCE_MAGIC):
        return Evidence("sim", raw, oid, SimEvidence.from_bytes(raw).report_data)
    if len(raw) < 48:
        raise EvidenceParseError(field_name, 0, f"{len(raw)} bytes are neither a DCAP quote nor simulated evidence")
    version, tee_type = struct.unpack_from("<H2xI", raw, 0)
    kind: EvidenceKind
    if version == 3 or (version == 4 and tee_type == 0):
        kind, offset = "sgx-quote", 48 + 320
    elif version == 4 and tee_type == 0x81:
        kind, offset = "tdx-quote", 48 + 520
    elif version == 5 and len(raw) >= 54:
        body_type, body_size = struct.unpack_from("<HI", raw, 48)
        if (body_type, body_size) not in ((1, 384), (2, 584), (3, 648)):
            raise EvidenceParseError(field_name, 48, f"quote v5 body type {body_type} of {body_size} bytes")
        kind, offset = ("sgx-quote", 54 + 320) if body_type == 1 else ("tdx-quote", 54 + 520)
    else:
        raise EvidenceParseError(field_name, 0, f"unsupported quote version {version} / TEE type {tee_type:#x}")
    if len(raw) < offset + 64:
        raise EvidenceParseError(field_name, len(raw), f"quote truncated before its report data at {offset}")
    return Evidence(kind, raw, oid, raw[offset : offset + 64])


# A deliberately tiny CBOR reader: definite lengths only, no semantic tags decoded, nesting
# bounded. A general decoder would interpret tags (dates, regexes, ...) in untrusted input.
class _Cbor:
    def __init__(self, data: bytes, field_name: str) -> None:
        self.data, self.pos, self.field = data, 0, field_name

    def fail(self, what: str) -> EvidenceParseError:
        return EvidenceParseError(self.field, self.pos, what)

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.pos:
            raise self.fail(f"CBOR truncated: needs {size} bytes")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def head(self) -> tuple[int, int]:
        initial = self.take(1)[0]
        major, info = initial >> 5, initial & 31
        if info < 24:
            return major, info
        if info > 27:
            raise self.fail(f"CBOR indefinite or reserved length (initial byte {initial:#04x})")
        return major, int.from_bytes(self.take(1 << (info - 24)), "big")

    def expect(self, major: int, what: str) -> int:
        got, arg = self.head()
        if got != major:
            raise self.fail(f"expected {what}, got CBOR major type {got}")
        return arg

    def skip(self, depth: int = 0) -> None:
        if depth > 16:
            raise self.fail("CBOR nested too deeply")
        major, arg = self.head()
        if major in (2, 3):
            self.take(arg)
        elif major in (4, 5):
            for _ in range(arg * (major - 3)):  # each item takes >= 1 byte, so this ends
                self.skip(depth + 1)
        elif major == 6:
            self.skip(depth + 1)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} trailing bytes after the CBOR item")


def _parse_tcg_extension(value: bytes) -> tuple[bytes, bytes]:
    """``tag(60000)[bstr evidence, bstr claims]`` -> (evidence, claims)."""
    reader = _Cbor(value, "tcg_evidence")
    if (tag := reader.expect(6, "a CBOR tag")) != TCG_EVIDENCE_CBOR_TAG:
        raise reader.fail(f"CBOR tag {tag}, expected {TCG_EVIDENCE_CBOR_TAG}")
    if (items := reader.expect(4, "an array")) != 2:
        raise reader.fail(f"tagged evidence has {items} items, expected 2 (evidence, claims)")
    evidence = reader.take(reader.expect(2, "the evidence byte string"))
    claims = reader.take(reader.expect(2, "the claims byte string"))
    reader.end()
    return evidence, claims


def _parse_pubkey_hash_claim(claims: bytes) -> tuple[int, bytes]:
    """``{"pubkey-hash": bstr([alg-id, bstr hash]), ...}`` -> (alg-id, hash); other claims ignored."""
    reader = _Cbor(claims, "tcg_claims")
    found: bytes | None = None
    for _ in range(reader.expect(5, "a claims map")):
        start = reader.pos
        major, arg = reader.head()
        if major == 3:
            key = reader.take(arg)
        else:  # claims are keyed by text; anything else is an unknown claim
            reader.pos, key = start, None
            reader.skip()
        if key == b"pubkey-hash":
            if found is not None:
                raise reader.fail("duplicate pubkey-hash claim")
            found = reader.take(reader.expect(2, "the pubkey-hash byte string"))
        else:
            reader.skip()
    reader.end()
    if found is None:
        raise EvidenceParseError("tcg_claims", 0, "the claims carry no pubkey-hash")
    inner = _Cbor(found, "pubkey_hash")
    if (items := inner.expect(4, "an array")) != 2:
        raise inner.fail(f"pubkey-hash has {items} items, expected 2 (alg-id, hash)")
    alg_id = inner.expect(0, "an unsigned hash algorithm id")
    digest = inner.take(inner.expect(2, "the hash byte string"))
    inner.end()
    if alg_id not in _HASH_BY_ALG_ID:
        raise inner.fail(f"unsupported pubkey-hash algorithm id {alg_id} (1, 7 and 8 are)")
    if len(digest) != _HASH_BY_ALG_ID[alg_id]().digest_size:
        raise inner.fail(f"pubkey-hash of {len(digest)} bytes does not fit algorithm id {alg_id}")
    return alg_id, digest


# -- verification ------------------------------------------------------------------------


def verify_ratls_certificate(
    cert: bytes | x509.Certificate,
    verifier: EvidenceVerifier,
    *,
    now: datetime,
    policy_check: PolicyCheck | None,
) -> Claims:
    """Verify an RA-TLS certificate into the claims of the TEE that holds its key.

    The certificate alone proves only that *some* TEE created the key; a TLS handshake
    (``ratls_tls``) proves the peer holds it. Its signature is not checked: a self-signature
    adds nothing to that proof of possession, and Gramine does not check it either.
    ``policy_check`` (e.g. ``lambda c: policy.verify(c, now=now)``) is required by keyword;
    ``None`` accepts any TEE identity and should be used only with a verifier that pins it.
    """
    _require_aware(now)
    certificate = _load_certificate(cert)
    # 1. Extract the evidence (TCG extension first, then legacy) and check the key binding.
    extracted = extract_evidence(certificate)
    if not extracted.key_binding_ok:
        raise AttestationError(
            "ratls_key_binding_mismatch",
            f"evidence under {extracted.oid} is not bound to the certificate key: {extracted.binding} "
            f"expected {extracted.expected_binding.hex()}, found {extracted.actual_binding.hex()}",
            "the evidence was made for another key; the certificate may be forged",
        )
    # 2. The certificate's own validity window.
    if now < certificate.not_valid_before_utc:
        raise AttestationError(
            "ratls_certificate_not_yet_valid",
            f"RA-TLS certificate is valid only from {certificate.not_valid_before_utc.isoformat()}",
            "check the clocks of both peers",
        )
    if now > certificate.not_valid_after_utc:
        raise AttestationError(
            "ratls_certificate_expired",
            f"RA-TLS certificate expired at {certificate.not_valid_after_utc.isoformat()}",
            "restart the workload so that it creates a fresh certificate",
        )
    # 3. The evidence itself: signature chain, TCB, freshness, as the verifier defines them.
    claims = verifier(extracted.evidence, now)
    # 4. Defence in depth: the *verified* report data must carry the same binding.
    if not hmac.compare_digest(claims.report_data[:32], extracted.expected_binding):
        raise AttestationError(
            "ratls_key_binding_mismatch",
            f"verified report data {claims.report_data[:32].hex()} differs from the binding "
            f"{extracted.expected_binding.hex()}",
            "the evidence verifier returned claims for other evidence",
        )
    # 5. Who the workload is: reference values, TCB status, debug, simulation.
    if policy_check is not None:
        policy_check(claims)
    if claims.insecure:
        logger.warning("INSECURE: accepted RA-TLS evidence from a %s TEE (%s)", claims.tee, claims.source)
    return claims


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
