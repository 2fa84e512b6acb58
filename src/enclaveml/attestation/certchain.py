"""Certificate chains and CRLs checked against a pinned root, the way Intel's PKI is shaped.

Intel's DCAP PKI is short and fixed, so chains are checked by hand rather than by a general
path builder: each certificate is signed by the next, every issuer is a CA, every certificate
is valid at ``now``, and the chain ends in the pinned root (byte for byte when the chain
carries its own root, else by signature). Each failure is an ``AttestationError`` whose
reason the caller chooses, so the verifier can say *which* chain failed.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from enclaveml.errors import AttestationError

__all__ = [
    "check_crl",
    "check_not_revoked",
    "check_pinned_root",
    "check_same_root",
    "common_name",
    "fingerprint",
    "load_pem_chain",
    "verify_chain",
]


def load_pem_chain(pem: bytes) -> tuple[x509.Certificate, ...]:
    """Certificates from PEM text, every field the verifier reads decoded up front.

    ``cryptography`` decodes lazily and signals malformed DER with several unrelated exception
    types; all of them become one ``ValueError`` here, so parsers can map it to their own error.
    """
    try:
        certificates = tuple(x509.load_pem_x509_certificates(pem))
        for cert in certificates:
            _ = (cert.subject, cert.issuer, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc)
            _ = (cert.extensions, cert.public_key(), cert.signature_hash_algorithm)
    except ValueError:
        raise
    except Exception as exc:  # InvalidVersion, DuplicateExtension, UnsupportedAlgorithm, ...
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    return certificates


def load_crl(text: str) -> x509.CertificateRevocationList:
    """A CRL from hex DER or PEM text, decoded up front (``ValueError`` when malformed)."""
    try:
        if text.lstrip().startswith("-----BEGIN"):
            crl = x509.load_pem_x509_crl(text.encode("ascii"))
        else:
            crl = x509.load_der_x509_crl(bytes.fromhex(text))
        _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.signature_hash_algorithm, crl.extensions)
        _ = [(entry.serial_number, entry.revocation_date_utc) for entry in crl]
    except ValueError:
        raise
    except Exception as exc:  # UnicodeEncodeError, unsupported algorithms, ...
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    return crl


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex."""
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(values[0].value) if values else name.rfc4514_string()


def verify_chain(
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    *,
    now: datetime,
    what: str,
    reason: str,
    length: int,
) -> tuple[x509.Certificate, ...]:
    """Verify ``chain`` (leaf first) up to ``root``; returns the path leaf ... root.

    ``length`` is the number of certificates from leaf to root inclusive that Intel's PKI
    has for this chain (2 for TCB Signing, 3 for PCK). A chain that carries a self-issued
    last certificate other than ``root`` fails with ``root_ca_mismatch``.
    """
    certs = list(chain)
    if certs and certs[-1].subject == certs[-1].issuer:
        check_same_root(certs.pop(), root, what=what)
    path = (*certs, root)
    if len(path) != length:
        raise AttestationError(reason, f"{what} has {len(path)} certificates up to the root, expected {length}")
    for child, issuer in itertools.pairwise(path):
        _check_issued_by(child, issuer, what=what, reason=reason)
    for cert in path:
        _check_validity(cert, now=now, what=what)
    return path


def check_pinned_root(root: x509.Certificate, *, now: datetime) -> None:
    """The pinned root is a self-signed CA certificate, valid at ``now``."""
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise AttestationError("root_ca_mismatch", "the pinned root CA is not a self-signed certificate") from exc
    _check_validity(root, now=now, what="pinned root CA")


def check_same_root(candidate: x509.Certificate, root: x509.Certificate, *, what: str) -> None:
    """A root carried in evidence or collateral is byte for byte the pinned one."""
    if candidate.public_bytes(Encoding.DER) != root.public_bytes(Encoding.DER):
        raise AttestationError(
            "root_ca_mismatch",
            f"{what} ends in root {common_name(candidate.subject)!r} with SHA-256 {fingerprint(candidate)}, "
            f"expected the pinned root {common_name(root.subject)!r} with SHA-256 {fingerprint(root)}",
            "verify with Intel's root CA, or pin the root this evidence was issued under",
        )


def _check_issued_by(child: x509.Certificate, issuer: x509.Certificate, *, what: str, reason: str) -> None:
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        constraints = None
    if constraints is None or not constraints.ca:
        raise AttestationError(reason, f"{what}: issuer {common_name(issuer.subject)!r} is not a CA certificate")
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise AttestationError(
            reason,
            f"{what}: {common_name(child.subject)!r} is not signed by {common_name(issuer.subject)!r}"
            f" ({exc or 'bad signature'})",
        ) from exc


def _check_validity(cert: x509.Certificate, *, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise AttestationError(
            "certificate_not_yet_valid",
            f"{what}: {common_name(cert.subject)!r} is valid from {cert.not_valid_before_utc.isoformat()},"
            f" now is {now.isoformat()}",
            "check the clock of this machine",
        )
    if now > cert.not_valid_after_utc:
        raise AttestationError(
            "certificate_expired",
            f"{what}: {common_name(cert.subject)!r} expired at {cert.not_valid_after_utc.isoformat()},"
            f" now is {now.isoformat()}",
            "fetch fresh collateral; a platform with an expired PCK certificate needs re-provisioning",
        )


def check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, *, now: datetime, what: str) -> None:
    """The CRL names ``issuer`` as its issuer, is signed by it, and ``now`` is inside its window."""
    if crl.issuer.public_bytes() != issuer.subject.public_bytes():
        raise AttestationError(
            "crl_issuer_mismatch",
            f"{what} is issued by {common_name(crl.issuer)!r}, expected {common_name(issuer.subject)!r}",
        )
    try:
        signed = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        signed = False
    if not signed:
        raise AttestationError("crl_signature_invalid", f"{what} is not signed by {common_name(issuer.subject)!r}")
    if now < crl.last_update_utc:
        raise AttestationError(
            "crl_not_yet_valid",
            f"{what} is valid from {crl.last_update_utc.isoformat()}, now is {now.isoformat()}",
            "check the clock of this machine",
        )
    next_update = crl.next_update_utc
    if next_update is None or now > next_update:
        when = "has no nextUpdate" if next_update is None else f"expired at {next_update.isoformat()}"
        raise AttestationError("crl_expired", f"{what} {when}, now is {now.isoformat()}", "fetch fresh collateral")


def check_not_revoked(cert: x509.Certificate, crl: x509.CertificateRevocationList, *, what: str, reason: str) -> None:
    """``cert`` (issued by the CRL's issuer) is not listed in ``crl``."""
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is not None:
        raise AttestationError(
            reason,
            f"{what} {common_name(cert.subject)!r} (serial {cert.serial_number:x}) was revoked on "
            f"{entry.revocation_date_utc.isoformat()}",
            "this platform or signing key must not be trusted",
        )
