"""``enclaveml run``: attest, receive keys over HPKE, start the job only when every key came back.

Unit tests drive ``run_job`` against an in-process broker double that does the broker's
checks for real (sim evidence, nonce, report-data binding, the policy, HPKE sealing). The
end-to-end tests run the real ``enclaveml run`` command against the real broker server
(``BrokerServer``, TLS with a self-signed certificate, SQLite) on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from enclaveml.attestation.policy import Policy
from enclaveml.attestation.sim import SimulationKey, verify_sim_evidence
from enclaveml.attestation.tee import SimulatedTee
from enclaveml.broker.server import BrokerServer, make_self_signed
from enclaveml.broker.store import BrokerStore
from enclaveml.crypto import encrypt_file
from enclaveml.crypto.key_release import release_binding, seal_for_recipient
from enclaveml.errors import AttestationError, ConfigError, PolicyError
from enclaveml.kms.broker import BrokerKms
from enclaveml.runtime.run import (
    EXIT_REFUSED,
    default_measured_files,
    load_or_create_sim_key,
    run_job,
    sim_measurement,
)
from enclaveml.runtime.session import ReleasedKey, Session

KEY = ReleasedKey("customers", "k-00000000000000aa", 1, bytes(range(32)))
JOB = """\
import sys, pathlib, enclaveml
pathlib.Path("ran.marker").write_text("ran")
with enclaveml.session() as s:
    s.decrypt_file(sys.argv[1], "plain.csv")
    print("keys:", s.key_names(), "claims tee:", s.claims.get("tee"))
import os
print("api key visible:", "ENCLAVEML_API_KEY" in os.environ)
sys.exit(7)
"""


class FakeBroker:
    """The broker's release checks, in process (``BrokerLike``)."""

    def __init__(self, policy: Policy, keys: list[ReleasedKey]) -> None:
        self.policy, self.keys = policy, keys
        self.nonces: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        self.calls.append((method, path))
        if (method, path) == ("GET", "/v1/nonce"):
            nonce = secrets.token_hex(32)
            self.nonces.add(nonce)
            return {"nonce": nonce, "expires_at": "2099-01-01T00:00:00+00:00"}
        assert method == "POST"
        assert path.startswith("/v1/keys/")
        assert path.endswith("/release")
        assert json is not None
        name = path.removeprefix("/v1/keys/").removesuffix("/release")
        nonce_hex = json["nonce"]
        if nonce_hex not in self.nonces:
            raise AttestationError("nonce_unknown", "nonce was never issued or already used")
        self.nonces.discard(nonce_hex)
        nonce = bytes.fromhex(nonce_hex)
        public_key = base64.b64decode(json["public_key"])
        now = datetime.now(UTC)
        claims = verify_sim_evidence(
            base64.b64decode(json["evidence"]), trusted_keys=None, expected_nonce=nonce, now=now
        )
        if claims.report_data != release_binding(public_key, nonce):
            raise AttestationError("binding_mismatch", "evidence is not bound to the presented public key")
        self.policy.verify(claims, now=now)
        material = [k for k in self.keys if k.name == name]
        bundle = {
            "keys": [
                {
                    "name": k.name,
                    "key_id": k.key_id,
                    "version": k.version,
                    "material": base64.b64encode(k.material).decode(),
                }
                for k in material
            ]
        }
        sealed = seal_for_recipient(_json_bytes(bundle), public_key, nonce)
        return {
            "key": name,
            "policy_id": "p-1",
            "sealed": base64.b64encode(sealed).decode(),
            "claims": claims.to_json(),
            "insecure": True,
        }


def _json_bytes(doc: object) -> bytes:
    return json.dumps(doc).encode()


def _policy(measurement: bytes) -> Policy:
    return Policy.from_text(
        f'name = "job"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement.hex()}"]\n'
    )


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "data.csv").write_text("name,salary\nann,100\n")
    owner = Session("broker", [KEY], {})
    encrypt_file(tmp_path / "data.csv", tmp_path / "data.csv.eml", owner, "customers")
    return tmp_path


def _command() -> list[str]:
    return [sys.executable, "job.py", "data.csv.eml"]


def test_job_receives_its_keys_and_runs(workspace: Path, capfd: pytest.CaptureFixture[str]) -> None:
    command = _command()
    measurement = sim_measurement(command)
    broker = FakeBroker(_policy(measurement), [KEY])
    tee = SimulatedTee(SimulationKey.generate(), measurement, b"")
    env = {**os.environ, "ENCLAVEML_API_KEY": "secret"}
    code = run_job(command, broker=broker, keys=["customers"], tee=tee, env=env)
    out = capfd.readouterr().out
    assert code == 7  # the job's own exit code
    assert "keys: ['customers'] claims tee: sim" in out
    assert "api key visible: False" in out
    assert (workspace / "plain.csv").read_text() == "name,salary\nann,100\n"
    assert broker.calls == [("GET", "/v1/nonce"), ("POST", "/v1/keys/customers/release")]


def test_refusal_prints_the_reason_and_never_starts_the_job(workspace: Path) -> None:
    command = _command()
    trusted = sim_measurement(command)
    (workspace / "job.py").write_text(JOB + "# modified\n")
    broker = FakeBroker(_policy(trusted), [KEY])
    tee = SimulatedTee(SimulationKey.generate(), sim_measurement(command), b"")
    err = io.StringIO()
    code = run_job(command, broker=broker, keys=["customers"], tee=tee, stderr=err)
    assert code == EXIT_REFUSED
    line = err.getvalue()
    assert line.startswith("Attestation failed: ")
    assert line.count("\n") == 1
    assert "mr_enclave" in line
    assert trusted.hex()[:16] in line
    assert not (workspace / "ran.marker").exists()


def test_every_key_must_be_released_before_the_job_starts(workspace: Path) -> None:
    command = _command()
    measurement = sim_measurement(command)

    class RefusesSecond(FakeBroker):
        def request(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
            if path == "/v1/keys/models/release":
                raise PolicyError("policy job may not receive key models", "bind the key to the policy")
            return super().request(method, path, json)

    broker = RefusesSecond(_policy(measurement), [KEY])
    tee = SimulatedTee(SimulationKey.generate(), measurement, b"")
    err = io.StringIO()
    assert run_job(command, broker=broker, keys=["customers", "models"], tee=tee, stderr=err) == EXIT_REFUSED
    assert "Attestation failed: policy job may not receive key models" in err.getvalue()
    assert not (workspace / "ran.marker").exists()


def test_default_measured_files_are_the_commands_files_but_not_encrypted_inputs(workspace: Path) -> None:
    (workspace / "lib").mkdir()
    (workspace / "lib" / "util.py").write_text("x = 1\n")
    files = default_measured_files(
        ["python", "job.py", "data.csv.eml", "--flag", "lib/util.py", "/etc/hostname"], workspace
    )
    assert files == [Path("job.py"), Path("lib/util.py")]
    base = sim_measurement(["python", "job.py"])
    assert sim_measurement(["python", "job.py"], measure=["lib"]) != base
    (workspace / "job.py").write_text("changed\n")
    assert sim_measurement(["python", "job.py"]) != base


def test_nothing_to_measure_is_a_usage_error(workspace: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to measure"):
        sim_measurement(["python", "-c", "print(1)"])


def test_sim_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "home" / "sim-key.pem"
    key, created = load_or_create_sim_key(path)
    assert created
    assert path.stat().st_mode & 0o777 == 0o600
    again, created_again = load_or_create_sim_key(path)
    assert not created_again
    assert again.public_pem() == key.public_pem()
    assert (tmp_path / "home" / "sim-key.pub.pem").read_bytes() == key.public_pem()


# -- end to end: the real broker over TLS, the real command ------------------------------------

CLI = [str(Path(sys.executable).with_name("enclaveml"))]


@dataclass
class LiveBroker:
    url: str
    ca: Path
    owner: BrokerKms
    workload_env: dict[str, str]


@pytest.fixture
def live_broker(tmp_path: Path) -> Iterator[LiveBroker]:
    cert, key = make_self_signed(tmp_path / "tls")
    with BrokerStore(f"sqlite:///{tmp_path / 'broker.db'}", os.urandom(32)) as store:
        owner = store.enroll_app("analytics", "owner")
        workload = store.enroll_app("job-runner", "workload")
        with BrokerServer(store, port=0, tls_cert=cert, tls_key=key) as server:
            env = {
                **os.environ,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python`: this venv
                "ENCLAVEML_HOME": str(tmp_path / "home"),
                "ENCLAVEML_APP_ID": workload.app.app_id,
                "ENCLAVEML_API_KEY": base64.b64encode(workload.api_key).decode(),
            }
            kms = BrokerKms(server.url, owner.app.app_id, owner.api_key, ca=str(cert))
            yield LiveBroker(server.url, cert, kms, env)
            kms.close()


def _enclaveml(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_run_end_to_end_with_the_real_broker(tmp_path: Path, live_broker: LiveBroker) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.py").write_text(JOB.replace("sys.exit(7)", ""))
    (work / "data.csv").write_text("name,salary\nann,100\n")
    live_broker.owner.create_key("customers")
    encrypt_file(work / "data.csv", work / "data.csv.eml", live_broker.owner, "customers")
    (work / "data.csv").unlink()
    job = ["python", "job.py", "data.csv.eml"]

    shown = _enclaveml(["run", "--tee", "sim", "--print-measurement", "--", *job], live_broker.workload_env, work)
    assert shown.returncode == 0, shown.stderr
    measurement = shown.stdout.strip()
    assert measurement == sim_measurement(job, root=work).hex()
    policy = f'name = "job"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement}"]\n'
    live_broker.owner.client.register_policy("job", policy, ["customers"])

    run_args = ["run", "--broker", live_broker.url, "--ca", str(live_broker.ca), "--keys", "customers"]
    done = _enclaveml([*run_args, "--tee", "sim", "--", *job], live_broker.workload_env, work)
    assert done.returncode == 0, done.stderr
    assert "keys: ['customers'] claims tee: sim" in done.stdout
    assert "api key visible: False" in done.stdout
    assert "WARNING: simulated TEE" in done.stderr
    assert "Attestation succeeded (INSECURE: simulated evidence): released customers v1" in done.stderr
    assert (work / "plain.csv").read_text() == "name,salary\nann,100\n"
    assert (tmp_path / "home" / "sim-key.pem").stat().st_mode & 0o777 == 0o600

    # A modified job: refused with the reason, and never started.
    (work / "plain.csv").unlink()
    (work / "ran.marker").unlink()
    (work / "job.py").write_text(JOB + "print('exfiltrate')\n")
    refused = _enclaveml([*run_args, "--tee", "sim", "--", *job], live_broker.workload_env, work)
    assert refused.returncode == EXIT_REFUSED, refused.stderr
    failed = [line for line in refused.stderr.splitlines() if line.startswith("Attestation failed: ")]
    assert len(failed) == 1
    assert "mr_enclave" in failed[0]
    assert measurement[:16] in failed[0]
    assert refused.stdout == ""
    assert not (work / "ran.marker").exists()
    assert not (work / "plain.csv").exists()


def test_run_without_credentials_or_broker_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text("print('ran')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVEML_")}
    env["ENCLAVEML_HOME"] = str(tmp_path / "home")
    no_creds = _enclaveml(
        ["run", "--broker", "https://127.0.0.1:1", "--keys", "k", "--tee", "sim", "--", "python", "job.py"],
        env,
        tmp_path,
    )
    assert no_creds.returncode == 2
    assert "ENCLAVEML_APP_ID" in no_creds.stderr
    assert "ran" not in no_creds.stdout
    no_broker = _enclaveml(["run", "--keys", "k", "--tee", "sim", "--", "python", "job.py"], env, tmp_path)
    assert no_broker.returncode == 2
    assert "--broker" in no_broker.stderr
    help_text = _enclaveml(["run", "--help"], env, tmp_path)
    assert "Example:" in help_text.stdout
    assert "ENCLAVEML_API_KEY" in help_text.stdout
