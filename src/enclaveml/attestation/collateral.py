"""DCAP collateral: CRLs, issuer chains, TCB Info and QE Identity (spec §1.6), typed.

``Collateral.from_dict`` is the one entry; the offline vectors, the directory loader and the
PCS/PCCS HTTP client all produce this dict layout (all values are text)::

    pck_crl_issuer_chain      PEM: PCK Processor/Platform CA ‖ Intel SGX Root CA
    root_ca_crl               hex DER (PEM accepted) CRL signed by the root
    pck_crl                   hex DER (PEM accepted) CRL signed by the PCK CA
    tcb_info_issuer_chain     PEM: Intel SGX TCB Signing ‖ root
    tcb_info                  the exact JSON text Intel signed (the ``tcbInfo`` value)
    tcb_info_signature        hex r‖s (64 bytes), ECDSA P-256 over the UTF-8 bytes of ``tcb_info``
    qe_identity_issuer_chain  PEM: Intel SGX TCB Signing ‖ root
    qe_identity               the exact JSON text Intel signed (the ``enclaveIdentity`` value)
    qe_identity_signature     hex r‖s over ``qe_identity``

The raw JSON text is kept next to its parsed form because the signature covers those bytes,
with no canonicalisation. Malformed collateral raises ``AttestationError("collateral_malformed")``;
an unreadable file raises ``ConfigError``.

Directory layout accepted by ``load_collateral(dir)``: ``dir/collateral.json`` holding the dict
above; failing that, the directory's single ``*collateral.json`` file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclaveml.attestation.certchain import load_crl, load_pem_chain
from enclaveml.attestation.claims import TcbStatus
from enclaveml.errors import AttestationError, ConfigError

__all__ = [
    "COLLATERAL_KEYS",
    "Collateral",
    "EnclaveTcbLevel",
    "QeIdentity",
    "TcbInfo",
    "TcbLevel",
    "TdxModule",
    "TdxModuleIdentity",
    "find_collateral_file",
    "load_collateral",
]

COLLATERAL_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)

# QVL TcbStatus.h: what a TCB Info level may say, and what a module or QE level may say.
_PLATFORM_STATUSES = frozenset(
    {
        TcbStatus.UP_TO_DATE,
        TcbStatus.SW_HARDENING_NEEDED,
        TcbStatus.CONFIGURATION_NEEDED,
        TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED,
        TcbStatus.OUT_OF_DATE,
        TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED,
        TcbStatus.REVOKED,
    }
)
_ENCLAVE_STATUSES = frozenset({TcbStatus.UP_TO_DATE, TcbStatus.OUT_OF_DATE, TcbStatus.REVOKED})


@dataclass(frozen=True)
class TcbLevel:
    """One ``tcbLevels`` entry of TCB Info: the minimum SVNs a platform needs for ``status``."""

    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...] | None
    tcb_date: datetime
    status: TcbStatus
    advisory_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnclaveTcbLevel:
    """A QE Identity or TDX module identity level: ``isvsvn`` at or above which ``status`` holds."""

    isv_svn: int
    tcb_date: datetime
    status: TcbStatus
    advisory_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class TdxModule:
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes


@dataclass(frozen=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[EnclaveTcbLevel, ...]


@dataclass(frozen=True)
class TcbInfo:
    """TCB Info v2 (SGX) or v3 (SGX, TDX). ``raw`` is the signed JSON text."""

    id: str  # "SGX" or "TDX" ("SGX" for v2, which has no id)
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tcb_levels: tuple[TcbLevel, ...]
    tdx_module: TdxModule | None = None
    tdx_module_identities: tuple[TdxModuleIdentity, ...] = ()
    raw: str = field(default="", repr=False)


@dataclass(frozen=True)
class QeIdentity:
    """QE Identity v2 ("QE" for SGX, "TD_QE" for TDX). ``raw`` is the signed JSON text."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    tcb_levels: tuple[EnclaveTcbLevel, ...]
    raw: str = field(default="", repr=False)


@dataclass(frozen=True)
class Collateral:
    """Everything a DCAP quote is verified against, besides the pinned root."""

    pck_crl_issuer_chain: tuple[x509.Certificate, ...]
    root_ca_crl: x509.CertificateRevocationList
    pck_crl: x509.CertificateRevocationList
    tcb_info_issuer_chain: tuple[x509.Certificate, ...]
    tcb_info: TcbInfo
    tcb_info_signature: bytes
    qe_identity_issuer_chain: tuple[x509.Certificate, ...]
    qe_identity: QeIdentity
    qe_identity_signature: bytes

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Collateral:
        """Build from the dict layout in the module docstring (the one entry)."""
        if not isinstance(data, Mapping):
            raise _malformed("collateral", f"expected a JSON object, got {type(data).__name__}")
        missing = [key for key in COLLATERAL_KEYS if key not in data]
        if missing:
            raise _malformed("collateral", f"missing key(s): {', '.join(missing)}")
        values = {key: data[key] for key in COLLATERAL_KEYS}
        for key, value in values.items():
            if not isinstance(value, str):
                raise _malformed(key, f"expected text, got {type(value).__name__}")
        return cls(
            pck_crl_issuer_chain=_certificates(values["pck_crl_issuer_chain"], "pck_crl_issuer_chain"),
            root_ca_crl=_crl(values["root_ca_crl"], "root_ca_crl"),
            pck_crl=_crl(values["pck_crl"], "pck_crl"),
            tcb_info_issuer_chain=_certificates(values["tcb_info_issuer_chain"], "tcb_info_issuer_chain"),
            tcb_info=parse_tcb_info(values["tcb_info"]),
            tcb_info_signature=_signature(values["tcb_info_signature"], "tcb_info_signature"),
            qe_identity_issuer_chain=_certificates(values["qe_identity_issuer_chain"], "qe_identity_issuer_chain"),
            qe_identity=parse_qe_identity(values["qe_identity"]),
            qe_identity_signature=_signature(values["qe_identity_signature"], "qe_identity_signature"),
        )

    def to_dict(self) -> dict[str, str]:
        """The dict layout again (PEM re-encoded, CRLs as hex DER, JSON text verbatim)."""
        return {
            "pck_crl_issuer_chain": _pem(self.pck_crl_issuer_chain),
            "root_ca_crl": self.root_ca_crl.public_bytes(Encoding.DER).hex(),
            "pck_crl": self.pck_crl.public_bytes(Encoding.DER).hex(),
            "tcb_info_issuer_chain": _pem(self.tcb_info_issuer_chain),
            "tcb_info": self.tcb_info.raw,
            "tcb_info_signature": self.tcb_info_signature.hex(),
            "qe_identity_issuer_chain": _pem(self.qe_identity_issuer_chain),
            "qe_identity": self.qe_identity.raw,
            "qe_identity_signature": self.qe_identity_signature.hex(),
        }

    @property
    def not_before(self) -> datetime:
        """Latest issue date of TCB Info, QE Identity and both CRLs: earliest usable ``now``."""
        return max(
            self.tcb_info.issue_date,
            self.qe_identity.issue_date,
            self.root_ca_crl.last_update_utc,
            self.pck_crl.last_update_utc,
        )

    @property
    def expiry(self) -> datetime:
        """Earliest ``nextUpdate`` of TCB Info, QE Identity and both CRLs: latest usable ``now``."""
        candidates = [self.tcb_info.next_update, self.qe_identity.next_update]
        candidates += [crl.next_update_utc for crl in (self.root_ca_crl, self.pck_crl) if crl.next_update_utc]
        return min(candidates)


def load_collateral(path: str | Path) -> Collateral:
    """Load collateral from a JSON file, or a directory laid out as the module docstring says."""
    target = Path(path)
    if target.is_dir():
        target = find_collateral_file(target)
    try:
        text = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read collateral {target}: {exc}", "pass a collateral JSON file or a directory holding one"
        ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _malformed("collateral", f"{target} is not JSON: {exc}") from exc
    return Collateral.from_dict(data)


def find_collateral_file(directory: Path) -> Path:
    """The collateral JSON in ``directory``: ``collateral.json``, else the only ``*collateral.json``."""
    preferred = directory / "collateral.json"
    if preferred.is_file():
        return preferred
    candidates = sorted(directory.glob("*collateral.json"))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "none"
    raise ConfigError(
        f"{directory} must hold collateral.json or exactly one *collateral.json (found: {found})",
        "pass the collateral JSON file itself",
    )


def parse_tcb_info(raw: str) -> TcbInfo:
    """Parse the signed ``tcbInfo`` JSON text (v2 or v3)."""
    obj = _json_object(raw, "tcb_info")
    version = _int(obj, "version", "tcb_info")
    if version not in (2, 3):
        raise _malformed("tcb_info", f"unsupported TCB Info version {version} (supported: 2, 3)")
    tee_id = _str(obj, "id", "tcb_info") if version >= 3 else "SGX"
    if tee_id not in ("SGX", "TDX"):
        raise _malformed("tcb_info", f"unknown TCB Info id {tee_id!r}")
    levels = tuple(_tcb_level(item, version, tee_id) for item in _list(obj, "tcbLevels", "tcb_info"))
    module = obj.get("tdxModule")
    identities = obj.get("tdxModuleIdentities", [])
    if not isinstance(identities, list):
        raise _malformed("tcb_info", "tdxModuleIdentities is not a list")
    return TcbInfo(
        id=tee_id,
        version=version,
        issue_date=_date(obj, "issueDate", "tcb_info"),
        next_update=_date(obj, "nextUpdate", "tcb_info"),
        fmspc=_hex(obj, "fmspc", "tcb_info", 6),
        pce_id=_hex(obj, "pceId", "tcb_info", 2),
        tcb_type=_int(obj, "tcbType", "tcb_info"),
        tcb_evaluation_data_number=_int(obj, "tcbEvaluationDataNumber", "tcb_info"),
        tcb_levels=levels,
        tdx_module=None if module is None else _tdx_module(module),
        tdx_module_identities=tuple(_tdx_module_identity(item) for item in identities),
        raw=raw,
    )


def parse_qe_identity(raw: str) -> QeIdentity:
    """Parse the signed ``enclaveIdentity`` JSON text (v2)."""
    obj = _json_object(raw, "qe_identity")
    version = _int(obj, "version", "qe_identity")
    if version != 2:
        raise _malformed("qe_identity", f"unsupported QE Identity version {version} (supported: 2)")
    return QeIdentity(
        id=_str(obj, "id", "qe_identity"),
        version=version,
        issue_date=_date(obj, "issueDate", "qe_identity"),
        next_update=_date(obj, "nextUpdate", "qe_identity"),
        tcb_evaluation_data_number=_int(obj, "tcbEvaluationDataNumber", "qe_identity"),
        miscselect=_hex(obj, "miscselect", "qe_identity", 4),
        miscselect_mask=_hex(obj, "miscselectMask", "qe_identity", 4),
        attributes=_hex(obj, "attributes", "qe_identity", 16),
        attributes_mask=_hex(obj, "attributesMask", "qe_identity", 16),
        mrsigner=_hex(obj, "mrsigner", "qe_identity", 32),
        isv_prod_id=_int(obj, "isvprodid", "qe_identity"),
        tcb_levels=tuple(_enclave_level(item, "qe_identity") for item in _list(obj, "tcbLevels", "qe_identity")),
        raw=raw,
    )


# -- field readers ----------------------------------------------------------------------------


def _malformed(what: str, detail: str) -> AttestationError:
    return AttestationError(
        "collateral_malformed", f"{what}: {detail}", "fetch the collateral again from Intel PCS or your PCCS"
    )


def _json_object(raw: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _malformed(what, f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _malformed(what, "not a JSON object")
    return obj


def _get(obj: Mapping[str, Any], key: str, what: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise _malformed(what, f"missing {key!r}")
    return obj[key]


def _int(obj: Mapping[str, Any], key: str, what: str) -> int:
    value = _get(obj, key, what)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _malformed(what, f"{key!r} is not a non-negative integer")
    return value


def _str(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = _get(obj, key, what)
    if not isinstance(value, str):
        raise _malformed(what, f"{key!r} is not a string")
    return value


def _list(obj: Mapping[str, Any], key: str, what: str) -> list[Any]:
    value = _get(obj, key, what)
    if not isinstance(value, list):
        raise _malformed(what, f"{key!r} is not a list")
    return value


_HEX = re.compile(r"\A(?:[0-9a-fA-F]{2})*\Z")


def _hex(obj: Mapping[str, Any], key: str, what: str, size: int) -> bytes:
    value = _str(obj, key, what)
    if not _HEX.match(value) or len(value) != 2 * size:
        raise _malformed(what, f"{key!r} is not {size} bytes of hex")
    return bytes.fromhex(value)


def _date(obj: Mapping[str, Any], key: str, what: str) -> datetime:
    value = _str(obj, key, what)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise _malformed(what, f"{key!r} is not an ISO 8601 date: {value!r}") from exc
    if parsed.tzinfo is None:
        raise _malformed(what, f"{key!r} has no time zone: {value!r}")
    return parsed


def _status(obj: Mapping[str, Any], what: str, allowed: frozenset[TcbStatus]) -> TcbStatus:
    value = _str(obj, "tcbStatus", what)
    try:
        status = TcbStatus(value)
    except ValueError:
        status = None
    if status is None or status not in allowed:
        raise _malformed(what, f"unrecognised tcbStatus {value!r}")
    return status


def _advisories(obj: Mapping[str, Any], what: str) -> tuple[str, ...]:
    value = obj.get("advisoryIDs", [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _malformed(what, "advisoryIDs is not a list of strings")
    return tuple(value)


def _components(tcb: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    items = _list(tcb, key, what)
    if len(items) != 16:
        raise _malformed(what, f"{key!r} has {len(items)} components, expected 16")
    return tuple(_int(item, "svn", what) for item in items)


def _tcb_level(item: Any, version: int, tee_id: str) -> TcbLevel:
    what = "tcb_info.tcbLevels"
    tcb = _get(item, "tcb", what)
    if version == 2:
        sgx = tuple(_int(tcb, f"sgxtcbcomp{i:02d}svn", what) for i in range(1, 17))
        tdx = None
    else:
        sgx = _components(tcb, "sgxtcbcomponents", what)
        tdx = _components(tcb, "tdxtcbcomponents", what) if tee_id == "TDX" else None
    return TcbLevel(
        sgx_components=sgx,
        pce_svn=_int(tcb, "pcesvn", what),
        tdx_components=tdx,
        tcb_date=_date(item, "tcbDate", what),
        status=_status(item, what, _PLATFORM_STATUSES),
        advisory_ids=_advisories(item, what),
    )


def _enclave_level(item: Any, what: str) -> EnclaveTcbLevel:
    tcb = _get(item, "tcb", what)
    return EnclaveTcbLevel(
        isv_svn=_int(tcb, "isvsvn", what),
        tcb_date=_date(item, "tcbDate", what),
        status=_status(item, what, _ENCLAVE_STATUSES),
        advisory_ids=_advisories(item, what),
    )


def _tdx_module(obj: Any) -> TdxModule:
    what = "tcb_info.tdxModule"
    return TdxModule(
        mrsigner=_hex(obj, "mrsigner", what, 48),
        attributes=_hex(obj, "attributes", what, 8),
        attributes_mask=_hex(obj, "attributesMask", what, 8),
    )


def _tdx_module_identity(obj: Any) -> TdxModuleIdentity:
    what = "tcb_info.tdxModuleIdentities"
    return TdxModuleIdentity(
        id=_str(obj, "id", what),
        mrsigner=_hex(obj, "mrsigner", what, 48),
        attributes=_hex(obj, "attributes", what, 8),
        attributes_mask=_hex(obj, "attributesMask", what, 8),
        tcb_levels=tuple(_enclave_level(level, what) for level in _list(obj, "tcbLevels", what)),
    )


def _certificates(pem: str, what: str) -> tuple[x509.Certificate, ...]:
    try:
        return load_pem_chain(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise _malformed(what, f"not a PEM certificate chain: {exc}") from exc


def _crl(text: str, what: str) -> x509.CertificateRevocationList:
    try:
        return load_crl(text)
    except ValueError as exc:
        raise _malformed(what, f"not a hex DER or PEM CRL: {exc}") from exc


def _signature(text: str, what: str) -> bytes:
    if not _HEX.match(text) or len(text) != 128:
        raise _malformed(what, "not a 64-byte hex r‖s signature")
    return bytes.fromhex(text)


def _pem(certificates: tuple[x509.Certificate, ...]) -> str:
    return "".join(cert.public_bytes(Encoding.PEM).decode("ascii") for cert in certificates)
