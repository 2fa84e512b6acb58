"""The attestation policy: one file format for every TEE, every check named, secure defaults."""

from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.attestation.policy import Decision, Policy, PolicyViolation
from enclaveml.attestation.sim import SimulationKey, create_sim_evidence, verify_sim_evidence
from enclaveml.errors import PolicyError

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
MR_ENCLAVE = bytes.fromhex("aa" * 32)
MR_SIGNER = bytes.fromhex("bb" * 32)
MR_TD = bytes.fromhex("cc" * 48)
RTMRS = tuple(bytes([0xD0 + i]) * 48 for i in range(4))
MR_CONFIG_ID = bytes(48)
SIM_MEASUREMENT = bytes.fromhex("ee" * 48)
SIM_HEX = SIM_MEASUREMENT.hex()

POLICY_TOML = f"""
name = "p-3"
tee = ["sgx", "tdx"]
mr_enclave = ["{MR_ENCLAVE.hex()}", "{SIM_MEASUREMENT.hex()}"]
mr_signer = ["{MR_SIGNER.hex()}"]
isv_prod_id = 7
min_isv_svn = 3
mr_td = ["{MR_TD.hex()}"]
rtmr0 = "{RTMRS[0].hex()}"
rtmr1 = ["{RTMRS[1].hex()}"]
rtmr2 = ["{RTMRS[2].hex()}"]
rtmr3 = ["{RTMRS[3].hex()}"]
mr_config_id = "{MR_CONFIG_ID.hex()}"
allowed_advisory_ids = ["INTEL-SA-00615"]
"""


def sgx_claims(**changes: Any) -> Claims:
    claims = Claims(
        tee=TeeType.SGX,
        source="dcap-quote-v3",
        report_data=bytes(64),
        debug=False,
        tcb_status=TcbStatus.UP_TO_DATE,
        mr_enclave=MR_ENCLAVE,
        mr_signer=MR_SIGNER,
        isv_prod_id=7,
        isv_svn=3,
        collateral_expiry=NOW + timedelta(days=30),
    )
    return dataclasses.replace(claims, **changes)


def tdx_claims(**changes: Any) -> Claims:
    claims = Claims(
        tee=TeeType.TDX,
        source="dcap-quote-v4",
        report_data=bytes(64),
        debug=False,
        tcb_status=TcbStatus.UP_TO_DATE,
        mr_td=MR_TD,
        rtmrs=RTMRS,
        mr_config_id=MR_CONFIG_ID,
    )
    return dataclasses.replace(claims, **changes)


def sim_claims() -> Claims:
    key = SimulationKey.generate()
    evidence = create_sim_evidence(key, SIM_MEASUREMENT, bytes(64), b"n", NOW)
    return verify_sim_evidence(evidence, trusted_keys=[key.public_key], expected_nonce=b"n", now=NOW)


@pytest.fixture
def policy() -> Policy:
    return Policy.from_text(POLICY_TOML)


def checks(decision: Decision) -> list[str]:
    return [f.check for f in decision.failures]


# -- loading ------------------------------------------------------------------------------


def test_toml_and_json_files_load_into_the_same_policy(tmp_path: Path, policy: Policy) -> None:
    (tmp_path / "p.toml").write_text(POLICY_TOML)
    (tmp_path / "p.json").write_text(json.dumps(tomllib.loads(POLICY_TOML)))
    assert Policy.load(tmp_path / "p.toml") == Policy.load(tmp_path / "p.json") == policy
    assert policy.rtmr0 == (RTMRS[0],)
    assert policy.tcb_statuses == {TcbStatus.UP_TO_DATE}


def test_defaults_are_secure() -> None:
    policy = Policy.from_dict({"name": "p"})
    assert policy.tee == (TeeType.SGX, TeeType.TDX)
    assert policy.allowed_tcb_statuses == (TcbStatus.UP_TO_DATE,)
    assert not (policy.allow_debug)
    assert not (policy.allow_simulation)
    assert not (policy.allow_outdated_tcb_insecure)
    assert policy.allowed_advisory_ids is None


def test_unknown_field_is_refused_with_a_suggestion() -> None:
    with pytest.raises(PolicyError, match="unknown policy field `mr_enclav`") as info:
        Policy.from_dict({"name": "p", "mr_enclav": [MR_ENCLAVE.hex()]})
    assert info.value.hint == "did you mean `mr_enclave`?"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "`name` must be a string"),
        ({"allow_debug": "false"}, "`allow_debug` must be true or false"),
        ({"isv_prod_id": True}, "`isv_prod_id` must be an integer"),
        ({"min_isv_svn": 70000}, "out of range"),
        ({"mr_enclave": ["zz"]}, "is not hex"),
        ({"mr_signer": ["aa" * 48]}, "`mr_signer` value has 48 bytes"),
        ({"mr_td": []}, "`mr_td` is empty"),
        ({"tee": []}, "`tee` is empty"),
        ({"tee": ["sev"]}, "unknown value 'sev'"),
        ({"tee": ["snp"]}, "snp has no reference values"),
        ({"tee": ["sim"]}, "`tee` lists sim"),
        ({"allowed_tcb_statuses": ["Uptodate"]}, "unknown value 'Uptodate'"),
        ({"allowed_advisory_ids": [1]}, "must be a string or a list of strings"),
    ],
)
def test_malformed_fields_are_refused_at_load(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict({"name": "p", **fields} if fields else {})


@pytest.mark.parametrize("status", ["Revoked", "TcbNotSupported", "Simulated"])
def test_some_tcb_statuses_can_never_be_allowed(status: str) -> None:
    with pytest.raises(PolicyError, match=f"TCB status {status} can never be allowed"):
        Policy.from_dict({"name": "p", "allowed_tcb_statuses": ["UpToDate", status]})


def test_the_documented_example_loads() -> None:
    docs = Path(__file__).parents[2] / "docs" / "attestation" / "sim-and-policy.md"
    example = docs.read_text().split("```toml\n")[1].split("```")[0]
    policy = Policy.from_text(example)
    assert policy.name == "training-job"
    assert policy.tcb_statuses == {TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED}
    assert Policy.from_text(policy.to_toml()) == policy


def test_syntax_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('name = "p"\nmr_enclave = [\n')
    with pytest.raises(PolicyError, match=r"bad\.toml: policy is not valid TOML"):
        Policy.load(tmp_path / "bad.toml")


def test_to_toml_round_trips(policy: Policy) -> None:
    weakened = dataclasses.replace(
        policy, allow_debug=True, allow_hw_config_insecure=True, allowed_tcb_statuses=(TcbStatus.TD_RELAUNCH_ADVISED,)
    )
    for original in (policy, weakened, Policy(name="minimal")):
        text = original.to_toml()
        assert Policy.from_text(text) == original
        assert text == Policy.from_text(text).to_toml()


@given(st.text(st.characters(exclude_categories=["Cs"]), min_size=1))
def test_to_toml_round_trips_any_name(name: str) -> None:
    assert Policy.from_text(Policy(name=name).to_toml()).name == name


# -- evaluation ---------------------------------------------------------------------------


def test_matching_sgx_and_tdx_claims_pass_every_check(policy: Policy) -> None:
    claims = sgx_claims(advisory_ids=("INTEL-SA-00615",))
    for c in (claims, tdx_claims()):
        assert policy.verify(c, now=NOW) == Decision("p-3", allowed=True)


@pytest.mark.parametrize(
    ("claims", "check", "expected", "actual"),
    [
        (sgx_claims(tee=TeeType.SNP), "tee", "one of sgx, tdx", "snp"),
        (sgx_claims(debug=True), "debug", "off", "on"),
        (sgx_claims(tcb_status=TcbStatus.OUT_OF_DATE), "tcb_status", "UpToDate", "OutOfDate"),
        (sgx_claims(collateral_expiry=NOW), "collateral_expiry", f"after {NOW.isoformat()}", NOW.isoformat()),
        (sgx_claims(advisory_ids=("INTEL-SA-00615", "SA-2")), "advisory_ids", "INTEL-SA-00615", "SA-2"),
        (sgx_claims(mr_enclave=bytes(32)), "mr_enclave", f"one of {MR_ENCLAVE.hex()}, {SIM_HEX}", "00" * 32),
        (sgx_claims(mr_signer=bytes(32)), "mr_signer", MR_SIGNER.hex(), "00" * 32),
        (sgx_claims(isv_prod_id=8), "isv_prod_id", "7", "8"),
        (sgx_claims(isv_svn=2), "min_isv_svn", ">= 3", "2"),
        (tdx_claims(mr_td=bytes(48)), "mr_td", MR_TD.hex(), "00" * 48),
        (tdx_claims(rtmrs=(*RTMRS[:2], bytes(48), RTMRS[3])), "rtmr2", RTMRS[2].hex(), "00" * 48),
        (tdx_claims(rtmrs=None), "rtmr0", RTMRS[0].hex(), "(absent)"),
        (tdx_claims(mr_config_id=b"\x01" * 48), "mr_config_id", MR_CONFIG_ID.hex(), "01" * 48),
    ],
)
def test_each_check_fails_alone_with_expected_and_actual(
    policy: Policy, claims: Claims, check: str, expected: str, actual: str
) -> None:
    decision = policy.evaluate(claims, now=NOW)
    assert not decision.allowed
    first = decision.failures[0]
    assert (first.check, first.expected, first.actual) == (check, expected, actual)
    assert f"not allowed by policy p-3 (expected {expected})" in first.what
    if check != "rtmr0":  # absent RTMRs fail all four
        assert len(decision.failures) == 1


def test_every_failed_check_is_listed_in_order(policy: Policy) -> None:
    claims = sgx_claims(debug=True, tcb_status=TcbStatus.REVOKED, mr_enclave=bytes(32), isv_svn=0)
    decision = policy.evaluate(claims, now=NOW)
    assert checks(decision) == ["debug", "tcb_status", "mr_enclave", "min_isv_svn"]
    with pytest.raises(PolicyViolation) as info:
        policy.verify(claims, now=NOW)
    assert info.value.decision == decision
    assert str(info.value) == (
        "debug mode on is not allowed by policy p-3 (expected off); "
        "3 more failed check(s): tcb_status, mr_enclave, min_isv_svn"
    )


def test_refusal_names_status_policy_and_fix(policy: Policy) -> None:
    with pytest.raises(PolicyError) as info:
        policy.verify(sgx_claims(tcb_status=TcbStatus.SW_HARDENING_NEEDED), now=NOW)
    assert info.value.diagnostics() == (
        "TCB status SWHardeningNeeded is not allowed by policy p-3 (expected UpToDate) "
        "(allow it with `allowed_tcb_statuses` or `allow_sw_hardening_needed = true`, or update the platform)"
    )


def test_revoked_platform_hint_says_it_can_never_be_allowed(policy: Policy) -> None:
    decision = policy.evaluate(sgx_claims(tcb_status=TcbStatus.REVOKED), now=NOW)
    assert decision.failures[0].hint.startswith("this status can never be allowed")


def test_debug_enclave_is_refused_by_default_and_accepted_insecurely_when_allowed(
    policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    assert checks(policy.evaluate(sgx_claims(debug=True), now=NOW)) == ["debug"]
    with caplog.at_level(logging.WARNING, logger="enclaveml.attestation"):
        decision = dataclasses.replace(policy, allow_debug=True).verify(sgx_claims(debug=True), now=NOW)
    assert decision.insecure
    assert decision.insecure_reasons == ["debug enclave"]
    assert "policy p-3" in caplog.text


def test_simulation_is_refused_by_default(caplog: pytest.LogCaptureFixture) -> None:
    dev = Policy(name="dev", mr_enclave=(SIM_MEASUREMENT,))
    with caplog.at_level(logging.WARNING, logger="enclaveml.attestation"):
        decision = dev.evaluate(sim_claims(), now=NOW)
    assert checks(decision) == ["allow_simulation"]
    assert decision.failures[0].what == "TEE sim is not allowed by policy dev (expected a hardware TEE)"
    assert "set `allow_simulation = true`" in decision.failures[0].hint
    assert caplog.records == []


def test_simulation_is_accepted_as_insecure_and_logged_when_allowed(caplog: pytest.LogCaptureFixture) -> None:
    dev = Policy(name="dev", mr_enclave=(SIM_MEASUREMENT,), allow_simulation=True)
    with caplog.at_level(logging.WARNING, logger="enclaveml.attestation"):
        decision = dev.verify(sim_claims(), now=NOW)
    assert decision.allowed
    assert decision.insecure
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.name == "enclaveml.attestation"
    assert "INSECURE: policy dev" in record.getMessage()
    assert "simulated evidence" in record.getMessage()


def test_simulated_claims_lack_sgx_identity_so_pinning_it_refuses_them(policy: Policy) -> None:
    decision = dataclasses.replace(policy, allow_simulation=True).evaluate(sim_claims(), now=NOW)
    assert checks(decision) == ["mr_signer", "isv_prod_id", "min_isv_svn"]
    assert decision.failures[0].actual == "(absent)"


def test_simulated_claims_still_need_the_pinned_measurement() -> None:
    allowing = Policy(name="dev", allow_simulation=True, mr_enclave=(bytes(48),))
    decision = allowing.evaluate(sim_claims(), now=NOW)
    assert checks(decision) == ["mr_enclave"]
    assert checks(Policy(name="dev", allow_simulation=True).evaluate(sim_claims(), now=NOW)) == ["reference_values"]


def test_an_allowed_tee_without_reference_values_is_refused() -> None:
    policy = Policy(name="sgx-only-values", mr_enclave=(MR_ENCLAVE,))
    decision = policy.evaluate(tdx_claims(), now=NOW)
    assert checks(decision) == ["reference_values"]
    assert decision.failures[0].what == (
        "policy sgx-only-values pins no measurement for tdx "
        "(expected one of mr_td, rtmr0, rtmr1, rtmr2, rtmr3, mr_config_id in the policy)"
    )


S = TcbStatus
# Gramine's RA-TLS table (tee-formats.md §2.2), written out for every combination of opt-ins.
GRAMINE_TABLE = [
    ((False, False, False), set()),
    ((True, False, False), {S.OUT_OF_DATE}),
    ((False, True, False), {S.CONFIGURATION_NEEDED}),
    ((False, False, True), {S.SW_HARDENING_NEEDED}),
    ((True, True, False), {S.OUT_OF_DATE, S.CONFIGURATION_NEEDED, S.OUT_OF_DATE_CONFIGURATION_NEEDED}),
    ((True, False, True), {S.OUT_OF_DATE, S.SW_HARDENING_NEEDED}),
    ((False, True, True), {S.CONFIGURATION_NEEDED, S.SW_HARDENING_NEEDED, S.CONFIGURATION_AND_SW_HARDENING_NEEDED}),
    (
        (True, True, True),
        {
            S.OUT_OF_DATE,
            S.CONFIGURATION_NEEDED,
            S.SW_HARDENING_NEEDED,
            S.OUT_OF_DATE_CONFIGURATION_NEEDED,
            S.CONFIGURATION_AND_SW_HARDENING_NEEDED,
        },
    ),
]


@pytest.mark.parametrize(("opt_ins", "added"), GRAMINE_TABLE)
def test_gramine_style_opt_ins_add_exactly_the_mirrored_statuses(
    opt_ins: tuple[bool, bool, bool], added: set[TcbStatus]
) -> None:
    outdated, hw, sw = opt_ins
    policy = Policy.from_dict(
        {
            "name": "p",
            "mr_enclave": [MR_ENCLAVE.hex()],
            "allow_outdated_tcb_insecure": outdated,
            "allow_hw_config_insecure": hw,
            "allow_sw_hardening_needed": sw,
        }
    )
    assert policy.tcb_statuses == {S.UP_TO_DATE} | added
    for status in TcbStatus:
        allowed = policy.evaluate(sgx_claims(tcb_status=status), now=NOW).allowed
        assert allowed is (status in policy.tcb_statuses), status


@pytest.mark.parametrize(
    ("status", "insecure"),
    [(S.UP_TO_DATE, False), (S.SW_HARDENING_NEEDED, False), (S.CONFIGURATION_NEEDED, True), (S.OUT_OF_DATE, True)],
)
def test_only_weaker_statuses_mark_the_decision_insecure(policy: Policy, status: TcbStatus, insecure: bool) -> None:
    permissive = dataclasses.replace(policy, allowed_tcb_statuses=(S.UP_TO_DATE, status))
    decision = permissive.verify(sgx_claims(tcb_status=status), now=NOW)
    assert decision.insecure is insecure


def test_expired_collateral_needs_the_outdated_opt_in_like_gramine(policy: Policy) -> None:
    claims = sgx_claims(collateral_expiry=NOW - timedelta(seconds=1))
    assert checks(policy.evaluate(claims, now=NOW)) == ["collateral_expiry"]
    decision = dataclasses.replace(policy, allow_outdated_tcb_insecure=True).verify(claims, now=NOW)
    assert decision.insecure_reasons == [f"collateral expired at {(NOW - timedelta(seconds=1)).isoformat()}"]


def test_empty_advisory_allow_list_refuses_every_advisory(policy: Policy) -> None:
    strict = dataclasses.replace(policy, allowed_advisory_ids=())
    assert strict.verify(sgx_claims(), now=NOW).allowed
    decision = strict.evaluate(sgx_claims(advisory_ids=("INTEL-SA-00615",)), now=NOW)
    assert (decision.failures[0].expected, decision.failures[0].actual) == ("none", "INTEL-SA-00615")
