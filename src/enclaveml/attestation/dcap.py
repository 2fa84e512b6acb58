"""Verify an Intel DCAP quote (SGX v3, TDX v4/v5) against collateral: spec §1.7, QVL's order.

``verify_quote`` is one driver calling named steps in a fixed order. Each step checks one
link of the trust chain and raises ``AttestationError`` with its own ``reason``; the TCB
verdict itself (including "no TCB level matches": ``TcbNotSupported``) is a result, not an
error. Nothing here reads the clock: ``now`` is an argument.

    >>> from datetime import datetime, UTC
    >>> result = verify_quote(quote_bytes, Collateral.from_dict(d), now=datetime.now(UTC))  # doctest: +SKIP
    >>> result.status, result.claims.mr_enclave  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from enclaveml.attestation.certchain import (
    check_crl,
    check_not_revoked,
    check_pinned_root,
    check_same_root,
    common_name,
    fingerprint,
    verify_chain,
)
from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.attestation.collateral import Collateral, EnclaveTcbLevel, QeIdentity, TcbInfo
from enclaveml.attestation.pck import SgxExtension
from enclaveml.attestation.quote import (
    BODY_SGX,
    INTEL_QE_VENDOR_ID,
    TEE_TYPE_SGX,
    TEE_TYPE_TDX,
    Quote,
    SgxReportBody,
    TdReportBody,
    parse_quote,
)
from enclaveml.attestation.tcb import TcbVerdict, evaluate_tcb, find_tdx_module_identity, match_qe_tcb_level, unique
from enclaveml.errors import AttestationError, ConfigError

__all__ = ["INTEL_SGX_ROOT_CA", "INTEL_SGX_ROOT_CA_SHA256", "DcapResult", "verify_quote"]

INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
_TCB_SIGNING_CN = "Intel SGX TCB Signing"
_PCK_LEAF_CN_PHRASE = "SGX PCK Certificate"


def _load_intel_root() -> x509.Certificate:
    der = resources.files("enclaveml.attestation").joinpath("intel_sgx_root_ca.der").read_bytes()
    if hashlib.sha256(der).hexdigest() != INTEL_SGX_ROOT_CA_SHA256:
        raise ConfigError(
            "the packaged Intel SGX Root CA does not have the expected SHA-256",
            "reinstall enclaveml from a trusted source",
        )
    return x509.load_der_x509_certificate(der)


INTEL_SGX_ROOT_CA = _load_intel_root()


@dataclass(frozen=True)
class DcapResult:
    """A verified quote: Intel's TCB verdict and the claims it supports.

    ``status`` is final (platform converged with the QE, spec §1.7 step 12);
    ``platform_status`` is before the QE was folded in; ``tdx_module_status`` is ``None``
    for SGX. ``collateral_expiry`` is the earliest ``nextUpdate`` of TCB Info, QE Identity
    and both CRLs.
    """

    status: TcbStatus
    advisory_ids: tuple[str, ...]
    qe_tcb_status: TcbStatus
    platform_status: TcbStatus
    tdx_module_status: TcbStatus | None
    tcb_date: datetime | None
    collateral_expiry: datetime
    claims: Claims
    quote: Quote


def verify_quote(
    quote: bytes | Quote,
    collateral: Collateral,
    *,
    now: datetime,
    root_ca: x509.Certificate = INTEL_SGX_ROOT_CA,
) -> DcapResult:
    """Verify ``quote`` against ``collateral`` at time ``now``, trusting only ``root_ca``.

    Raises ``EvidenceParseError`` for a malformed quote and ``AttestationError`` (with a
    ``reason``) for the first failed step; see ``docs/attestation/dcap.md``.
    """
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    if not isinstance(collateral, Collateral):
        raise TypeError(f"collateral must be a Collateral (use Collateral.from_dict), not {type(collateral).__name__}")
    parsed = quote if isinstance(quote, Quote) else parse_quote(quote)
    verify_root_ca(root_ca, parsed, collateral, now=now)  # 1
    check_quote_header(parsed)  # 2
    verify_tcb_info(collateral, parsed.tee, root_ca, now=now)  # 3
    verify_qe_identity(collateral, parsed.tee, root_ca, now=now)  # 4
    pck = verify_pck_chain(parsed, collateral, root_ca, now=now)  # 5
    check_pck_matches_tcb_info(pck, collateral.tcb_info)  # 5 (4.1.2.4.10)
    if isinstance(parsed.body, TdReportBody):
        verify_tdx_module_identity(parsed.body, collateral.tcb_info)  # 6
    verify_qe_report_signature(parsed)  # 7
    verify_qe_report_data(parsed)  # 8
    qe_level = match_qe_identity(parsed.signature_data.qe.qe_report, collateral.qe_identity, parsed.tee)  # 9
    verify_quote_signature(parsed)  # 10
    qe_status = qe_level.status if qe_level is not None else TcbStatus.TCB_NOT_SUPPORTED
    td_body = parsed.body if isinstance(parsed.body, TdReportBody) else None
    verdict = evaluate_tcb(collateral.tcb_info, pck, td_body, qe_status)  # 11, 12
    return _result(parsed, collateral, verdict, qe_level, qe_status, pck)


def verify_root_ca(root_ca: x509.Certificate, quote: Quote, collateral: Collateral, *, now: datetime) -> None:
    """Step 1: the pinned root is self-signed and valid; the quote's PCK chain ends in it (when it
    carries a root); the Root CA CRL is the root's own, current, and does not list the root."""
    check_pinned_root(root_ca, now=now)
    top = quote.pck_chain.certificates[-1]
    if top.subject == top.issuer:
        check_same_root(top, root_ca, what="the quote's PCK chain")
    check_crl(collateral.root_ca_crl, root_ca, now=now, what="Root CA CRL")
    check_not_revoked(root_ca, collateral.root_ca_crl, what="root CA", reason="root_ca_revoked")


def check_quote_header(quote: Quote) -> None:
    """Step 2: a version, TEE type and QE vendor this verifier supports (SGX v3; TDX v4/v5)."""
    header = quote.header
    expected_tee = TEE_TYPE_SGX if quote.body_type == BODY_SGX else TEE_TYPE_TDX
    if header.tee_type != expected_tee:
        raise AttestationError(
            "unsupported_quote",
            f"header tee_type is 0x{header.tee_type:x}, expected 0x{expected_tee:x} for this report body",
        )
    if quote.tee is TeeType.SGX and header.version != 3:
        raise AttestationError("unsupported_quote", f"SGX quotes must be version 3, this one is {header.version}")
    if header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise AttestationError(
            "unsupported_quote",
            f"QE vendor {header.qe_vendor_id.hex()} is not Intel ({INTEL_QE_VENDOR_ID.hex()})",
        )


def verify_tcb_info(collateral: Collateral, tee: TeeType, root_ca: x509.Certificate, *, now: datetime) -> None:
    """Step 3 (QVL 4.1.2.4.9): TCB Info is current, signed by "Intel SGX TCB Signing" under the
    root (not revoked by the Root CA CRL), and made for this TEE."""
    info = collateral.tcb_info
    _check_window("TCB Info", info.issue_date, info.next_update, now)
    signer = _tcb_signer(collateral.tcb_info_issuer_chain, collateral, root_ca, now=now, what="TCB Info issuer chain")
    _verify_raw_signature(signer, collateral.tcb_info_signature, info.raw, "tcb_info_signature_invalid", "TCB Info")
    expected = "TDX" if tee is TeeType.TDX else "SGX"
    if info.id != expected or (tee is TeeType.TDX and info.version < 3):
        raise AttestationError(
            "tcb_info_mismatch",
            f"TCB Info is {info.id} v{info.version}, the quote needs {expected}" + (" v3" if expected == "TDX" else ""),
            "fetch TCB Info for this TEE type",
        )


def verify_qe_identity(collateral: Collateral, tee: TeeType, root_ca: x509.Certificate, *, now: datetime) -> None:
    """Step 4 (QVL 4.1.2.4.14): QE Identity is current, signed like TCB Info, and for this TEE's QE."""
    identity = collateral.qe_identity
    _check_window("QE Identity", identity.issue_date, identity.next_update, now)
    signer = _tcb_signer(
        collateral.qe_identity_issuer_chain, collateral, root_ca, now=now, what="QE Identity issuer chain"
    )
    _verify_raw_signature(
        signer, collateral.qe_identity_signature, identity.raw, "qe_identity_signature_invalid", "QE Identity"
    )
    expected = "TD_QE" if tee is TeeType.TDX else "QE"
    if identity.id != expected:
        raise AttestationError(
            "qe_identity_mismatch", f"QE Identity is for {identity.id!r}, the quote needs {expected!r}"
        )


def verify_pck_chain(quote: Quote, collateral: Collateral, root_ca: x509.Certificate, *, now: datetime) -> SgxExtension:
    """Step 5 (QVL 4.1.2.4.4-7): PCK leaf -> PCK CA -> root; neither revoked (PCK CRL, Root CA CRL);
    the PCK CRL is the one of the leaf's issuer, current and signed by it."""
    chain = quote.pck_chain
    path = verify_chain(
        chain.certificates, root_ca, now=now, what="PCK certificate chain", reason="pck_chain_invalid", length=3
    )
    leaf, pck_ca = path[0], path[1]
    if _PCK_LEAF_CN_PHRASE not in common_name(leaf.subject):
        raise AttestationError(
            "pck_chain_invalid", f"PCK leaf CN {common_name(leaf.subject)!r} lacks {_PCK_LEAF_CN_PHRASE!r}"
        )
    check_not_revoked(pck_ca, collateral.root_ca_crl, what="PCK CA", reason="pck_ca_revoked")
    check_crl(collateral.pck_crl, pck_ca, now=now, what="PCK CRL")
    crl_ca = verify_chain(
        collateral.pck_crl_issuer_chain,
        root_ca,
        now=now,
        what="PCK CRL issuer chain",
        reason="pck_crl_issuer_chain_invalid",
        length=2,
    )[0]
    if crl_ca.subject.public_bytes() != collateral.pck_crl.issuer.public_bytes():
        raise AttestationError(
            "pck_crl_issuer_chain_invalid",
            f"PCK CRL issuer chain starts at {common_name(crl_ca.subject)!r}, "
            f"the PCK CRL is issued by {common_name(collateral.pck_crl.issuer)!r}",
        )
    check_not_revoked(leaf, collateral.pck_crl, what="PCK certificate", reason="pck_revoked")
    return chain.sgx_extension


def check_pck_matches_tcb_info(pck: SgxExtension, tcb_info: TcbInfo) -> None:
    """Step 5 (QVL 4.1.2.4.10): the TCB Info is for this platform's FMSPC and PCE."""
    if pck.fmspc != tcb_info.fmspc:
        raise AttestationError(
            "fmspc_mismatch",
            f"PCK FMSPC is {pck.fmspc.hex()}, TCB Info is for {tcb_info.fmspc.hex()}",
            "fetch TCB Info for this platform's FMSPC",
        )
    if pck.pce_id != tcb_info.pce_id:
        raise AttestationError(
            "pceid_mismatch", f"PCK PCE-ID is {pck.pce_id.hex()}, TCB Info has {tcb_info.pce_id.hex()}"
        )


def verify_tdx_module_identity(body: TdReportBody, tcb_info: TcbInfo) -> None:
    """Step 6 (QVL 4.1.2.4.11): MRSIGNERSEAM and SEAMATTRIBUTES are those of the TDX module identity
    (``tdxModuleIdentities[TDX_<version>]`` when TEE_TCB_SVN[1] > 0, else ``tdxModule``)."""
    module = tcb_info.tdx_module
    if module is None:
        raise AttestationError("tdx_module_mismatch", "TCB Info has no tdxModule")
    mrsigner, attributes = module.mrsigner, module.attributes
    version = body.tee_tcb_svn[1]
    if version > 0:
        identity = find_tdx_module_identity(tcb_info, version)
        if identity is None:
            known = ", ".join(i.id for i in tcb_info.tdx_module_identities) or "none"
            raise AttestationError(
                "tdx_module_mismatch", f"no TDX module identity TDX_{version:02X} in TCB Info (has: {known})"
            )
        mrsigner, attributes = identity.mrsigner, identity.attributes
    if body.mr_signer_seam != mrsigner:
        raise AttestationError(
            "tdx_module_mismatch", f"MRSIGNERSEAM is {body.mr_signer_seam.hex()}, expected {mrsigner.hex()}"
        )
    if any(body.seam_attributes) or body.seam_attributes != attributes:
        raise AttestationError(
            "tdx_module_mismatch",
            f"SEAMATTRIBUTES is {body.seam_attributes.hex()}, expected {attributes.hex()} and all zero",
        )


def verify_qe_report_signature(quote: Quote) -> None:
    """Step 7 (QVL 4.1.2.4.12): the PCK leaf key signed the QE report."""
    key = quote.pck_chain.leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AttestationError("pck_chain_invalid", "the PCK leaf key is not ECDSA P-256")
    qe = quote.signature_data.qe
    if not _ecdsa_ok(key, qe.qe_report_signature, qe.qe_report.raw):
        raise AttestationError("qe_report_signature_invalid", "the QE report is not signed by the PCK key")


def verify_qe_report_data(quote: Quote) -> None:
    """Step 8 (QVL 4.1.2.4.13): QE REPORTDATA[0:32] = SHA-256(attestation key ‖ QE auth data)."""
    sig = quote.signature_data
    expected = hashlib.sha256(sig.attestation_key + sig.qe.qe_auth_data).digest()
    actual = sig.qe.qe_report.report_data[:32]
    if actual != expected:
        raise AttestationError(
            "qe_report_data_mismatch",
            f"QE report data is {actual.hex()}, SHA-256(attestation key ‖ QE auth data) is {expected.hex()}",
        )


def match_qe_identity(qe_report: SgxReportBody, identity: QeIdentity, tee: TeeType) -> EnclaveTcbLevel | None:
    """Step 9 (QVL 4.1.2.4.15): the QE is Intel's (MRSIGNER, ISVPRODID, masked MISCSELECT and
    ATTRIBUTES); returns its TCB level, ``None`` when its ISVSVN is below every level."""
    checks = (
        ("MRSIGNER", qe_report.mr_signer, identity.mrsigner),
        ("ISVPRODID", qe_report.isv_prod_id.to_bytes(2, "big"), identity.isv_prod_id.to_bytes(2, "big")),
        # MISCSELECT and ATTRIBUTES compare in report byte order, as the identity's hex is written.
        (
            "MISCSELECT",
            _mask(qe_report.raw[16:20], identity.miscselect_mask),
            _mask(identity.miscselect, identity.miscselect_mask),
        ),
        (
            "ATTRIBUTES",
            _mask(qe_report.attributes, identity.attributes_mask),
            _mask(identity.attributes, identity.attributes_mask),
        ),
    )
    for name, actual, expected in checks:
        if actual != expected:
            raise AttestationError(
                "qe_identity_mismatch",
                f"{tee.value.upper()} QE {name} is {actual.hex()},"
                f" QE Identity {identity.id!r} expects {expected.hex()}",
            )
    return match_qe_tcb_level(identity, qe_report.isv_svn)


def verify_quote_signature(quote: Quote) -> None:
    """Step 10 (QVL 4.1.2.4.16): the attestation key signed header ‖ body (``signed_bytes``)."""
    sig = quote.signature_data
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + sig.attestation_key)
    except ValueError as exc:
        raise AttestationError("unsupported_quote", "the attestation key is not a P-256 point") from exc
    if not _ecdsa_ok(key, sig.quote_signature, quote.signed_bytes):
        raise AttestationError(
            "quote_signature_invalid", f"the quote signature over bytes [0, {quote.signed_length}) does not verify"
        )


# -- helpers named for what they check --------------------------------------------------------


def _check_window(what: str, issued: datetime, next_update: datetime, now: datetime) -> None:
    if now < issued:
        raise AttestationError(
            "collateral_not_yet_valid",
            f"{what} was issued at {issued.isoformat()}, now is {now.isoformat()}",
            "check the clock of this machine",
        )
    if now > next_update:
        raise AttestationError(
            "collateral_expired",
            f"{what} expired at {next_update.isoformat()}, now is {now.isoformat()}",
            "fetch fresh collateral from Intel PCS or your PCCS",
        )


def _tcb_signer(
    chain: tuple[x509.Certificate, ...], collateral: Collateral, root_ca: x509.Certificate, *, now: datetime, what: str
) -> x509.Certificate:
    """The "Intel SGX TCB Signing" certificate, directly under the root and not revoked."""
    reason = "tcb_info_issuer_chain_invalid" if what.startswith("TCB") else "qe_identity_issuer_chain_invalid"
    signer = verify_chain(chain, root_ca, now=now, what=what, reason=reason, length=2)[0]
    if common_name(signer.subject) != _TCB_SIGNING_CN:
        raise AttestationError(reason, f"{what}: signer is {common_name(signer.subject)!r}, not {_TCB_SIGNING_CN!r}")
    check_not_revoked(signer, collateral.root_ca_crl, what="TCB signing certificate", reason="tcb_signing_revoked")
    return signer


def _verify_raw_signature(signer: x509.Certificate, signature: bytes, text: str, reason: str, what: str) -> None:
    key = signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not _ecdsa_ok(key, signature, text.encode("utf-8")):
        raise AttestationError(
            reason,
            f"the {what} signature does not verify with {common_name(signer.subject)!r} ({fingerprint(signer)[:16]}…)",
        )


def _ecdsa_ok(key: ec.EllipticCurvePublicKey, raw_signature: bytes, message: bytes) -> bool:
    """ECDSA-SHA256 over ``message`` with a raw big-endian r‖s signature (spec §1.1)."""
    r = int.from_bytes(raw_signature[:32], "big")
    s = int.from_bytes(raw_signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _mask(value: bytes, mask: bytes) -> bytes:
    return bytes(a & b for a, b in zip(value, mask, strict=True))


def _result(
    quote: Quote,
    collateral: Collateral,
    verdict: TcbVerdict,
    qe_level: EnclaveTcbLevel | None,
    qe_status: TcbStatus,
    pck: SgxExtension,
) -> DcapResult:
    advisories = unique(verdict.advisory_ids + (qe_level.advisory_ids if qe_level else ()))
    if verdict.status is TcbStatus.TCB_NOT_SUPPORTED:
        advisories = ()
    claims = _claims(quote, verdict.status, advisories, pck, collateral, qe_status)
    return DcapResult(
        status=verdict.status,
        advisory_ids=advisories,
        qe_tcb_status=qe_status,
        platform_status=verdict.platform_status,
        tdx_module_status=verdict.module_status,
        tcb_date=verdict.tcb_date,
        collateral_expiry=collateral.expiry,
        claims=claims,
        quote=quote,
    )


def _claims(
    quote: Quote,
    status: TcbStatus,
    advisories: tuple[str, ...],
    pck: SgxExtension,
    collateral: Collateral,
    qe_status: TcbStatus,
) -> Claims:
    extra = {
        "qe_tcb_status": str(qe_status),
        "tcb_evaluation_data_number": str(collateral.tcb_info.tcb_evaluation_data_number),
    }
    body = quote.body
    if isinstance(body, SgxReportBody):
        claims = Claims(
            tee=TeeType.SGX,
            source=quote.source,
            report_data=body.report_data,
            debug=body.debug,
            tcb_status=status,
            mr_enclave=body.mr_enclave,
            mr_signer=body.mr_signer,
            isv_prod_id=body.isv_prod_id,
            isv_svn=body.isv_svn,
            attributes=body.attributes,
        )
    else:
        if body.tee_tcb_svn2 is not None and body.mr_service_td is not None:
            extra["tee_tcb_svn2"] = body.tee_tcb_svn2.hex()
            extra["mr_service_td"] = body.mr_service_td.hex()
        claims = Claims(
            tee=TeeType.TDX,
            source=quote.source,
            report_data=body.report_data,
            debug=body.debug,
            tcb_status=status,
            mr_td=body.mr_td,
            rtmrs=body.rtmrs,
            mr_config_id=body.mr_config_id,
            mr_owner=body.mr_owner,
            mr_owner_config=body.mr_owner_config,
            td_attributes=body.td_attributes,
            xfam=body.xfam,
            tee_tcb_svn=body.tee_tcb_svn,
            mr_seam=body.mr_seam,
            mr_signer_seam=body.mr_signer_seam,
        )
    return replace(
        claims, advisory_ids=advisories, fmspc=pck.fmspc.hex(), collateral_expiry=collateral.expiry, extra=extra
    )
