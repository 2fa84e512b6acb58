"""`enclaveml attest ...` and `enclaveml policy ...` as a verifier runs them: real subprocesses,
the real DCAP vectors at times inside their collateral windows, and the exit-code contract
(0 accepted, 3 refused, 2 usage or malformed input)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclaveml.attestation.ratls import create_ratls_certificate
from enclaveml.attestation.sim import SimulationKey, create_sim_evidence, measure_workload

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attestation"))
from test_maa import NOW as MAA_NOW
from test_maa import PROVIDER, Signer, sgx_payload
from test_pcs import SGX, RecordedPcs, _handler_for

ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
DCAP = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "dcap"
SGX_V3, TDX_V4, TDX_V5 = "dcapqvl_sgx_quote_v3", "dcapqvl_tdx_quote_v4", "dcapqvl_tdx_quote_v5_notcbmatch"
AT = {SGX_V3: "2025-07-01T00:00:00Z", TDX_V4: "2025-07-01T00:00:00Z", TDX_V5: "2026-03-01T00:00:00Z"}
MR_ENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
Done = subprocess.CompletedProcess[str]
SGX_STATUS_LINE = "verified: SGX quote v3, TCB ConfigurationAndSWHardeningNeeded (INTEL-SA-00289, INTEL-SA-00615)"


def run(cwd: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run([ENCLAVEML, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line; other stderr lines may only be warnings and notes."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert all(line.startswith(("error: ", "WARNING: ", "note: ")) for line in done.stderr.splitlines()), done.stderr
    return errors[0]


def verify(
    cwd: Path, name: str, *more: str, at: str | None = None, expect: int = 0
) -> subprocess.CompletedProcess[str]:
    collateral = str(DCAP / f"{name}_collateral.json")
    args = ["attest", "verify", str(DCAP / f"{name}.bin"), "--collateral", collateral, "--at", at or AT[name]]
    return run(cwd, *args, *more, expect=expect)


def as_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def write_policy(path: Path, **fields: object) -> Path:
    lines = [f"{key} = {json.dumps(value)}" for key, value in {"name": "p-test", **fields}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- DCAP quotes ------------------------------------------------------------------------------


def test_sgx_v3_with_its_collateral_verifies_and_says_no_policy_was_applied(tmp_path: Path) -> None:
    done = verify(tmp_path, SGX_V3)
    assert done.stdout.splitlines()[0] == SGX_STATUS_LINE
    assert f"mr_enclave           {MR_ENCLAVE}" in done.stdout
    assert "note: no --policy: only the evidence was verified" in done.stderr
    document = as_json(verify(tmp_path, SGX_V3, "--json"))
    assert (document["result"], document["status"]) == ("verified", "ConfigurationAndSWHardeningNeeded")
    assert document["advisories"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert document["claims"]["mr_enclave"] == MR_ENCLAVE
    assert (document["failures"], document["policy"]) == ([], None)


def test_collateral_may_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dcap").mkdir()
    shutil.copy(DCAP / f"{SGX_V3}_collateral.json", tmp_path / "dcap" / "collateral.json")
    done = run(tmp_path, "attest", "verify", str(DCAP / f"{SGX_V3}.bin"), "--collateral", "dcap", "--at", AT[SGX_V3])
    assert done.stdout.splitlines()[0] == SGX_STATUS_LINE


def test_policy_allowing_only_uptodate_refuses_with_the_status_and_the_fix(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "strict.toml", tee=["sgx"], mr_enclave=MR_ENCLAVE)
    line = error_line(verify(tmp_path, SGX_V3, "--policy", str(policy), expect=3))
    assert "TCB status ConfigurationAndSWHardeningNeeded is not allowed by policy p-test (expected UpToDate)" in line
    assert "`allow_hw_config_insecure = true` with `allow_sw_hardening_needed = true`" in line
    document = as_json(verify(tmp_path, SGX_V3, "--policy", str(policy), "--json", expect=3))
    assert document["result"] == "refused"
    assert [(f["step"], f["reason"]) for f in document["failures"]] == [("policy", "tcb_status")]
    assert document["failures"][0]["actual"] == "ConfigurationAndSWHardeningNeeded"


def test_every_policy_failure_is_in_the_json(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "other.toml", tee=["sgx"], mr_enclave="00" * 32, isv_prod_id=7)
    document = as_json(verify(tmp_path, SGX_V3, "--policy", str(policy), "--json", expect=3))
    assert [f["reason"] for f in document["failures"]] == ["tcb_status", "mr_enclave", "isv_prod_id"]


def test_matching_policy_with_gramine_style_opt_ins_accepts_with_an_insecure_warning(tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path / "ok.toml",
        tee=["sgx"],
        mr_enclave=MR_ENCLAVE,
        allow_hw_config_insecure=True,
        allow_sw_hardening_needed=True,
    )
    done = verify(tmp_path, SGX_V3, "--policy", str(policy))
    assert done.stdout.splitlines()[:2] == [
        SGX_STATUS_LINE,
        "policy: p-test allows it with weakened trust: TCB status ConfigurationAndSWHardeningNeeded",
    ]
    assert "WARNING: INSECURE: policy p-test accepted claims with weakened trust" in done.stderr
    document = as_json(verify(tmp_path, SGX_V3, "--policy", str(policy), "--json"))
    assert (document["result"], document["insecure"], document["policy"]["allowed"]) == ("accepted", True, True)


def test_tdx_v4_is_uptodate_and_its_trailing_bytes_are_a_warning(tmp_path: Path) -> None:
    done = verify(tmp_path, TDX_V4)
    assert done.stdout.splitlines()[0] == "verified: TDX quote v4, TCB UpToDate"
    assert "WARNING: 70 bytes after the signature data were ignored" in done.stderr
    assert as_json(verify(tmp_path, TDX_V4, "--json"))["status"] == "UpToDate"


def test_tdx_v5_without_a_matching_tcb_level_is_tcb_not_supported_and_refused(tmp_path: Path) -> None:
    done = verify(tmp_path, TDX_V5, expect=3)
    assert done.stdout.splitlines()[0] == "refused: TDX quote v5, TCB TcbNotSupported"
    assert "TCB status TcbNotSupported: no TCB level of the collateral matches this platform" in error_line(done)
    document = as_json(verify(tmp_path, TDX_V5, "--json", expect=3))
    assert (document["status"], document["failures"][0]["reason"]) == ("TcbNotSupported", "tcb_not_supported")


@pytest.mark.parametrize(
    ("at", "reasons"),
    [
        ("2026-07-01T00:00:00Z", {"collateral_expired", "crl_expired"}),
        ("2025-01-01", {"collateral_not_yet_valid", "crl_not_yet_valid"}),
    ],
    ids=["after", "before"],
)
def test_verification_outside_the_collateral_window_fails(tmp_path: Path, at: str, reasons: set[str]) -> None:
    error_line(verify(tmp_path, SGX_V3, at=at, expect=3))
    document = as_json(verify(tmp_path, SGX_V3, "--json", at=at, expect=3))
    assert document["result"] == "failed"
    assert document["failures"][0]["reason"] in reasons


def test_tampered_quote_fails_with_the_step_that_caught_it(tmp_path: Path) -> None:
    blob = bytearray((DCAP / f"{SGX_V3}.bin").read_bytes())
    blob[48 + 64] ^= 0x01  # first byte of MRENCLAVE, inside the signed range
    (tmp_path / "tampered.bin").write_bytes(bytes(blob))
    collateral = str(DCAP / f"{SGX_V3}_collateral.json")
    args = ("attest", "verify", "tampered.bin", "--collateral", collateral, "--at", AT[SGX_V3])
    assert "quote signature over bytes [0, 432) does not verify" in error_line(run(tmp_path, *args, expect=3))
    assert as_json(run(tmp_path, *args, "--json", expect=3))["failures"][0]["reason"] == "quote_signature_invalid"


def test_truncated_quote_is_a_parse_error_exit_2(tmp_path: Path) -> None:
    (tmp_path / "short.bin").write_bytes((DCAP / f"{SGX_V3}.bin").read_bytes()[:3000])
    collateral = str(DCAP / f"{SGX_V3}_collateral.json")
    args = ("attest", "verify", "short.bin", "--collateral", collateral, "--at", AT[SGX_V3])
    line = error_line(run(tmp_path, *args, expect=2))
    assert "short.bin: malformed evidence" in line
    assert "signature_data_len" in line
    assert as_json(run(tmp_path, *args, "--json", expect=2))["result"] == "malformed"
    run(tmp_path, "attest", "inspect", "short.bin", expect=2)


@pytest.mark.parametrize(
    "args",
    [
        ("attest", "verify"),
        ("attest", "verify", str(DCAP / f"{SGX_V3}.bin")),  # a quote needs collateral
        ("attest", "verify", str(DCAP / f"{SGX_V3}.bin"), "--collateral", "x", "--pccs", "http://127.0.0.1:9"),
        ("attest", "verify", "--maa-token", "t.jwt"),
        ("attest", "verify", str(DCAP / f"{SGX_V3}.bin"), "--at", "yesterday"),
        ("attest", "verify", str(DCAP / f"{SGX_V3}.bin"), "--collateral", "missing.json"),
    ],
    ids=["nothing", "no-collateral", "both-sources", "maa-without-jwks", "bad-time", "missing-collateral"],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    error_line(run(tmp_path, *args, expect=2))


def test_inspect_prints_every_field_of_an_sgx_quote(tmp_path: Path) -> None:
    done = run(tmp_path, "attest", "inspect", str(DCAP / f"{SGX_V3}.bin"))
    lines = done.stdout.splitlines()
    assert lines[0].startswith("DCAP quote v3, SGX report body (384 bytes)  (not verified")
    for expected in (
        f"mr_enclave               {MR_ENCLAVE}",
        "mr_signer                815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
        "isv_prod_id              0",
        "attributes.flags         INIT, MODE64BIT",
        "debug                    no",
        "report_data              48656c6c6f2c20776f726c6421" + "00" * 51,
        "pck.fmspc                00a067110000",
    ):
        assert expected in lines
    assert done.stderr == ""


def test_inspect_tdx_v4_prints_td_fields_and_warns_about_trailing_bytes(tmp_path: Path) -> None:
    done = run(tmp_path, "attest", "inspect", str(DCAP / f"{TDX_V4}.bin"))
    fields = dict(line.split(maxsplit=1) for line in done.stdout.splitlines()[1:])
    assert fields["mr_td"].startswith("91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407")
    assert fields["rtmr0"].startswith("44c0197b")
    assert fields["rtmr3"] == "00" * 48
    assert (fields["td_attributes"], fields["td_attributes.flags"]) == ("0000001000000000", "SEPT_VE_DISABLE")
    assert (fields["xfam"], fields["mr_config_id"]) == ("e702060000000000", "00" * 48)
    assert fields["trailing_bytes"] == "70"
    assert "WARNING: 70 bytes after the signature data (ignored, as Intel's QVL does)" in done.stderr
    document = as_json(run(tmp_path, "attest", "inspect", str(DCAP / f"{TDX_V4}.bin"), "--json"))
    assert document["fields"]["debug"] is False
    assert document["kind"] == "tdx-quote"


# -- collateral from a PCCS -----------------------------------------------------------------


@pytest.fixture
def pccs() -> Iterator[RecordedPcs]:
    state = RecordedPcs()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_collateral_from_a_pccs_is_fetched_once_then_cached(tmp_path: Path, pccs: RecordedPcs) -> None:
    pccs.serve(SGX)
    args = ("attest", "verify", str(DCAP / f"{SGX_V3}.bin"), "--pccs", pccs.url, "--collateral-cache", "cache")
    assert run(tmp_path, *args, "--at", AT[SGX_V3]).stdout.splitlines()[0] == SGX_STATUS_LINE
    assert len(pccs.requests) == 4
    assert run(tmp_path, *args, "--at", AT[SGX_V3]).stdout.splitlines()[0] == SGX_STATUS_LINE
    assert len(pccs.requests) == 4  # the second run was served from the cache
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["sgx_00a067110000_processor_collateral.json"]


# -- simulation and RA-TLS ---------------------------------------------------------------------


@pytest.fixture
def sim_host(tmp_path: Path) -> Path:
    """A working directory with sim-key.pem / sim-key.pub.pem (from `sim-keygen`) and job.py."""
    done = run(tmp_path, "attest", "sim-keygen", "-o", "sim-key.pem")
    assert done.stdout.startswith("sim_key_sha256  ")
    assert (tmp_path / "sim-key.pem").stat().st_mode & 0o777 == 0o600
    (tmp_path / "job.py").write_text('print("hello")\n')
    return tmp_path


def ratls_cert(directory: Path) -> tuple[bytes, str]:
    """An RA-TLS certificate with simulated evidence of job.py, as the workload would make it."""
    key = SimulationKey.from_pem((directory / "sim-key.pem").read_bytes())
    measurement = measure_workload([Path("job.py")], ["python", "job.py"], root=directory)
    now = datetime.now(UTC)
    cert, _ = create_ratls_certificate(
        lambda rd: create_sim_evidence(key, measurement, rd, b"", now), kind="sim", now=now
    )
    return cert, measurement.hex()


def test_ratls_certificate_with_sim_evidence_verifies_under_a_simulation_policy(sim_host: Path) -> None:
    cert, measurement = ratls_cert(sim_host)
    (sim_host / "cert.pem").write_bytes(cert)
    der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    (sim_host / "cert.der").write_bytes(der)
    write_policy(sim_host / "dev.toml", mr_enclave=measurement, allow_simulation=True)
    for name in ("cert.pem", "cert.der"):
        done = run(sim_host, "attest", "verify", name, "--policy", "dev.toml", "--trusted-sim-key", "sim-key.pub.pem")
        assert done.stdout.splitlines()[0] == (
            "verified: RA-TLS certificate with simulated evidence (key binding holds), "
            "TCB Simulated - INSECURE: simulation proves nothing about the host"
        )
        assert "WARNING: INSECURE: policy p-test accepted claims with weakened trust: simulated evidence" in done.stderr
    document = as_json(run(sim_host, "attest", "verify", "cert.der", "--policy", "dev.toml", "--json"))
    assert (document["status"], document["insecure"], document["ratls_key_binding_ok"]) == ("Simulated", True, True)
    assert "no trusted simulation key was given" in " ".join(document["warnings"])
    shown = run(sim_host, "attest", "inspect", "cert.der").stdout
    assert "ratls.key_binding_ok     yes" in shown
    assert f"measurement              {measurement}" in shown


def test_ratls_sim_evidence_from_an_untrusted_key_is_refused(sim_host: Path) -> None:
    cert, measurement = ratls_cert(sim_host)
    (sim_host / "cert.pem").write_bytes(cert)
    write_policy(sim_host / "dev.toml", mr_enclave=measurement, allow_simulation=True)
    (sim_host / "other.pub.pem").write_bytes(SimulationKey.generate().public_pem())
    args = ("attest", "verify", "cert.pem", "--policy", "dev.toml", "--trusted-sim-key", "other.pub.pem")
    assert "is not trusted" in error_line(run(sim_host, *args, expect=3))


def test_sim_evidence_without_a_policy_allowing_simulation_is_refused(sim_host: Path) -> None:
    done = run(
        sim_host, "attest", "sim-evidence", "--key", "sim-key.pem", "--file", "job.py",
        "--report-data", "00ff", "-o", "evidence.bin", "--", "python", "job.py",
    )  # fmt: skip
    measurement = done.stdout.split()[1]
    line = error_line(run(sim_host, "attest", "verify", "evidence.bin", expect=3))
    assert "only a policy with `allow_simulation = true` accepts it" in line
    document = as_json(run(sim_host, "attest", "verify", "evidence.bin", "--json", expect=3))
    assert document["failures"][0]["reason"] == "simulation_not_allowed"
    write_policy(sim_host / "hw.toml", mr_enclave=measurement)
    line = error_line(run(sim_host, "attest", "verify", "evidence.bin", "--policy", "hw.toml", expect=3))
    assert "TEE sim is not allowed by policy p-test (expected a hardware TEE)" in line
    write_policy(sim_host / "dev.toml", mr_enclave=measurement, allow_simulation=True)
    accepted = as_json(run(sim_host, "attest", "verify", "evidence.bin", "--policy", "dev.toml", "--json"))
    assert accepted["claims"]["report_data"] == "00ff" + "00" * 62


def test_policy_from_sig_pins_the_enclave_and_refuses_other_measurements(sim_host: Path) -> None:
    run(sim_host, "enclave", "keygen", "-o", "enclave-key.pem")
    run(
        sim_host, "enclave", "sign", "--key", "enclave-key.pem", "--mr-enclave", MR_ENCLAVE,
        "--isv-prod-id", "1", "--isv-svn", "3", "-o", "app.sig",
    )  # fmt: skip
    run(sim_host, "policy", "from-sig", "app.sig", "-o", "policy.toml")
    text = (sim_host / "policy.toml").read_text()
    assert f'mr_enclave = ["{MR_ENCLAVE}"]' in text
    assert "isv_prod_id = 1\nmin_isv_svn = 3\n" in text
    assert run(sim_host, "policy", "from-sig", "app.sig").stdout == text  # standard output by default
    checked = run(sim_host, "policy", "check", "policy.toml").stdout
    assert checked.startswith("valid: policy app (policy.toml)")
    assert "UpToDate                               via allowed_tcb_statuses" in checked
    # A developer tries the production policy with simulation allowed: the measurement differs.
    (sim_host / "policy.toml").write_text(text.replace("allow_simulation = false", "allow_simulation = true"))
    run(
        sim_host, "attest", "sim-evidence", "--key", "sim-key.pem", "--file", "job.py",
        "-o", "evidence.bin", "--", "python", "job.py",
    )  # fmt: skip
    line = error_line(run(sim_host, "attest", "verify", "evidence.bin", "--policy", "policy.toml", expect=3))
    assert "MR_ENCLAVE " in line
    assert f"is not allowed by policy app (expected {MR_ENCLAVE})" in line


def test_policy_from_a_tampered_sig_is_refused(sim_host: Path) -> None:
    run(sim_host, "enclave", "keygen", "-o", "enclave-key.pem")
    run(
        sim_host, "enclave", "sign", "--key", "enclave-key.pem", "--mr-enclave", MR_ENCLAVE,
        "--isv-prod-id", "1", "--isv-svn", "3", "-o", "app.sig",
    )  # fmt: skip
    blob = bytearray((sim_host / "app.sig").read_bytes())
    blob[960] ^= 0x01  # inside ENCLAVEHASH, a signed field
    (sim_host / "app.sig").write_bytes(bytes(blob))
    assert "app.sig" in error_line(run(sim_host, "policy", "from-sig", "app.sig", "-o", "p.toml", expect=3))
    assert not (sim_host / "p.toml").exists()


def test_policy_check_names_a_bad_field_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('name = "x"\nallow_simulaton = true\n')
    line = error_line(run(tmp_path, "policy", "check", "bad.toml", expect=2))
    assert "unknown policy field `allow_simulaton`" in line
    assert "did you mean `allow_simulation`?" in line
    line = error_line(run(tmp_path, "attest", "verify", str(DCAP / f"{SGX_V3}.bin"), "--policy", "bad.toml", expect=2))
    assert "allow_simulaton" in line


def test_sim_keygen_refuses_to_overwrite_a_key(sim_host: Path) -> None:
    before = (sim_host / "sim-key.pem").read_bytes()
    assert "already exists" in error_line(run(sim_host, "attest", "sim-keygen", "-o", "sim-key.pem", expect=2))
    assert (sim_host / "sim-key.pem").read_bytes() == before


# -- Azure Attestation tokens ------------------------------------------------------------------


def test_maa_token_verifies_with_its_jwks_and_issuer(tmp_path: Path) -> None:
    signer = Signer()
    (tmp_path / "token.jwt").write_text(signer.sign(sgx_payload()) + "\n")
    (tmp_path / "certs.json").write_text(json.dumps({"keys": [signer.jwk()]}))
    args = ("attest", "verify", "--maa-token", "token.jwt", "--jwks", "certs.json", "--at", MAA_NOW.isoformat())
    done = run(tmp_path, *args, "--issuer", PROVIDER)
    assert done.stdout.splitlines()[0] == "verified: MAA token (sgx; TCB verdict by MAA), TCB UpToDate"
    line = error_line(run(tmp_path, *args, "--issuer", "https://evil.attest.azure.net", expect=3))
    assert "token issuer is" in line
    document = as_json(run(tmp_path, *args, "--issuer", "https://evil.attest.azure.net", "--json", expect=3))
    assert document["failures"][0]["reason"] == "issuer_mismatch"
    line = error_line(run(tmp_path, "attest", "verify", "token.jwt", expect=2))
    assert "MAA token" in line
