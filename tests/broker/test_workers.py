"""``enclaveml broker serve --workers 2``: broker processes sharing one port and one store.

The story, over real TLS against the real CLI, on SQLite and PostgreSQL: workloads release
keys through whichever worker accepts their connection; every worker signs attestation
results with the same key; a worker killed with ``kill -9`` is started again while the
other keeps serving; SIGTERM stops them all; the audit log holds every release, once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from broker_testdata import ROOT_KEY

from enclaveml.attestation.sim import SimulationKey
from enclaveml.attestation.tee import SimulatedTee
from enclaveml.broker.audit import verify_audit_chain
from enclaveml.broker.client import BrokerClient
from enclaveml.broker.server import make_self_signed
from enclaveml.broker.store import BrokerStore
from enclaveml.runtime.run import release_keys

ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
MEASUREMENT = hashlib.sha384(b"workers job").digest()
POLICY = f'name = "workers-job"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{MEASUREMENT.hex()}"]\n'
WORKERS = 2
CLIENTS = 6
DEADLINE_S = 60.0


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    ca: Path
    log: Path
    app_id: str
    api_key: bytes

    def failure(self, what: str) -> str:
        return f"{what}; broker log:\n{self.log.read_text(errors='replace')[-4000:]}"

    def wait_for(self, condition: object, what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():  # type: ignore[operator]
            assert self.process.poll() is None, self.failure("the broker exited")
            assert time.monotonic() < deadline, self.failure(what)
            time.sleep(0.05)  # polling another process's state; nothing to wait on

    def release_from_fresh_clients(self, rounds: int) -> int:
        """``CLIENTS`` threads, each ``rounds`` releases over its own new connection; the count."""
        errors: list[BaseException] = []
        done: list[int] = []
        tee = SimulatedTee(SimulationKey.generate(), MEASUREMENT, b"")

        def run() -> None:
            try:
                with BrokerClient(self.url, self.app_id, self.api_key, ca=str(self.ca), timeout=20) as client:
                    for _ in range(rounds):
                        assert [k.name for k in release_keys(client, tee, ["customers"]).keys] == ["customers"]
                        done.append(1)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=DEADLINE_S)
        assert not errors, self.failure(f"releases failed: {errors[0]!r}")
        return len(done)


@pytest.fixture
def served(store_url: str, tmp_path: Path) -> Iterator[Served]:
    with BrokerStore(store_url, ROOT_KEY) as store:
        store.create_key("customers")
        store.register_policy("workers-job", POLICY, ["customers"])
        workload = store.enroll_app("workers-workload", "workload")
    root = tmp_path / "root.key"
    root.write_text(ROOT_KEY.hex())
    root.chmod(0o600)
    cert, key = make_self_signed(tmp_path / "tls")
    log = tmp_path / "broker.log"
    args = ["broker", "serve", "--db", store_url, "--root-key-file", str(root), "--tls-cert", str(cert)]
    args += ["--tls-key", str(key), "--port", "0", "--workers", str(WORKERS)]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [ENCLAVEML, *args],
            stdout=output,
            stderr=output,
            env=os.environ | {"ENCLAVEML_HOME": str(tmp_path / "home")},
        )
    served = Served(process, "", cert, log, workload.app.app_id, workload.api_key)
    try:
        served.wait_for(lambda: "key broker on https://" in log.read_text(), "no listening line")
        served.url = log.read_text().split("key broker on ", 1)[1].split(",", 1)[0]
        served.wait_for(lambda: len(_children(process.pid)) == WORKERS, "the workers did not start")
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            for pid in _children(process.pid):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_workers_share_the_port_the_store_and_the_result_key(served: Served, store_url: str) -> None:
    released = served.release_from_fresh_clients(rounds=3)
    keys = set()
    for _ in range(2 * WORKERS + 2):  # a connection each: answered by either worker
        with httpx.Client(verify=str(served.ca), timeout=10) as http:
            keys.add(http.get(f"{served.url}/.well-known/jwks.json").text)
    assert len(keys) == 1  # one attestation-result signing key, whichever worker answers

    before = _children(served.process.pid)
    killed = sorted(before)[0]
    os.kill(killed, signal.SIGKILL)
    served.wait_for(lambda: len(_children(served.process.pid) - {killed}) == WORKERS, "no new worker")
    assert killed not in _children(served.process.pid)
    released += served.release_from_fresh_clients(rounds=3)

    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0, served.failure("the pool did not stop cleanly")
    assert _children(served.process.pid) == set()
    assert "starting it again" in served.log.read_text()

    with BrokerStore(store_url, ROOT_KEY) as store:
        report = verify_audit_chain(store)
        assert report.ok, report.problem
        entries = list(store.iter_audit())
        assert sum(e.event == "key.released" for e in entries) == released == 2 * CLIENTS * 3
        assert not [e for e in entries if e.event.endswith(".refused")]


def test_a_worker_that_cannot_start_stops_the_pool(tmp_path: Path) -> None:
    root = tmp_path / "root.key"
    root.write_text(ROOT_KEY.hex())
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate\n")
    db = f"sqlite:///{tmp_path / 'broker.db'}"
    args = ["broker", "serve", "--db", db, "--root-key-file", str(root), "--tls-cert", str(broken)]
    args += ["--tls-key", str(broken), "--port", "0", "--workers", str(WORKERS)]
    done = subprocess.run(
        [ENCLAVEML, *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=os.environ | {"ENCLAVEML_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 5, done.stderr
    assert "could not start: the key broker cannot start" in done.stderr
    assert "Traceback" not in done.stderr
