"""kill -9 while many releases share group commits: every release a caller saw is in the log, once.

The child (``release_threads_child.py``) runs ``THREADS`` threads releasing a key, each with
a fresh attestation nonce, and prints a nonce only after its release returned. With that
many writers the group commit puts several releases in each transaction, so the kill most
likely lands while a batch is being written or committed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker_testdata import POLICY_TOML, ROOT_KEY
from sqlalchemy import select
from sqlalchemy.orm import Session

from enclaveml.broker.audit import verify_audit_chain
from enclaveml.broker.models import NonceRow
from enclaveml.broker.store import BrokerStore

CHILD = Path(__file__).with_name("release_threads_child.py")
THREADS = 8
RELEASED_BEFORE_KILL = 60


def test_a_killed_broker_keeps_every_release_it_answered(store_url: str) -> None:
    with BrokerStore(store_url, ROOT_KEY) as store:
        store.create_key("customers")
        policy = store.register_policy("crash-job", POLICY_TOML, ["customers"])
    process = subprocess.Popen(
        [sys.executable, str(CHILD), store_url, ROOT_KEY.hex(), policy.policy_id, str(THREADS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert process.stdout is not None
    answered: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(answered) < RELEASED_BEFORE_KILL:
            line = process.stdout.readline()
            assert line, f"child exited early: {process.communicate()[1]}"
            assert time.monotonic() < deadline, "child is too slow"
            answered.append(line.split()[1])
        process.send_signal(signal.SIGKILL)  # releases in flight in every thread
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        if process.stderr is not None:
            process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    with BrokerStore(store_url, ROOT_KEY) as store:
        report = verify_audit_chain(store)
        assert report.ok, report.problem
        entries = list(store.iter_audit())
        released = [e for e in entries if e.event == "key.released"]
        assert not [e for e in entries if e.event.endswith(".refused")]  # no nonce used twice
        with Session(store.engine) as session:
            used = set(session.scalars(select(NonceRow.value).where(NonceRow.purpose == "attest")))
        # Every answered release committed: its nonce is used and its audit entry written ...
        assert set(answered) <= used
        # ... exactly once per nonce; beyond the answered ones, only releases still unanswered
        # when the child died (at most one per thread, plus lines not yet read).
        assert len(released) == len(used)
        assert len(answered) <= len(released)
