"""kill -9 in the middle of a key creation and release loop loses nothing that was committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from broker_testdata import ROOT_KEY

from enclaveml.broker.audit import verify_audit_chain
from enclaveml.broker.store import BrokerStore

CHILD = Path(__file__).with_name("churn_child.py")
COMMITTED_BEFORE_KILL = 12


def _run_until_killed(url: str) -> tuple[dict[str, str], set[str]]:
    """Start the churn child, SIGKILL it once enough keys committed; return what it reported."""
    process = subprocess.Popen(
        [sys.executable, str(CHILD), url, ROOT_KEY.hex()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert process.stdout is not None
    created: dict[str, str] = {}
    released: set[str] = set()
    deadline = time.monotonic() + 30
    try:
        while len(created) < COMMITTED_BEFORE_KILL:
            line = process.stdout.readline()
            assert line, f"child exited early: {process.communicate()[1]}"
            assert time.monotonic() < deadline, "child is too slow"
            kind, name, *rest = line.split()
            if kind == "created":
                created[name] = rest[0]
            else:
                released.add(name)
        process.send_signal(signal.SIGKILL)  # mid-loop: most likely inside a transaction
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    return created, released


def test_a_killed_broker_loses_and_duplicates_nothing(store_url: str) -> None:
    BrokerStore(store_url, ROOT_KEY).close()  # migrate before the child starts
    created, released = _run_until_killed(store_url)

    with BrokerStore(store_url, ROOT_KEY) as store:
        keys = {key.name: key for key in store.list_keys()}
        for name, key_id in created.items():  # every committed key survived, with its material
            assert keys[name].key_id == key_id
            assert store.unwrap_data_key(store.wrap_data_key(name, bytes(32), b""), b"") == bytes(32)
        assert len(keys) - len(created) in (0, 1)  # at most the one whose line was not yet read

        report = verify_audit_chain(store)
        assert report.ok, report.problem
        entries = list(store.iter_audit())
        creations = Counter(e.detail["name"] for e in entries if e.event == "key.created")
        assert creations == Counter(keys.keys())  # exactly one audit entry per key, and a key per entry
        released_ids = {e.subject for e in entries if e.event == "key.released"}
        assert {created[name] for name in released} <= released_ids
        assert not [e for e in entries if e.event.endswith(".refused")]
