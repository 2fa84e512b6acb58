"""The claims model every kind of evidence verifies into, and Intel's TCB statuses.

A DCAP quote (SGX or TDX), an Azure Attestation token and simulated evidence all end as
one ``Claims`` object, so a policy (``policy.py``) is written once for every TEE.
Measurements are raw bytes; ``to_json`` renders them as lowercase hex.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum

__all__ = ["Claims", "TcbStatus", "TeeType"]


class TeeType(StrEnum):
    SGX = "sgx"
    TDX = "tdx"
    SNP = "snp"
    SIM = "sim"


class TcbStatus(StrEnum):
    """Intel's TCB status names (QVL ``TcbStatus.h``), plus ``Simulated`` for the sim TEE.

    ``severity`` orders them as dcap-qvl does ("most severe wins"); ``merge`` keeps the worse.
    """

    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    TD_RELAUNCH_ADVISED = "TDRelaunchAdvised"
    TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED = "TDRelaunchAdvisedConfigurationNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    REVOKED = "Revoked"
    TCB_NOT_SUPPORTED = "TcbNotSupported"
    SIMULATED = "Simulated"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    def merge(self, other: TcbStatus) -> TcbStatus:
        """The worse of the two statuses."""
        return self if self.severity >= other.severity else other


_SEVERITY = {status: rank for rank, status in enumerate(TcbStatus)}


@dataclass(frozen=True)
class Claims:
    """What verified evidence says about a workload. Fields a TEE lacks stay ``None``.

    ``insecure`` is true when the evidence proves nothing about the hardware (simulation):
    every consumer must log such an acceptance as insecure.
    """

    tee: TeeType
    source: str  # e.g. "dcap-quote-v3", "dcap-quote-v4", "maa", "sim"
    report_data: bytes  # 64 bytes chosen by the workload (key binding, nonce)
    debug: bool
    tcb_status: TcbStatus
    advisory_ids: tuple[str, ...] = ()
    # SGX enclave identity
    mr_enclave: bytes | None = None
    mr_signer: bytes | None = None
    isv_prod_id: int | None = None
    isv_svn: int | None = None
    attributes: bytes | None = None
    # TDX trust domain identity
    mr_td: bytes | None = None
    rtmrs: tuple[bytes, ...] | None = None
    mr_config_id: bytes | None = None
    mr_owner: bytes | None = None
    mr_owner_config: bytes | None = None
    td_attributes: bytes | None = None
    xfam: bytes | None = None
    tee_tcb_svn: bytes | None = None
    mr_seam: bytes | None = None
    mr_signer_seam: bytes | None = None
    # where the verdict came from
    fmspc: str | None = None
    collateral_expiry: datetime | None = None
    insecure: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict: bytes as hex, enums and datetimes as strings, ``None`` dropped."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "extra" and not value):
                continue
            out[f.name] = _jsonable(value)
        return out


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
