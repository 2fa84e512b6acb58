"""Collateral: loading the vectors' JSON layout from a dict, a file or a directory, typed TCB Info
and QE Identity, and ``collateral_malformed`` for anything else."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pki import FakeIntelPki

from enclaveml.attestation.claims import TcbStatus
from enclaveml.attestation.collateral import COLLATERAL_KEYS, Collateral, load_collateral
from enclaveml.errors import AttestationError, ConfigError

DCAP = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "dcap"
SGX_FILE = DCAP / "dcapqvl_sgx_quote_v3_collateral.json"
TDX_FILE = DCAP / "dcapqvl_tdx_quote_v4_collateral.json"


def _raw(path: Path) -> dict[str, str]:
    data: dict[str, str] = json.loads(path.read_text())
    return data


def test_sgx_tcb_info_and_qe_identity_are_typed() -> None:
    collateral = Collateral.from_dict(_raw(SGX_FILE))

    info = collateral.tcb_info
    assert (info.id, info.version, info.fmspc.hex(), info.pce_id) == ("SGX", 3, "00a067110000", b"\x00\x00")
    assert info.issue_date == datetime(2025, 6, 19, 10, 56, 11, tzinfo=UTC)
    assert all(len(level.sgx_components) == 16 and level.tdx_components is None for level in info.tcb_levels)
    assert info.tdx_module is None
    identity = collateral.qe_identity
    assert (identity.id, identity.version, identity.isv_prod_id) == ("QE", 2, 1)
    assert identity.mrsigner.hex() == "8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff"
    assert identity.attributes_mask.hex() == "fbffffffffffffff0000000000000000"
    assert len(collateral.tcb_info_signature) == 64
    assert collateral.tcb_info.raw == _raw(SGX_FILE)["tcb_info"]  # the signed text, verbatim


def test_tdx_tcb_info_has_module_identities() -> None:
    info = Collateral.from_dict(_raw(TDX_FILE)).tcb_info

    assert info.id == "TDX"
    assert info.tdx_module is not None
    assert info.tdx_module.mrsigner == b"\x00" * 48
    assert [identity.id for identity in info.tdx_module_identities] == ["TDX_03", "TDX_01"]
    tdx_01 = info.tdx_module_identities[1]
    assert [(level.isv_svn, level.status) for level in tdx_01.tcb_levels] == [
        (4, TcbStatus.UP_TO_DATE),
        (2, TcbStatus.OUT_OF_DATE),
    ]
    assert info.tcb_levels[0].tdx_components is not None
    assert info.tcb_levels[0].tdx_components[:3] == (5, 0, 2)
    assert info.tcb_levels[1].advisory_ids[0] == "INTEL-SA-00106"


def test_to_dict_round_trips() -> None:
    collateral = Collateral.from_dict(_raw(TDX_FILE))

    again = Collateral.from_dict(collateral.to_dict())

    assert again == collateral
    assert collateral.to_dict()["pck_crl"] == _raw(TDX_FILE)["pck_crl"]


def test_load_from_a_file(tmp_path: Path) -> None:
    assert load_collateral(SGX_FILE) == Collateral.from_dict(_raw(SGX_FILE))


def test_load_from_a_directory_with_collateral_json(tmp_path: Path) -> None:
    (tmp_path / "collateral.json").write_text(SGX_FILE.read_text())
    (tmp_path / "other_collateral.json").write_text(TDX_FILE.read_text())

    assert load_collateral(tmp_path).tcb_info.id == "SGX"


def test_load_from_a_directory_with_one_named_file(tmp_path: Path) -> None:
    (tmp_path / "b0c06f000000_collateral.json").write_text(TDX_FILE.read_text())

    assert load_collateral(tmp_path).tcb_info.id == "TDX"


def test_a_directory_with_two_candidates_is_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "a_collateral.json").write_text(SGX_FILE.read_text())
    (tmp_path / "b_collateral.json").write_text(TDX_FILE.read_text())

    with pytest.raises(ConfigError, match=r"a_collateral\.json, b_collateral\.json"):
        load_collateral(tmp_path)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read collateral"):
        load_collateral(tmp_path / "absent.json")


def test_a_file_that_is_not_json_is_malformed(tmp_path: Path) -> None:
    (tmp_path / "collateral.json").write_text("{not json")

    with pytest.raises(AttestationError) as caught:
        load_collateral(tmp_path)

    assert caught.value.reason == "collateral_malformed"


def _malformed(data: Any) -> str:
    with pytest.raises(AttestationError) as caught:
        Collateral.from_dict(data)
    assert caught.value.reason == "collateral_malformed"
    return caught.value.what


def test_missing_keys_are_named() -> None:
    data = _raw(SGX_FILE)
    del data["pck_crl"]
    del data["qe_identity"]

    assert "pck_crl, qe_identity" in _malformed(data)


def test_not_a_mapping() -> None:
    assert "JSON object" in _malformed(["not", "a", "dict"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("root_ca_crl", "zz", "CRL"),
        ("pck_crl", "-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n", "CRL"),
        ("tcb_info_signature", "00" * 63, "64-byte"),
        ("tcb_info_issuer_chain", "no pem here", "PEM"),
        ("tcb_info", "[1, 2]", "JSON object"),
        ("qe_identity", "{", "not JSON"),
    ],
)
def test_malformed_values_are_named(key: str, value: str, message: str) -> None:
    data = {**_raw(SGX_FILE), key: value}

    what = _malformed(data)

    assert key in what or key.split("_signature")[0] in what
    assert message in what


def _with_tcb_info(change: dict[str, Any]) -> dict[str, str]:
    data = _raw(SGX_FILE)
    data["tcb_info"] = json.dumps({**json.loads(data["tcb_info"]), **change})
    return data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 4}, "unsupported TCB Info version 4"),
        ({"id": "SEV"}, "unknown TCB Info id"),
        ({"fmspc": "00A0"}, "'fmspc' is not 6 bytes of hex"),
        ({"issueDate": "yesterday"}, "not an ISO 8601 date"),
        ({"nextUpdate": "2025-07-19T10:56:11"}, "no time zone"),
        ({"tcbLevels": [{"tcb": {}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": "UpToDate"}]}, "sgxtcbcomponents"),
        ({"tcbEvaluationDataNumber": -1}, "non-negative integer"),
    ],
)
def test_malformed_tcb_info_fields(change: dict[str, Any], message: str) -> None:
    assert message in _malformed(_with_tcb_info(change))


def test_unknown_tcb_status_is_refused() -> None:
    data = _raw(SGX_FILE)
    data["tcb_info"] = re.sub(r'"tcbStatus":"\w+"', '"tcbStatus":"Fine"', data["tcb_info"], count=1)

    assert "unrecognised tcbStatus 'Fine'" in _malformed(data)


def test_qe_level_may_not_say_configuration_needed() -> None:
    data = _raw(SGX_FILE)
    data["qe_identity"] = data["qe_identity"].replace('"UpToDate"', '"ConfigurationNeeded"', 1)

    assert "unrecognised tcbStatus" in _malformed(data)


def test_tcb_info_v2_levels_are_read() -> None:
    pki = FakeIntelPki()
    level = {f"sgxtcbcomp{i:02d}svn": i for i in range(1, 17)} | {"pcesvn": 9}
    v2 = {key: value for key, value in pki.tcb_info_sgx().items() if key not in ("id", "version")}
    v2 |= {"version": 2, "tcbLevels": [{"tcb": level, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "OutOfDate"}]}

    info = Collateral.from_dict(pki.collateral(v2, pki.qe_identity())).tcb_info

    assert (info.id, info.version) == ("SGX", 2)
    assert info.tcb_levels[0].sgx_components == tuple(range(1, 17))
    assert info.tcb_levels[0].pce_svn == 9


def test_every_documented_key_is_required() -> None:
    assert set(COLLATERAL_KEYS) == set(_raw(SGX_FILE))
