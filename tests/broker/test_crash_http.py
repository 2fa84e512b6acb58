"""kill -9 of the real HTTPS broker in the middle of release loops loses and duplicates nothing.

The end-to-end twin of ``test_crash.py``: the broker runs in a child process
(``serve_child.py``: uvicorn, TLS with a self-signed certificate, on 127.0.0.1) over a
store on disk; ``CLIENTS`` threads run ``release_keys`` loops against it with
``BrokerClient``; once enough releases succeeded, and while releases are in flight, the
broker gets SIGKILL and a new one starts on the same store with the same root key (at a
new port). The loops retry through the outage, each attempt with a fresh nonce and
ephemeral key, and stop after enough releases from the new broker.
"""

from __future__ import annotations

import base64
import hashlib
import os
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from broker_testdata import ROOT_KEY

from enclaveml.attestation.sim import SimulationKey
from enclaveml.attestation.tee import SimulatedTee
from enclaveml.broker.audit import verify_audit_chain
from enclaveml.broker.client import BrokerClient
from enclaveml.broker.server import make_self_signed
from enclaveml.broker.store import BrokerStore
from enclaveml.errors import ConfigError
from enclaveml.runtime.run import release_keys
from enclaveml.runtime.session import ReleasedKey

CHILD = Path(__file__).with_name("serve_child.py")
MEASUREMENT = hashlib.sha384(b"crash-test job").digest()
POLICY = f'name = "crash-job"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{MEASUREMENT.hex()}"]\n'
KEYS = ("customers", "models")  # customers is rotated once: every release carries versions 1 and 2
CLIENTS = 4
RELEASES_BEFORE_KILL = 24
RELEASES_AFTER_RESTART = 24
RUN_DEADLINE_S = 30.0  # the loops give up here and the test fails (a run takes ~5 s, ~15 s on a loaded 2-core box)
CLIENT_TIMEOUT_S = 10.0  # per HTTP request; an attempt in flight at the deadline ends within two of them
UNREACHABLE = "cannot reach the key broker"  # BrokerClient's ConfigError when no answer came back


@dataclass
class Broker:
    """One broker child process and the URL it serves."""

    process: subprocess.Popen[str]
    url: str
    log: Path

    def failure(self, what: str) -> str:
        return f"{what}; broker log:\n{self.log.read_text(errors='replace')[-4000:]}"

    def close(self) -> None:
        """Kill the process if it still runs, reap it, close our ends of its pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def start_broker(store_url: str, cert: Path, key: Path, log: Path, deadline: float) -> Broker:
    """Start ``serve_child.py``; return once it printed its URL and answers ``GET /v1/health``."""
    with log.open("ab") as stderr:  # a file, not a pipe: a full pipe would stall the broker
        process = subprocess.Popen(
            [sys.executable, str(CHILD), store_url, ROOT_KEY.hex(), str(cert), str(key)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
        )
    broker = Broker(process, "", log)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, broker.failure("the broker printed no URL in time")
        broker.url = process.stdout.readline().strip()
        assert broker.url.startswith("https://127.0.0.1:"), broker.failure(f"the broker printed {broker.url!r}")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=2.0) as http:
            while True:
                try:
                    if http.get(broker.url + "/v1/health").json().get("status") == "ok":
                        return broker
                except (httpx.HTTPError, ValueError):
                    pass
                assert time.monotonic() < deadline, broker.failure("the broker never became healthy")
                assert process.poll() is None, broker.failure("the broker exited")
                time.sleep(0.05)  # readiness poll, not synchronisation between our own threads
    except BaseException:
        broker.close()
        raise


@dataclass(frozen=True)
class Release:
    generation: int  # 0: the broker killed, 1: the one started after it
    keys: tuple[ReleasedKey, ...]


@dataclass
class ReleaseLoops:
    """``CLIENTS`` threads releasing keys from the current broker, recording every outcome.

    Everything below is guarded by ``cond``. ``busy[i]``: thread ``i`` is inside a
    ``release_keys`` call (it may already hold the answer, not yet recorded).
    """

    app_id: str
    api_key: bytes
    ca: Path
    deadline: float
    urls: list[str]  # urls[g]: the broker of generation g; threads use the newest
    cond: threading.Condition = field(default_factory=threading.Condition)
    busy: list[bool] = field(default_factory=lambda: [False] * CLIENTS)
    releases: list[Release] = field(default_factory=list)
    unanswered: list[tuple[int, str]] = field(default_factory=list)  # (generation, error) of retried attempts
    unexpected: list[BaseException] = field(default_factory=list)
    stopping: bool = False

    def succeeded(self, generation: int) -> list[Release]:
        return [r for r in self.releases if r.generation == generation]

    def _finished(self) -> bool:
        done = len(self.succeeded(1)) >= RELEASES_AFTER_RESTART
        return self.stopping or done or bool(self.unexpected) or time.monotonic() > self.deadline

    def run(self, index: int) -> None:
        tee = SimulatedTee(SimulationKey.generate(), MEASUREMENT, b"")
        clients: dict[int, BrokerClient] = {}
        try:
            for attempt in range(1_000_000):
                if not self._attempt(index, KEYS[(index + attempt) % len(KEYS)], tee, clients):
                    return
        except BaseException as exc:
            with self.cond:
                self.busy[index] = False
                self.unexpected.append(exc)
                self.cond.notify_all()
        finally:
            for client in clients.values():
                client.close()

    def _attempt(self, index: int, name: str, tee: SimulatedTee, clients: dict[int, BrokerClient]) -> bool:
        """One release from the newest broker, recorded; False once the loops are finished."""
        with self.cond:
            if self._finished():
                self.stopping = True
                self.cond.notify_all()
                return False
            generation = len(self.urls) - 1
            self.busy[index] = True
            self.cond.notify_all()
        if generation not in clients:
            url = self.urls[generation]
            clients[generation] = BrokerClient(
                url, self.app_id, self.api_key, ca=str(self.ca), timeout=CLIENT_TIMEOUT_S
            )
        try:
            outcome = release_keys(clients[generation], tee, [name])
        except ConfigError as exc:
            if not exc.what.startswith(UNREACHABLE):
                raise
            with self.cond:
                self.busy[index] = False
                self.unanswered.append((generation, exc.what))
                self.cond.notify_all()
                # Back off until a new broker is announced (or briefly), then retry afresh.
                self.cond.wait_for(lambda: len(self.urls) - 1 != generation or self._finished(), 0.1)
            return True
        with self.cond:
            self.busy[index] = False
            self.releases.append(Release(generation, tuple(outcome.keys)))
            self.cond.notify_all()
        return True


def _renderings(material: bytes) -> set[str]:
    """Every way key bytes could appear in an audit entry's text."""
    standard, urlsafe = base64.b64encode(material).decode(), base64.urlsafe_b64encode(material).decode()
    return {standard, standard.rstrip("="), urlsafe, urlsafe.rstrip("="), material.hex(), material.hex().upper()}


def test_a_broker_killed_mid_release_loses_and_duplicates_no_key(store_url: str, tmp_path: Path) -> None:
    began = time.monotonic()
    with BrokerStore(store_url, ROOT_KEY) as store:
        for name in KEYS:
            store.create_key(name, actor="owner")
        store.rotate_key("customers", actor="owner")
        policy = store.register_policy("crash-job", POLICY, KEYS, actor="owner")
        workload = store.enroll_app("crash-workload", "workload")
        created = {k.name: (k.key_id, tuple((v.version, v.state) for v in k.versions)) for k in store.list_keys()}
    versions_of = {key_id: [v for v, _state in versions] for key_id, versions in created.values()}
    expected_versions = {(key_id, v) for key_id, versions in versions_of.items() for v in versions}
    cert, key = make_self_signed(tmp_path / "tls")
    deadline = began + RUN_DEADLINE_S
    joined_by = deadline + 2 * CLIENT_TIMEOUT_S

    first = start_broker(store_url, cert, key, tmp_path / "broker-1.log", deadline)
    second: Broker | None = None
    loops = ReleaseLoops(workload.app.app_id, workload.api_key, cert, deadline, [first.url])
    threads = [threading.Thread(target=loops.run, args=(i,), name=f"release-{i}") for i in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        with loops.cond:  # enough releases done, and at least two in progress: the kill lands mid-request
            ready = loops.cond.wait_for(
                lambda: (
                    bool(loops.unexpected) or (len(loops.succeeded(0)) >= RELEASES_BEFORE_KILL and sum(loops.busy) >= 2)
                ),
                max(0.0, deadline - time.monotonic()),
            )
            assert ready, first.failure(f"only {len(loops.succeeded(0))} releases before the deadline")
            assert not loops.unexpected, loops.unexpected
            # Holding cond: no thread starts or records an attempt until the broker is dead.
            in_flight = sum(loops.busy)
            os.kill(first.process.pid, signal.SIGKILL)
            first.process.wait(timeout=10)
        assert first.process.returncode == -signal.SIGKILL

        second = start_broker(store_url, cert, key, tmp_path / "broker-2.log", deadline)
        with loops.cond:
            loops.urls.append(second.url)
            loops.cond.notify_all()
        for thread in threads:
            thread.join(timeout=max(0.0, joined_by - time.monotonic()))
            assert not thread.is_alive(), f"{thread.name} is stuck"
        assert second.process.stdin is not None
        second.process.stdin.close()  # a clean stop: nothing in flight any more
        second.process.wait(timeout=15)
        assert second.process.returncode == 0, second.failure("the restarted broker did not stop cleanly")
    finally:
        with loops.cond:
            loops.stopping = True
            loops.cond.notify_all()
        for broker in (first, second):
            if broker is not None:
                broker.close()
        for thread in threads:
            thread.join(timeout=max(0.0, joined_by - time.monotonic()))

    # The loops: no answer only while the first broker was dying or dead; the second answered every request.
    assert not loops.unexpected, loops.unexpected
    assert [what for generation, what in loops.unanswered if generation != 0] == []
    before, after = loops.succeeded(0), loops.succeeded(1)
    assert len(before) >= RELEASES_BEFORE_KILL
    assert len(after) >= RELEASES_AFTER_RESTART, f"only {len(after)} releases after the restart"

    # No lost key: every version released before the kill is released after it, with the same bytes.
    materials: dict[tuple[str, int], set[bytes]] = {}
    for release in loops.releases:
        for k in release.keys:
            assert created[k.name][0] == k.key_id
            materials.setdefault((k.key_id, k.version), set()).add(k.material)
    assert {(k.key_id, k.version) for r in before for k in r.keys} == expected_versions
    assert {(k.key_id, k.version) for r in after for k in r.keys} == expected_versions
    assert all(len(seen) == 1 for seen in materials.values()), "one key version released with different bytes"

    with BrokerStore(store_url, ROOT_KEY) as store:
        # No duplicated key: exactly the keys and versions created before the first broker started.
        after_restart = {k.name: (k.key_id, tuple((v.version, v.state) for v in k.versions)) for k in store.list_keys()}
        assert after_restart == created

        report = verify_audit_chain(store)
        assert report.ok, report.problem
        entries = list(store.iter_audit())
        assert Counter(e.event for e in entries if e.event in ("key.created", "key.rotated")) == {
            "key.created": len(KEYS),
            "key.rotated": 1,
        }
        assert not [e for e in entries if e.event.endswith(".refused")]
        released = [e for e in entries if e.event == "key.released"]
        for entry in released:
            assert entry.detail["policy_id"] == policy.policy_id
            assert entry.detail["versions"] == versions_of[entry.subject]
        # Every release a client received is audited. A release in flight at the kill may have
        # committed (audited, key handed over) while its answer died with the process: those are
        # the only audited releases no client saw. (``in_flight`` also counts attempts that had
        # their answer but not yet recorded it, and ones still fetching a nonce: an upper bound.)
        assert len(loops.releases) <= len(released) <= len(loops.releases) + in_flight

        # The audit log names keys and versions, never their bytes.
        secrets_seen = set().union(*(_renderings(m) for seen in materials.values() for m in seen))
        for entry in entries:
            text = entry.detail_json + entry.subject + entry.actor
            assert not [s for s in secrets_seen if s in text], f"key bytes in audit entry {entry.seq}"

        # And the store still opens every version to the bytes the clients received.
        for name in KEYS:
            for k in store.release_key_material(policy.policy_id, name, actor="crash-test"):
                assert materials[(k.key_id, k.version)] == {k.material}
