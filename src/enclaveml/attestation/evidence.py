"""One entry for every kind of evidence: recognise it, verify it, describe it (pure core).

Used by ``enclaveml attest`` and the key broker, so both accept the same inputs::

    detect_evidence(data)     "sgx-quote" | "tdx-quote" | "sim" | "ratls-cert" | "maa-token"
    verify_evidence(data, now=..., collateral=...)   -> VerifiedEvidence
    verify_maa_evidence(token, jwks, issuer=..., now=...) -> VerifiedEvidence
    refusal_without_policy(verified)                 -> AttestationError | None
    inspect_evidence(data)    -> Inspection (every field, nothing verified)

Dispatch: DCAP quotes to ``dcap.verify_quote``, simulated evidence to ``sim.verify_sim_evidence``,
RA-TLS certificates (PEM or DER) to ``ratls.verify_ratls_certificate``, whose embedded evidence
(TCG or legacy extension) is verified as if given directly; ``ratls`` recognises the kind.
Malformed input raises ``EvidenceParseError``; a failed step ``AttestationError`` with its
``reason``. No I/O, no clock: ``now`` is an argument.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from enclaveml.attestation.certchain import common_name
from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.attestation.collateral import Collateral
from enclaveml.attestation.dcap import INTEL_SGX_ROOT_CA, DcapResult, verify_quote
from enclaveml.attestation.maa import verify_maa_token
from enclaveml.attestation.quote import INTEL_QE_VENDOR_ID, Quote, SgxReportBody, parse_quote
from enclaveml.attestation.ratls import Evidence, ExtractedEvidence, extract_evidence, verify_ratls_certificate
from enclaveml.attestation.ratls import parse_evidence as _recognise  # ratls owns kind recognition
from enclaveml.attestation.sigstruct import attribute_flag_names
from enclaveml.attestation.sim import SimEvidence, verify_sim_evidence
from enclaveml.errors import AttestationError, ConfigError

__all__ = [
    "DEFAULT_SIM_MAX_AGE_S",
    "CollateralRequest",
    "EvidenceFormat",
    "Inspection",
    "VerifiedEvidence",
    "collateral_request",
    "detect_evidence",
    "inspect_evidence",
    "refusal_without_policy",
    "verify_evidence",
    "verify_maa_evidence",
]

EvidenceFormat = Literal["sgx-quote", "tdx-quote", "sim", "ratls-cert", "maa-token"]
DEFAULT_SIM_MAX_AGE_S = 300
_JWT = re.compile(rb"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_NEVER_ACCEPTABLE = {
    TcbStatus.REVOKED: ("tcb_revoked", "the platform's TCB (or its PCK certificate) is revoked"),
    TcbStatus.TCB_NOT_SUPPORTED: ("tcb_not_supported", "no TCB level of the collateral matches this platform"),
}
# TD ATTRIBUTES bits (TDX module ABI, TDINFO_STRUCT.ATTRIBUTES).
_TD_ATTRIBUTE_BITS = {0: "DEBUG", 28: "SEPT_VE_DISABLE", 29: "MIGRATABLE", 30: "PKS", 31: "KL", 63: "PERFMON"}


def detect_evidence(data: bytes) -> EvidenceFormat:
    """The format of ``data``, from its first bytes; ``EvidenceParseError`` when it is none of them.

    A certificate is PEM (``-----BEGIN``) or DER (a SEQUENCE, ``0x30``); a DCAP quote starts
    with its version (3, 4 or 5, little-endian); simulated evidence with ``EMLSIMEV``.
    """
    raw = bytes(data)
    if raw.lstrip().startswith(b"-----BEGIN") or raw[:1] == b"\x30":
        return "ratls-cert"
    if _JWT.fullmatch(raw.strip()):
        return "maa-token"
    return _recognise(raw, "", "evidence").kind


@dataclass(frozen=True)
class VerifiedEvidence:
    """Evidence that passed every verification step (a policy has *not* been applied yet).

    ``status`` and ``advisories`` are the TCB verdict (``Simulated`` for simulation, MAA's
    verdict for a token). ``warnings`` are facts a person should see (ignored trailing bytes,
    a debug enclave, an unpinned simulation key). For an RA-TLS certificate, ``kind`` is
    ``ratls-cert``, ``inner_kind`` the embedded evidence and ``ratls_key_binding_ok`` true
    (a broken binding raises ``ratls_key_binding_mismatch``); otherwise both are ``None``.
    """

    kind: EvidenceFormat
    claims: Claims
    status: TcbStatus
    advisories: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    ratls_key_binding_ok: bool | None = None
    inner_kind: EvidenceFormat | None = None
    ratls_oid: str | None = None
    dcap: DcapResult | None = field(default=None, repr=False)

    @property
    def description(self) -> str:
        """E.g. ``SGX quote v3``, ``RA-TLS certificate with simulated evidence``."""
        inner = _describe(self.inner_kind or self.kind, self.claims)
        return f"RA-TLS certificate with {inner}" if self.kind == "ratls-cert" else inner

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kind": self.kind,
            "evidence": self.description,
            "status": str(self.status),
            "advisories": list(self.advisories),
            "insecure": self.claims.insecure,
            "warnings": list(self.warnings),
            "ratls_key_binding_ok": self.ratls_key_binding_ok,
            "claims": self.claims.to_json(),
        }
        if (d := self.dcap) is not None:
            statuses = {"platform_status": d.platform_status, "qe_tcb_status": d.qe_tcb_status}
            out["tcb"] = {k: str(v) for k, v in statuses.items()} | {
                "tdx_module_status": d.tdx_module_status and str(d.tdx_module_status),
                "tcb_date": d.tcb_date and d.tcb_date.isoformat(),
                "collateral_expiry": d.collateral_expiry.isoformat(),
            }
        return out


def _describe(kind: str, claims: Claims) -> str:
    if kind in ("sgx-quote", "tdx-quote"):
        version = claims.source.removeprefix("dcap-quote-")
        return f"{claims.tee.value.upper()} quote {version}"
    return {"sim": "simulated evidence", "maa-token": f"MAA token ({claims.tee}; TCB verdict by MAA)"}.get(kind, kind)


def verify_evidence(
    data: bytes,
    *,
    now: datetime,
    collateral: Collateral | None,
    sim_trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    expected_nonce: bytes | None = None,
    sim_max_age_s: int = DEFAULT_SIM_MAX_AGE_S,
    root_ca: x509.Certificate = INTEL_SGX_ROOT_CA,
) -> VerifiedEvidence:
    """Verify any evidence ``detect_evidence`` recognises, except MAA tokens (``verify_maa_evidence``).

    ``collateral`` is needed only for DCAP quotes (``ConfigError`` when it is missing).
    ``sim_trusted_keys=None`` accepts simulated evidence from any signer, with a warning.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    kind = detect_evidence(data)
    if kind == "maa-token":
        raise ConfigError(
            "this is an MAA token, which needs the provider's signing keys",
            "verify it with `enclaveml attest verify --maa-token FILE --jwks FILE --issuer URL`",
        )
    options = _Options(now, collateral, sim_trusted_keys, expected_nonce, sim_max_age_s, root_ca)
    if kind != "ratls-cert":
        return _verify_raw(kind, bytes(data), options)
    inner: list[VerifiedEvidence] = []

    def verify_inner(evidence: Evidence, at: datetime) -> Claims:
        verified = _verify_raw(evidence.kind, evidence.raw, options)
        inner.append(replace(verified, ratls_oid=evidence.oid))
        return verified.claims

    verify_ratls_certificate(bytes(data), verify_inner, now=now, policy_check=None)
    return replace(inner[-1], kind="ratls-cert", inner_kind=inner[-1].kind, ratls_key_binding_ok=True)


@dataclass(frozen=True)
class _Options:
    now: datetime
    collateral: Collateral | None
    sim_trusted_keys: Sequence[Ed25519PublicKey] | None
    expected_nonce: bytes | None
    sim_max_age_s: int
    root_ca: x509.Certificate


def _verify_raw(kind: EvidenceFormat, raw: bytes, options: _Options) -> VerifiedEvidence:
    if kind == "sim":
        claims = verify_sim_evidence(
            raw,
            trusted_keys=options.sim_trusted_keys,
            expected_nonce=options.expected_nonce,
            now=options.now,
            max_age_s=options.sim_max_age_s,
        )
        # claims.insecure flags simulation itself; a policy that accepts it logs that.
        untrusted = options.sim_trusted_keys is None
        notes = ("no trusted simulation key was given: evidence signed by any key is accepted",) if untrusted else ()
        return VerifiedEvidence("sim", claims, claims.tcb_status, (), notes)
    if options.collateral is None:
        raise ConfigError(
            f"a DCAP quote ({kind}) needs collateral to be verified",
            "command line: `--collateral FILE|DIR` or `--pccs URL`",
        )
    result = verify_quote(raw, options.collateral, now=options.now, root_ca=options.root_ca)
    warnings = []
    if result.quote.trailing_bytes:
        warnings.append(f"{result.quote.trailing_bytes} bytes after the signature data were ignored")
    if result.claims.debug:
        warnings.append("the enclave / TD runs in DEBUG mode: the host can read its memory")
    return VerifiedEvidence(kind, result.claims, result.status, result.advisory_ids, tuple(warnings), dcap=result)


def verify_maa_evidence(
    token: str, jwks: dict[str, Any] | str, *, issuer: str, now: datetime, leeway_s: int = 0
) -> VerifiedEvidence:
    """An Azure Attestation token, verified by ``maa.verify_maa_token``; its status is MAA's verdict."""
    claims = verify_maa_token(token.strip(), jwks, issuer=issuer, now=now, leeway_s=leeway_s)
    warnings = []
    if claims.extra.get("report_data_source") == "sha256(x-ms-sgx-ehd)":
        warnings.append("report data is SHA-256 of the enclave-held data; its bytes 32..64 are not attested")
    if claims.debug:
        warnings.append("the enclave runs in DEBUG mode: the host can read its memory")
    return VerifiedEvidence("maa-token", claims, claims.tcb_status, claims.advisory_ids, tuple(warnings))


def refusal_without_policy(verified: VerifiedEvidence) -> AttestationError | None:
    """Why verified evidence must be refused even when no policy is given, else ``None``.

    Simulation is accepted only by a policy that says ``allow_simulation``; Revoked and
    TcbNotSupported are accepted by no policy at all.
    """
    if verified.claims.tee is TeeType.SIM or verified.claims.insecure:
        return AttestationError(
            "simulation_not_allowed",
            "simulated evidence proves nothing about the host; only a policy with `allow_simulation = true` accepts it",
            "pass --policy FILE with `allow_simulation = true` (development only), or run in a real TEE",
        )
    if verified.status in _NEVER_ACCEPTABLE:
        reason, why = _NEVER_ACCEPTABLE[verified.status]
        return AttestationError(
            reason,
            f"TCB status {verified.status}: {why}; no policy can accept it",
            "update the platform (microcode, BIOS, TCB recovery), then use fresh collateral",
        )
    return None


@dataclass(frozen=True)
class CollateralRequest:
    """What to ask a PCS / PCCS for: ``PcsClient.fetch_collateral(fmspc, tee=..., pck_ca=...)``."""

    fmspc: str
    tee: Literal["sgx", "tdx"]
    pck_ca: Literal["processor", "platform"]


def collateral_request(data: bytes) -> CollateralRequest | None:
    """The collateral the DCAP quote in ``data`` (raw, or in an RA-TLS certificate) needs; ``None``
    when ``data`` holds no quote (simulated evidence, an MAA token)."""
    kind = detect_evidence(data)
    raw = bytes(data)
    if kind == "ratls-cert":
        evidence = extract_evidence(raw).evidence
        kind, raw = evidence.kind, evidence.raw
    if kind not in ("sgx-quote", "tdx-quote"):
        return None
    quote = parse_quote(raw)
    ca_name = common_name(quote.pck_chain.leaf.issuer)
    return CollateralRequest(
        fmspc=quote.pck_chain.sgx_extension.fmspc.hex().upper(),
        tee="sgx" if kind == "sgx-quote" else "tdx",
        pck_ca="platform" if "Platform" in ca_name else "processor",
    )


# -- inspection: every field, nothing verified -----------------------------------------------


@dataclass(frozen=True)
class Inspection:
    """What ``data`` says about itself. ``fields`` is ordered; bytes are hex, nothing is verified."""

    kind: EvidenceFormat
    inner_kind: EvidenceFormat | None
    fields: dict[str, object]
    warnings: tuple[str, ...]
    ratls: ExtractedEvidence | None = field(default=None, repr=False)


def inspect_evidence(data: bytes) -> Inspection:
    """Parse ``data`` (a quote, simulated evidence or an RA-TLS certificate) into its fields."""
    kind = detect_evidence(data)
    if kind == "maa-token":
        raise ConfigError(
            "an MAA token is verified, not inspected", "use `enclaveml attest verify --maa-token FILE --jwks FILE`"
        )
    fields: dict[str, object] = {"format": ""}  # filled in below, shown first
    warnings: list[str] = []
    extracted = None
    raw = bytes(data)
    inner_kind: EvidenceFormat = kind
    if kind == "ratls-cert":
        extracted = extract_evidence(raw)
        pem = raw.lstrip().startswith(b"-----")
        cert = x509.load_pem_x509_certificate(raw) if pem else x509.load_der_x509_certificate(raw)
        fields |= {
            "certificate.subject": cert.subject.rfc4514_string(),
            "certificate.not_before": cert.not_valid_before_utc.isoformat(),
            "certificate.not_after": cert.not_valid_after_utc.isoformat(),
            "ratls.evidence_oid": extracted.oid,
            "ratls.extensions": list(extracted.present_oids),
            "ratls.binding": extracted.binding,
            "ratls.key_binding_ok": extracted.key_binding_ok,
        }
        if not extracted.key_binding_ok:
            warnings.append(
                f"the evidence is not bound to the certificate key: {extracted.binding} expected "
                f"{extracted.expected_binding.hex()}, found {extracted.actual_binding.hex()}"
            )
        inner_kind, raw = extracted.evidence.kind, extracted.evidence.raw
    if inner_kind == "sim":
        fields |= _sim_fields(SimEvidence.from_bytes(raw))
    else:
        quote = parse_quote(raw)
        fields |= _quote_fields(quote)
        if quote.trailing_bytes:
            warnings.append(f"{quote.trailing_bytes} bytes after the signature data (ignored, as Intel's QVL does)")
    if extracted is not None:
        fields["format"] = f"RA-TLS certificate carrying {fields['format']}"
    return Inspection(kind, inner_kind if kind == "ratls-cert" else None, fields, tuple(warnings), extracted)


def _sim_fields(sim: SimEvidence) -> dict[str, object]:
    return {
        "format": f"simulated evidence v{sim.version} (INSECURE: proves nothing about the host)",
        "measurement": sim.measurement.hex(),
        "report_data": sim.report_data.hex(),
        "nonce": sim.nonce.hex(),
        "issued_at": datetime.fromtimestamp(sim.issued_at, UTC).isoformat(),
        "signer": sim.signer.hex(),
        "signer_sha256": hashlib.sha256(sim.signer).hexdigest(),
        "signature": sim.signature.hex(),
    }


def _flags(value: int, names: dict[int, str]) -> list[str]:
    return [names.get(bit, f"bit{bit}") for bit in range(64) if value >> bit & 1]


_SGX_FIELDS = ("cpu_svn", "misc_select", "isv_ext_prod_id", "attributes", "mr_enclave", "mr_signer", "config_id",
               "isv_prod_id", "isv_svn", "config_svn", "isv_family_id")  # fmt: skip
_TD_FIELDS = ("tee_tcb_svn", "mr_seam", "mr_signer_seam", "seam_attributes", "td_attributes", "xfam", "mr_td",
              "mr_config_id", "mr_owner", "mr_owner_config")  # fmt: skip


def _named(obj: object, names: tuple[str, ...]) -> dict[str, object]:
    """``{name: value}`` in order; bytes as hex."""
    values = {name: getattr(obj, name) for name in names}
    return {name: v.hex() if isinstance(v, bytes) else v for name, v in values.items()}


def _quote_fields(quote: Quote) -> dict[str, object]:
    h, body = quote.header, quote.body
    tee_name = {0: "SGX", 0x81: "TDX"}.get(h.tee_type, "unknown")
    vendor = " (Intel)" if h.qe_vendor_id == INTEL_QE_VENDOR_ID else " (not Intel)"
    out: dict[str, object] = {
        "format": f"DCAP quote v{h.version}, {quote.tee.value.upper()} report body ({len(body.raw)} bytes)",
        "version": h.version,
        "att_key_type": h.att_key_type,
        "tee_type": f"0x{h.tee_type:08x} ({tee_name})",
        "qe_svn": h.qe_svn,
        "pce_svn": h.pce_svn,
        "qe_vendor_id": h.qe_vendor_id.hex() + vendor,
        "user_data": h.user_data.hex(),
    }
    if isinstance(body, SgxReportBody):
        out |= _named(body, _SGX_FIELDS[:4])
        out |= {"attributes.flags": list(attribute_flag_names(body.flags)), "attributes.xfrm": f"0x{body.xfrm:x}"}
        out |= {"debug": body.debug, **_named(body, _SGX_FIELDS[4:])}
    else:
        out |= _named(body, _TD_FIELDS[:5])
        out |= {"td_attributes.flags": _flags(body.td_attributes_value, _TD_ATTRIBUTE_BITS), "debug": body.debug}
        out |= _named(body, _TD_FIELDS[5:]) | {f"rtmr{i}": rtmr.hex() for i, rtmr in enumerate(body.rtmrs)}
        if body.tee_tcb_svn2 is not None:
            out |= _named(body, ("tee_tcb_svn2", "mr_service_td"))
    qe, chain = quote.signature_data.qe, quote.pck_chain
    pck = chain.sgx_extension
    out |= {
        "report_data": body.report_data.hex(),
        "signed_length": quote.signed_length,
        "attestation_key": quote.signature_data.attestation_key.hex(),
        "qe_report.mr_enclave": qe.qe_report.mr_enclave.hex(),
        "qe_report.mr_signer": qe.qe_report.mr_signer.hex(),
        "qe_report.isv_prod_id": qe.qe_report.isv_prod_id,
        "qe_report.isv_svn": qe.qe_report.isv_svn,
        "qe_auth_data_size": len(qe.qe_auth_data),
        "pck.issuer": common_name(chain.leaf.issuer),
        "pck.fmspc": pck.fmspc.hex(),
        "pck.pce_id": pck.pce_id.hex(),
        "pck.pce_svn": pck.pce_svn,
        "pck.cpu_svn": pck.cpu_svn.hex(),
        "pck.sgx_type": pck.sgx_type,
        "pck.not_after": chain.leaf.not_valid_after_utc.isoformat(),
        "trailing_bytes": quote.trailing_bytes,
    }
    return out
