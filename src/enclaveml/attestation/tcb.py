"""TCB level matching and status convergence: spec §1.7 steps 9, 11 and 12 (QVL ``TcbLevelCheck``).

Pure functions over parsed collateral and quote fields. "No level matches" is a *status*
(``TcbStatus.TCB_NOT_SUPPORTED``), never an exception: it is Intel's verdict, not a failed check.

Convergence follows QVL, not "most severe wins":

- module OutOfDate turns a TDX UpToDate / SWHardeningNeeded level into OutOfDate and a
  ConfigurationNeeded / ConfigurationAndSWHardeningNeeded level into OutOfDateConfigurationNeeded;
  module Revoked gives Revoked;
- the QE status converges the same way, and a QE below every QE level gives TcbNotSupported;
- TD 1.5 quotes whose platform is behind only in the running TD may get TDRelaunchAdvised
  (QVL ``checkForRelaunch``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from enclaveml.attestation.claims import TcbStatus
from enclaveml.attestation.collateral import EnclaveTcbLevel, QeIdentity, TcbInfo, TcbLevel, TdxModuleIdentity
from enclaveml.attestation.pck import SgxExtension
from enclaveml.attestation.quote import TdReportBody
from enclaveml.errors import AttestationError

__all__ = [
    "TcbVerdict",
    "check_for_relaunch",
    "converge_with_qe",
    "converge_with_tdx_module",
    "evaluate_tcb",
    "find_tdx_module_identity",
    "match_qe_tcb_level",
    "match_tcb_levels",
    "sorted_tcb_levels",
]

_CONFIGURATION_NEEDED = frozenset(
    {
        TcbStatus.CONFIGURATION_NEEDED,
        TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED,
        TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED,
        TcbStatus.TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED,
    }
)


@dataclass(frozen=True)
class TcbVerdict:
    """Intel's TCB verdict for a quote.

    ``status`` is final. ``platform_status`` is before the QE status was folded in: the SGX
    level's status, or for TDX the TDX level's status converged with the module status (and,
    for TD 1.5, the relaunch check).
    """

    status: TcbStatus
    platform_status: TcbStatus
    sgx_level: TcbLevel | None
    tdx_level: TcbLevel | None = None
    module_status: TcbStatus | None = None
    module_level: EnclaveTcbLevel | None = None

    @property
    def advisory_ids(self) -> tuple[str, ...]:
        level = self.tdx_level or self.sgx_level
        ids = level.advisory_ids if level is not None else ()
        if self.module_level is not None:
            ids += self.module_level.advisory_ids
        return unique(ids)

    @property
    def tcb_date(self) -> datetime | None:
        level = self.tdx_level or self.sgx_level
        return None if level is None else level.tcb_date


def unique(items: Iterable[str]) -> tuple[str, ...]:
    """Items in first-seen order, without repeats."""
    return tuple(dict.fromkeys(items))


def sorted_tcb_levels(tcb_info: TcbInfo) -> tuple[TcbLevel, ...]:
    """TCB levels highest first, as QVL orders them (a set ordered by SGX SVNs, PCESVN, TDX SVNs).

    Levels with equal keys collapse to the first, as in QVL's ``std::set``.
    """
    keyed: dict[tuple[tuple[int, ...], int, tuple[int, ...]], TcbLevel] = {}
    for level in tcb_info.tcb_levels:
        key = (level.sgx_components, level.pce_svn, level.tdx_components or ())
        keyed.setdefault(key, level)
    return tuple(keyed[key] for key in sorted(keyed, reverse=True))


def _sgx_meets(pck: SgxExtension, level: TcbLevel) -> bool:
    """4.1.2.4.17.1-2: every PCK component SVN and the PCESVN at or above the level's."""
    components_ok = all(have >= need for have, need in zip(pck.cpu_svn_components, level.sgx_components, strict=True))
    return components_ok and pck.pce_svn >= level.pce_svn


def _tdx_meets(tee_tcb_svn: bytes, level: TcbLevel) -> bool:
    """4.1.2.4.17.3: TEE_TCB_SVN at or above the level; bytes 0-1 are skipped when byte 1 (module version) > 0."""
    needed = level.tdx_components or (0,) * 16
    first = 2 if tee_tcb_svn[1] > 0 else 0
    return all(tee_tcb_svn[i] >= needed[i] for i in range(first, 16))


def match_qe_tcb_level(qe_identity: QeIdentity, isv_svn: int) -> EnclaveTcbLevel | None:
    """Step 9: the highest QE Identity level whose ``isvsvn`` the QE meets; ``None`` if below all."""
    return _match_isv_level(qe_identity.tcb_levels, isv_svn)


def _match_isv_level(levels: Sequence[EnclaveTcbLevel], isv_svn: int) -> EnclaveTcbLevel | None:
    for level in sorted(levels, key=lambda lvl: lvl.isv_svn, reverse=True):
        if isv_svn >= level.isv_svn:
            return level
    return None


def find_tdx_module_identity(tcb_info: TcbInfo, module_version: int) -> TdxModuleIdentity | None:
    """The ``tdxModuleIdentities`` entry with id ``TDX_%02X`` of the module version (TEE_TCB_SVN[1])."""
    wanted = f"TDX_{module_version:02X}"
    for identity in tcb_info.tdx_module_identities:
        if identity.id.upper() == wanted:
            return identity
    return None


def evaluate_tcb(
    tcb_info: TcbInfo, pck: SgxExtension, td_body: TdReportBody | None, qe_status: TcbStatus
) -> TcbVerdict:
    """Steps 11-12, QVL ``checkTcbLevel``: match the levels, then converge module, relaunch and QE statuses.

    As in QVL, "no SGX level", "no TDX level", "no module level" and a Revoked TDX level are
    final: the QE status is not folded into them.
    """
    sgx_level, tdx_level = match_tcb_levels(tcb_info, pck, td_body)
    if sgx_level is None:
        return TcbVerdict(TcbStatus.TCB_NOT_SUPPORTED, TcbStatus.TCB_NOT_SUPPORTED, None)
    if td_body is None:
        return TcbVerdict(converge_with_qe(sgx_level.status, qe_status), sgx_level.status, sgx_level)
    if tdx_level is None:
        return TcbVerdict(TcbStatus.TCB_NOT_SUPPORTED, TcbStatus.TCB_NOT_SUPPORTED, sgx_level)

    module_status, module_level = _tdx_module_status(tcb_info, td_body.tee_tcb_svn)
    if module_status is TcbStatus.TCB_NOT_SUPPORTED:
        return TcbVerdict(module_status, module_status, sgx_level, tdx_level, module_status)
    platform = converge_with_tdx_module(tdx_level.status, module_status)
    verdict = TcbVerdict(platform, platform, sgx_level, tdx_level, module_status, module_level)
    if platform is TcbStatus.REVOKED:
        return verdict
    if td_body.tee_tcb_svn2 is not None:
        platform = check_for_relaunch(tcb_info, td_body, verdict, qe_status)
    return replace(verdict, status=converge_with_qe(platform, qe_status), platform_status=platform)


def match_tcb_levels(
    tcb_info: TcbInfo, pck: SgxExtension, td_body: TdReportBody | None
) -> tuple[TcbLevel | None, TcbLevel | None]:
    """Step 11 (QVL ``matchTcbLevels``): the first level, highest first, the PCK TCB meets (the SGX
    level); for TDX, continuing from it, the first level TEE_TCB_SVN also meets (the TDX level)."""
    sgx_level: TcbLevel | None = None
    for level in sorted_tcb_levels(tcb_info):
        if not _sgx_meets(pck, level):
            continue
        if td_body is None:
            return level, None
        sgx_level = sgx_level or level
        if _tdx_meets(td_body.tee_tcb_svn, level):
            return sgx_level, level
    return sgx_level, None


def _tdx_module_status(tcb_info: TcbInfo, tee_tcb_svn: bytes) -> tuple[TcbStatus, EnclaveTcbLevel | None]:
    """4.1.2.4.17.4.1 (QVL ``checkTdxModuleTcbStatus``): module version 0 is judged by the TDX level alone."""
    if tee_tcb_svn[1] == 0:
        return TcbStatus.UP_TO_DATE, None
    identity = find_tdx_module_identity(tcb_info, tee_tcb_svn[1])
    if identity is None:  # step 6 already refused this quote; kept total for direct callers
        return TcbStatus.TCB_NOT_SUPPORTED, None
    level = _match_isv_level(identity.tcb_levels, tee_tcb_svn[0])
    if level is None:
        return TcbStatus.TCB_NOT_SUPPORTED, None
    return level.status, level


def converge_with_tdx_module(tdx_status: TcbStatus, module_status: TcbStatus) -> TcbStatus:
    """QVL ``convergeTcbStatusWithTdxModuleStatus``."""
    if module_status is TcbStatus.OUT_OF_DATE:
        if tdx_status in (TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED):
            return TcbStatus.OUT_OF_DATE
        if tdx_status in (TcbStatus.CONFIGURATION_NEEDED, TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED):
            return TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED
    if module_status is TcbStatus.REVOKED:
        return TcbStatus.REVOKED
    return tdx_status


def converge_with_qe(platform_status: TcbStatus, qe_status: TcbStatus) -> TcbStatus:
    """Step 12, QVL ``convergeTcbStatusWithQeTcbStatus``; ``qe_status`` TcbNotSupported = below every QE level."""
    if qe_status is TcbStatus.OUT_OF_DATE:
        if platform_status in (TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED):
            return TcbStatus.OUT_OF_DATE
        if platform_status in (TcbStatus.CONFIGURATION_NEEDED, TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED):
            return TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED
    if qe_status is TcbStatus.REVOKED:
        return TcbStatus.REVOKED
    if qe_status is TcbStatus.TCB_NOT_SUPPORTED:
        return TcbStatus.TCB_NOT_SUPPORTED
    return platform_status


def check_for_relaunch(
    tcb_info: TcbInfo, td_body: TdReportBody, platform: TcbVerdict, qe_status: TcbStatus
) -> TcbStatus:
    """4.1.2.4.17.4.3 (QVL ``checkForRelaunch``), TD 1.5 only: would relaunching the TD bring it up to date?

    Applies when the SGX level is fine but the TDX level and the module are OutOfDate, and the
    SVNs the TDX module reports it *could* run at (TEE_TCB_SVN2) meet the latest level.
    """
    status = platform.platform_status
    svn2 = td_body.tee_tcb_svn2
    sgx_status = platform.sgx_level.status if platform.sgx_level else None
    qe_behind = qe_status in (TcbStatus.OUT_OF_DATE, TcbStatus.REVOKED, TcbStatus.TCB_NOT_SUPPORTED)
    if svn2 is None or platform.tdx_level is None or qe_behind:
        return status
    if sgx_status not in (
        TcbStatus.UP_TO_DATE,
        TcbStatus.SW_HARDENING_NEEDED,
        TcbStatus.CONFIGURATION_NEEDED,
        TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED,
    ):
        return status
    if status not in (TcbStatus.OUT_OF_DATE, TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED):
        return status
    if platform.module_status is not TcbStatus.OUT_OF_DATE:
        return status
    latest = sorted_tcb_levels(tcb_info)[0]
    latest_tdx = latest.tdx_components or (0,) * 16
    if svn2[1] == 0:
        relaunch_fixes = svn2[0] >= latest_tdx[0] and svn2[2] >= latest_tdx[2]
    else:
        identity = find_tdx_module_identity(tcb_info, svn2[1])
        if identity is None:
            raise AttestationError(
                "tdx_module_mismatch",
                f"TEE_TCB_SVN2 names TDX module version {svn2[1]} but TCB Info has no TDX_{svn2[1]:02X} identity",
            )
        if not identity.tcb_levels:
            return TcbStatus.TCB_NOT_SUPPORTED
        latest_module = max(level.isv_svn for level in identity.tcb_levels)
        relaunch_fixes = svn2[0] >= latest_module and svn2[2] >= latest_tdx[2]
    if not relaunch_fixes:
        return status
    if sgx_status in _CONFIGURATION_NEEDED or status in _CONFIGURATION_NEEDED:
        return TcbStatus.TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED
    return TcbStatus.TD_RELAUNCH_ADVISED
