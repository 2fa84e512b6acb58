"""`enclaveml doctor` as a person runs it: a real subprocess on this machine (which has no TEE),
against a real loopback PCCS, the real collateral vectors, and a Gramine tree served by the same
fake /dev/attestation as tests/attestation/test_tee.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attestation"))
from test_pcs import SGX, RecordedPcs, Route, _handler_for
from test_tee import SGX_V3, FakeGramine

ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"
SGX_COLLATERAL = VECTORS / "dcap" / "dcapqvl_sgx_quote_v3_collateral.json"
IN_WINDOW = "2025-07-01T00:00:00Z"  # inside the vector collateral's validity window
CHECKS = ["TEE sgx (Gramine)", "TEE tdx (configfs-tsm)", "TEE snp (configfs-tsm)", "TEE", "quote generation",
          "PCCS", "collateral", "simulation"]  # fmt: skip


def doctor(tmp_path: Path, *args: str, expect: int, real_roots: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `enclaveml doctor`; unless ``real_roots``, it looks for TEEs under ``tmp_path``."""
    roots: list[str] = []
    if not real_roots:
        (tmp_path / "dev").mkdir(exist_ok=True)
        roots = ["--gramine-root", str(tmp_path / "attestation"), "--tsm-root", str(tmp_path / "tsm" / "report"),
                 "--dev-root", str(tmp_path / "dev")]  # fmt: skip
    env = {**os.environ, "COLUMNS": "250"}
    done = subprocess.run(
        [ENCLAVEML, "doctor", *roots, *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done


def rows(done: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """``{check: (status, detail)}`` from the table; also checks its shape."""
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    width = lines[0].index("STATUS")
    found: dict[str, tuple[str, str]] = {}
    for line in lines[1:]:
        if line[:width].strip():
            status, _, detail = line[width:].partition("  ")
            found[line[:width].strip()] = (status.strip(), detail.strip())
    assert list(found) == CHECKS
    return found


def fix_after(done: subprocess.CompletedProcess[str], check: str) -> str:
    lines = done.stdout.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"{check}  "))
    fix = lines[index + 1].strip()
    assert fix.startswith("fix: "), lines[index : index + 2]
    return fix.removeprefix("fix: ")


def as_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -- this machine: no TEE ----------------------------------------------------------------------------


def test_this_machine_has_no_tee_and_doctor_says_what_to_do(tmp_path: Path) -> None:
    done = doctor(tmp_path, expect=2, real_roots=True)
    found = rows(done)
    assert found["TEE"] == ("FAIL", "no TEE found (see the rows above)")
    assert fix_after(done, "TEE") == (
        "run inside Gramine (SGX) or a TDX / SEV-SNP confidential VM; for development pass --tee sim"
    )
    assert found["TEE sgx (Gramine)"] == ("SKIP", "no /dev/attestation (not inside Gramine) and no /dev/sgx_enclave")
    assert found["TEE tdx (configfs-tsm)"] == ("SKIP", "no /dev/tdx_guest and no /sys/kernel/config/tsm/report")
    assert found["quote generation"] == ("SKIP", "no TEE to ask")
    assert found["PCCS"] == ("SKIP", "not checked (no --pccs URL)")
    assert found["simulation"][0] == "OK"
    assert "available with --tee sim" in found["simulation"][1]
    assert done.stderr == "error: not ready: TEE failed (see the fixes above)\n"


def test_json_shape(tmp_path: Path) -> None:
    document = as_json(doctor(tmp_path, "--json", expect=2, real_roots=True))
    assert set(document) == {"ready", "tee", "checked_at", "checks", "probes"}
    assert (document["ready"], document["tee"]) == (False, None)
    assert [c["name"] for c in document["checks"]] == CHECKS
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in document["checks"])
    assert {c["status"] for c in document["checks"]} <= {"OK", "WARN", "FAIL", "SKIP"}
    assert [p["kind"] for p in document["probes"]] == ["sgx", "tdx", "snp", "sim"]
    sgx = document["probes"][0]
    assert sgx["paths"] == ["/dev/attestation", "/dev/sgx_enclave", "/dev/sgx_provision"]
    assert (sgx["present"], sgx["usable"], sgx["evidence_ok"]) == (False, False, None)
    assert document["probes"][3]["evidence_ok"] is True


def test_tee_sim_is_ready_but_marked_insecure(tmp_path: Path) -> None:
    done = doctor(tmp_path, "--tee", "sim", expect=0)
    found = rows(done)
    assert found["TEE"] == ("WARN", "simulated TEE (--tee sim): INSECURE, proves nothing about the host")
    assert found["quote generation"][0] == "OK"
    assert found["simulation"][1].startswith("selected; development only")
    assert done.stderr == ""


def test_asking_for_a_tee_that_is_absent(tmp_path: Path) -> None:
    found = rows(doctor(tmp_path, "--tee", "tdx", expect=2))
    assert found["TEE"] == ("FAIL", "no TDX found (see the rows above)")


# -- a TEE (emulated Gramine) ------------------------------------------------------------------------


def test_gramine_enclave_is_ready(tmp_path: Path) -> None:
    fake = FakeGramine(tmp_path / "attestation")
    try:
        done = doctor(tmp_path, "--json", expect=0)
    finally:
        fake.close()
    document = as_json(done)
    assert document["ready"] is True
    assert document["tee"] == {"kind": "sgx", "source": "gramine"}
    checks = {c["name"]: c for c in document["checks"]}
    assert checks["TEE"]["status"] == "OK"
    assert checks["quote generation"] == {
        "name": "quote generation", "status": "OK", "detail": f"{len(SGX_V3)} bytes from gramine", "fix": ""
    }  # fmt: skip


def test_gramine_without_dcap_is_a_warning_with_the_manifest_fix(tmp_path: Path) -> None:
    fake = FakeGramine(tmp_path / "attestation", attestation_type="none")
    try:
        done = doctor(tmp_path, expect=2)
    finally:
        fake.close()
    assert rows(done)["TEE sgx (Gramine)"] == ("WARN", f"Gramine enclave, but {fake.root}/attestation_type is 'none'")
    assert fix_after(done, "TEE sgx (Gramine)") == 'set sgx.remote_attestation = "dcap"'


def test_failing_quote_generation_is_reported_with_its_fix(tmp_path: Path) -> None:
    fake = FakeGramine(tmp_path / "attestation", quote=lambda data: b"")
    try:
        done = doctor(tmp_path, expect=2)
    finally:
        fake.close()
    assert rows(done)["quote generation"] == ("FAIL", f"{fake.root}/quote: empty quote")
    assert "/etc/sgx_default_qcnl.conf" in fix_after(done, "quote generation")
    assert done.stderr == "error: not ready: quote generation failed (see the fixes above)\n"


def test_sgx_device_nodes_outside_gramine(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "sgx_enclave").touch()
    done = doctor(tmp_path, expect=2)
    status, detail = rows(done)["TEE sgx (Gramine)"]
    assert (status, detail) == ("WARN", f"SGX device nodes {tmp_path}/dev/sgx_enclave exist, but this process is "
                                        "not inside a Gramine enclave")  # fmt: skip
    assert fix_after(done, "TEE sgx (Gramine)") == "run the workload under gramine-sgx"


# -- collateral ----------------------------------------------------------------------------------------


def test_vector_collateral_from_2025_has_expired(tmp_path: Path) -> None:
    done = doctor(tmp_path, "--tee", "sim", "--collateral", str(SGX_COLLATERAL), expect=2)
    status, detail = rows(done)["collateral"]
    assert status == "FAIL"
    assert detail.startswith(f"{SGX_COLLATERAL} (SGX, FMSPC 00a067110000) expired at 2025-07-19T10:01:18+00:00 (")
    assert detail.endswith(" days ago)")
    assert "--collateral-cache" in fix_after(done, "collateral")
    assert done.stderr == "error: not ready: collateral failed (see the fixes above)\n"


def test_collateral_inside_its_window_is_ok(tmp_path: Path) -> None:
    done = doctor(tmp_path, "--tee", "sim", "--collateral", str(SGX_COLLATERAL), "--at", IN_WINDOW, expect=0)
    assert rows(done)["collateral"] == (
        "OK", f"{SGX_COLLATERAL} (SGX, FMSPC 00a067110000) valid until 2025-07-19T10:01:18+00:00 (in 18.4 days)"
    )  # fmt: skip


def test_collateral_about_to_expire_is_a_warning(tmp_path: Path) -> None:
    done = doctor(tmp_path, "--tee", "sim", "--collateral", str(SGX_COLLATERAL), "--at", "2025-07-15", expect=0)
    assert rows(done)["collateral"][0] == "WARN"


def test_unreadable_collateral_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{}")
    done = doctor(tmp_path, "--tee", "sim", "--collateral", "broken.json", expect=2)
    status, detail = rows(done)["collateral"]
    assert status == "FAIL"
    assert detail.startswith("broken.json: ")
    assert "missing key(s)" in detail


# -- PCCS ----------------------------------------------------------------------------------------------


def test_unreachable_pccs_is_reported_fast(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    done = doctor(tmp_path, "--tee", "sim", "--pccs", url, expect=2)
    assert time.monotonic() - started < 15
    status, detail = rows(done)["PCCS"]
    assert status == "FAIL"
    assert detail.startswith(f"unreachable: {url}/sgx/certification/v4/rootcacrl: ")
    assert fix_after(done, "PCCS").startswith(f"is the PCCS running and reachable at {url}")


def test_silent_pccs_times_out(tmp_path: Path, pccs: RecordedPcs) -> None:
    pccs.routes["/sgx/certification/v4/rootcacrl"] = Route(200, b"", stall=True)
    done = doctor(tmp_path, "--tee", "sim", "--pccs", pccs.url, "--timeout", "0.5", expect=2)
    assert rows(done)["PCCS"] == ("FAIL", f"{pccs.url}/sgx/certification/v4/rootcacrl did not answer within 0.5 s")


def test_reachable_pccs_serves_the_root_crl(tmp_path: Path, pccs: RecordedPcs) -> None:
    pccs.serve(SGX)
    found = rows(doctor(tmp_path, "--tee", "sim", "--pccs", pccs.url, "--at", IN_WINDOW, expect=0))
    status, detail = found["PCCS"]
    assert status == "OK"
    assert detail.startswith(f"reachable: {pccs.url}/sgx/certification/v4/rootcacrl gave the root CA CRL in ")
    assert pccs.requests == ["/sgx/certification/v4/rootcacrl"]


def test_pccs_with_fmspc_fetches_the_platform_collateral(tmp_path: Path, pccs: RecordedPcs) -> None:
    pccs.serve(SGX)
    args = ("--tee", "sim", "--pccs", pccs.url, "--fmspc", "00a067110000", "--at", IN_WINDOW)
    found = rows(doctor(tmp_path, *args, expect=0))
    assert found["PCCS"] == (
        "OK", f"{pccs.url}: sgx collateral for 00a067110000, valid until 2025-07-19T10:01:18+00:00 (in 18.4 days)"
    )  # fmt: skip
    assert len(pccs.requests) == 4


def test_pccs_that_is_not_a_pccs(tmp_path: Path, pccs: RecordedPcs) -> None:
    done = doctor(tmp_path, "--tee", "sim", "--pccs", pccs.url, expect=2)
    assert rows(done)["PCCS"] == ("FAIL", f"{pccs.url}/sgx/certification/v4/rootcacrl answered HTTP 404 Not Found")
