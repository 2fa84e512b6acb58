"""TCB level matching and QVL's convergence rules (spec §1.7 steps 11-12), as pure functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pki import DEFAULT_CPU_SVN, FakeIntelPki, enclave_level, tcb_level

from enclaveml.attestation.claims import TcbStatus
from enclaveml.attestation.collateral import Collateral, TcbInfo
from enclaveml.attestation.quote import TdReportBody, parse_quote
from enclaveml.attestation.tcb import (
    converge_with_qe,
    converge_with_tdx_module,
    evaluate_tcb,
    match_tcb_levels,
    sorted_tcb_levels,
)

S = TcbStatus
DCAP = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "dcap"

# (platform status, QE status) -> converged, from QVL convergeTcbStatusWithQeTcbStatus.
_QE_CONVERGENCE = [
    (S.UP_TO_DATE, S.UP_TO_DATE, S.UP_TO_DATE),
    (S.UP_TO_DATE, S.OUT_OF_DATE, S.OUT_OF_DATE),
    (S.SW_HARDENING_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE),
    (S.CONFIGURATION_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED),
    (S.CONFIGURATION_AND_SW_HARDENING_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED),
    (S.OUT_OF_DATE_CONFIGURATION_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED),
    (S.TD_RELAUNCH_ADVISED, S.OUT_OF_DATE, S.TD_RELAUNCH_ADVISED),
    (S.CONFIGURATION_NEEDED, S.REVOKED, S.REVOKED),
    (S.UP_TO_DATE, S.TCB_NOT_SUPPORTED, S.TCB_NOT_SUPPORTED),
    (S.REVOKED, S.UP_TO_DATE, S.REVOKED),
    (S.SW_HARDENING_NEEDED, S.UP_TO_DATE, S.SW_HARDENING_NEEDED),
]


@pytest.mark.parametrize(("platform", "qe", "expected"), _QE_CONVERGENCE)
def test_qe_convergence_follows_qvl(platform: TcbStatus, qe: TcbStatus, expected: TcbStatus) -> None:
    assert converge_with_qe(platform, qe) is expected


@pytest.mark.parametrize(
    ("tdx", "module", "expected"),
    [
        (S.UP_TO_DATE, S.UP_TO_DATE, S.UP_TO_DATE),
        (S.UP_TO_DATE, S.OUT_OF_DATE, S.OUT_OF_DATE),
        (S.SW_HARDENING_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE),
        (S.CONFIGURATION_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED),
        (S.OUT_OF_DATE, S.OUT_OF_DATE, S.OUT_OF_DATE),
        (S.CONFIGURATION_NEEDED, S.REVOKED, S.REVOKED),
        (S.CONFIGURATION_NEEDED, S.UP_TO_DATE, S.CONFIGURATION_NEEDED),
    ],
)
def test_tdx_module_convergence_follows_qvl(tdx: TcbStatus, module: TcbStatus, expected: TcbStatus) -> None:
    assert converge_with_tdx_module(tdx, module) is expected


def _tcb_info(levels: list[dict[str, object]]) -> TcbInfo:
    pki = FakeIntelPki()
    return Collateral.from_dict(pki.collateral(pki.tcb_info_sgx(levels), pki.qe_identity())).tcb_info


def test_levels_are_ordered_highest_first_whatever_the_json_order() -> None:
    low = tcb_level([1] * 16, 1, "OutOfDate")
    high = tcb_level([2] * 16, 1, "UpToDate")
    same_cpu_higher_pce = tcb_level([1] * 16, 5, "SWHardeningNeeded")

    ordered = sorted_tcb_levels(_tcb_info([low, high, same_cpu_higher_pce]))

    assert [level.status for level in ordered] == [S.UP_TO_DATE, S.SW_HARDENING_NEEDED, S.OUT_OF_DATE]


def test_every_component_must_meet_the_level() -> None:
    one_short = list(DEFAULT_CPU_SVN)
    one_short[7] += 1  # the platform is one SVN behind in component 8 only
    info = _tcb_info([tcb_level(one_short, 1, "UpToDate"), tcb_level([0] * 16, 1, "OutOfDate")])
    pki = FakeIntelPki()
    pck = parse_quote(pki.sgx_quote()).pck_chain.sgx_extension

    sgx_level, tdx_level = match_tcb_levels(info, pck, None)

    assert sgx_level is not None
    assert (sgx_level.status, tdx_level) == (S.OUT_OF_DATE, None)


def test_the_v5_vector_matches_no_sgx_level() -> None:
    collateral = Collateral.from_dict(
        json.loads((DCAP / "dcapqvl_tdx_quote_v5_notcbmatch_collateral.json").read_text())
    )
    quote = parse_quote((DCAP / "dcapqvl_tdx_quote_v5_notcbmatch.bin").read_bytes())
    assert isinstance(quote.body, TdReportBody)

    verdict = evaluate_tcb(collateral.tcb_info, quote.pck_chain.sgx_extension, quote.body, S.UP_TO_DATE)

    assert (verdict.sgx_level, verdict.status, verdict.platform_status) == (
        None,
        S.TCB_NOT_SUPPORTED,
        S.TCB_NOT_SUPPORTED,
    )
    # Component 8 of the PCK is 3; every level asks for 5.
    assert quote.pck_chain.sgx_extension.cpu_svn_components[7] == 3
    assert {level.sgx_components[7] for level in collateral.tcb_info.tcb_levels} == {5}


def test_a_revoked_tdx_level_is_final_even_when_the_qe_is_unsupported() -> None:
    pki = FakeIntelPki()
    tdx = [6, 0, 3] + [0] * 13
    info = pki.tcb_info_tdx([tcb_level(pki.cpu_svn, pki.pce_svn, "Revoked", tdx=tdx)])
    tcb_info = Collateral.from_dict(pki.collateral(info, pki.qe_identity(tdx=True))).tcb_info
    quote = parse_quote(pki.tdx_quote())
    assert isinstance(quote.body, TdReportBody)

    verdict = evaluate_tcb(tcb_info, quote.pck_chain.sgx_extension, quote.body, S.TCB_NOT_SUPPORTED)

    assert verdict.status is S.REVOKED


def test_a_module_below_every_module_level_is_tcb_not_supported() -> None:
    pki = FakeIntelPki()
    info = pki.tcb_info_tdx(module_levels=[enclave_level(7, "UpToDate")])
    tcb_info = Collateral.from_dict(pki.collateral(info, pki.qe_identity(tdx=True))).tcb_info
    quote = parse_quote(pki.tdx_quote())
    assert isinstance(quote.body, TdReportBody)

    verdict = evaluate_tcb(tcb_info, quote.pck_chain.sgx_extension, quote.body, S.UP_TO_DATE)

    assert (verdict.status, verdict.module_status) == (S.TCB_NOT_SUPPORTED, S.TCB_NOT_SUPPORTED)
