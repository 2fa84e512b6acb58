"""Group commit: concurrent writes share one transaction, each atomic, in order, answered only once committed.

Every test runs against SQLite and a real PostgreSQL (``store_url``). The group commit
under test writes to the store's database through its own driver connection, as the
store's does. To make jobs share a transaction deterministically, a *gate* job holds the
writer thread until they are all queued: the next transaction takes them all.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from broker_testdata import ROOT_KEY
from sqlalchemy.orm import Session

from enclaveml.broker._database import SqliteWriterLock
from enclaveml.broker._dbapi import WriteBatch, sql_for
from enclaveml.broker._group_commit import GroupCommit
from enclaveml.broker.audit import verify_audit_chain
from enclaveml.broker.models import NonceRow
from enclaveml.broker.store import BrokerStore
from enclaveml.errors import KeyServiceError

T0 = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)  # microseconds: the text form must keep them
JOBS = 6


class Group:
    """A group commit on ``store``'s database, with its writer lock in the test's hands."""

    def __init__(self, store: BrokerStore) -> None:
        self.store = store
        sqlite = store.engine.dialect.name == "sqlite"
        self.lock: AbstractContextManager[object] = (
            SqliteWriterLock(str(store.engine.url.database)) if sqlite else threading.Lock()
        )
        self.commit = GroupCommit(
            store.engine.raw_connection,
            sql_for(store.engine.dialect.name),
            store.root_key,
            self.lock,
            db_error=store.engine.dialect.loaded_dbapi.Error,
            url=store.url,
        )


def _inserted(batch: WriteBatch, value: str, *, rollback: bool = False) -> bool:
    inserted = batch.insert_nonce("attest", value, T0)
    if rollback:  # probe only: leave nothing behind
        raise _Probe(inserted)
    return inserted


class _Probe(Exception):
    """Carries the probe's answer out of a rolled-back job."""

    def __init__(self, inserted: bool) -> None:
        super().__init__()
        self.inserted = inserted


@pytest.fixture
def group(store: BrokerStore) -> Iterator[Group]:
    opened = Group(store)
    yield opened
    opened.commit.close()


def _probe(group: Group, value: str) -> bool:
    """Whether nonce ``value`` is stored (used), by trying to insert it in a rolled-back job."""
    try:
        group.commit.run(lambda batch: _inserted(batch, value, rollback=True))
    except _Probe as probe:
        return not probe.inserted
    raise AssertionError("the probe job did not run")


def _audited(subject: str, *, fail: bool = False, nonce: str | None = None) -> Callable[[WriteBatch], int]:
    def job(batch: WriteBatch) -> int:
        if nonce is not None:
            assert batch.insert_nonce("attest", nonce, T0 + timedelta(minutes=5))
        entry = batch.append_audit("test.event", "a-test", subject, T0, step=subject)
        if fail:
            raise ValueError(f"{subject} fails after writing")
        return entry.seq

    return job


async def _queued(group: Group, jobs: list[Callable[[WriteBatch], Any]]) -> list[Any]:
    """Run ``jobs`` through ``run_async`` in one transaction (module docstring); their outcomes."""
    running, go = threading.Event(), threading.Event()

    def gate(batch: WriteBatch) -> None:
        running.set()
        assert go.wait(timeout=30)

    gated = asyncio.ensure_future(group.commit.run_async(gate))
    await asyncio.to_thread(running.wait, 30)  # the writer thread is inside the gate
    tasks = [asyncio.ensure_future(group.commit.run_async(job)) for job in jobs]
    await asyncio.sleep(0)  # every task has queued its job (run_async queues before it awaits)
    batches = group.commit.batches
    go.set()
    await gated
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert group.commit.batches == batches + 1  # all of them in the one transaction after the gate
    return outcomes


def test_rows_written_on_the_driver_read_back_through_the_orm(group: Group, store: BrokerStore) -> None:
    group.commit.run(lambda batch: batch.insert_nonce("attest", "written-raw", T0))
    group.commit.run(_audited("first"))

    with Session(store.engine) as session:
        row = session.get_one(NonceRow, ("attest", "written-raw"))
        assert (row.expires_at, row.used) == (T0, True)  # aware UTC, microseconds kept
    (entry,) = store.iter_audit()
    assert (entry.seq, entry.at, entry.event, entry.detail) == (1, T0, "test.event", {"step": "first"})
    assert verify_audit_chain(store).ok
    assert store.purge_expired_nonces(T0) == 0  # SQLite compares the text form: it must sort like the time
    assert store.purge_expired_nonces(T0 + timedelta(microseconds=1)) == 1


def test_queued_jobs_commit_together_in_the_order_they_came(group: Group, store: BrokerStore) -> None:
    seqs = asyncio.run(_queued(group, [_audited(f"job-{i}") for i in range(JOBS)]))

    assert seqs == list(range(1, JOBS + 1))
    assert (group.commit.jobs, group.commit.batches) == (JOBS + 1, 2)  # the gate, then all the others
    entries = list(store.iter_audit())
    assert [e.subject for e in entries] == [f"job-{i}" for i in range(JOBS)]
    assert verify_audit_chain(store).ok


def test_a_failing_job_is_rolled_back_alone_with_its_audit_entries(group: Group, store: BrokerStore) -> None:
    jobs = [
        _audited("kept-1", nonce="n-1"),
        _audited("kept-2", nonce="n-2"),
        _audited("failed", nonce="n-3", fail=True),
        _audited("kept-3", nonce="n-4"),
    ]
    outcomes = asyncio.run(_queued(group, jobs))

    assert outcomes[:2] == [1, 2]
    assert isinstance(outcomes[2], ValueError)
    assert outcomes[3] == 3  # the chain continues from the last kept entry: no gap, no fork
    assert [e.subject for e in store.iter_audit()] == ["kept-1", "kept-2", "kept-3"]
    assert verify_audit_chain(store).ok
    assert [_probe(group, n) for n in ("n-1", "n-2", "n-3", "n-4")] == [True, True, False, True]


def test_a_job_alone_that_fails_leaves_nothing(group: Group, store: BrokerStore) -> None:
    with pytest.raises(ValueError, match="fails after writing"):
        group.commit.run(_audited("alone", nonce="n-alone", fail=True))

    assert list(store.iter_audit()) == []
    assert not _probe(group, "n-alone")


def test_a_failed_commit_fails_every_job_of_its_batch_and_writes_nothing(tmp_path: Any) -> None:
    # SQLite checks deferred foreign keys at COMMIT: a real commit that fails.
    with BrokerStore(f"sqlite:///{tmp_path / 'broker.db'}", ROOT_KEY) as store:
        group = Group(store)
        try:

            def dangling_binding(batch: WriteBatch) -> None:
                batch.fetchone("PRAGMA defer_foreign_keys = ON")
                batch.fetchone("INSERT INTO policy_keys (policy_id, key_id) VALUES (?, ?)", "p-none", "k-none")

            outcomes = asyncio.run(_queued(group, [_audited("innocent", nonce="n-innocent"), dangling_binding]))
            for outcome in outcomes:
                assert isinstance(outcome, KeyServiceError)
                assert "failed to commit: FOREIGN KEY constraint failed" in outcome.what
            assert list(store.iter_audit()) == []
            assert not _probe(group, "n-innocent")  # rolled back with the batch; the group works again
        finally:
            group.commit.close()


def test_a_job_cannot_wait_for_its_own_group_commit(group: Group) -> None:
    with pytest.raises(RuntimeError, match="cannot wait for the group commit"):
        group.commit.run(lambda batch: group.commit.run(lambda inner: None))


def test_a_caller_that_stops_waiting_does_not_undo_its_job(group: Group) -> None:
    async def cancel_then_continue() -> None:
        with group.lock:  # the writer cannot start a transaction: the job is still queued when cancelled
            abandoned = asyncio.ensure_future(group.commit.run_async(lambda b: b.insert_nonce("attest", "gone", T0)))
            await asyncio.sleep(0)
            abandoned.cancel()
        await group.commit.run_async(lambda batch: None)  # queued after it: done once it is
        assert abandoned.cancelled()

    asyncio.run(cancel_then_continue())
    assert _probe(group, "gone")


def test_closing_finishes_queued_jobs_then_refuses_new_ones(group: Group) -> None:
    async def close_while_queued() -> list[Any]:
        closing = threading.Thread(target=group.commit.close)
        with group.lock:
            tasks = [asyncio.ensure_future(group.commit.run_async(_audited(f"last-{i}"))) for i in range(3)]
            await asyncio.sleep(0)
            closing.start()  # waits for the writer, which waits for the lock
        results = await asyncio.gather(*tasks)
        await asyncio.to_thread(closing.join)
        return results

    assert asyncio.run(close_while_queued()) == [1, 2, 3]
    with pytest.raises(KeyServiceError, match="closed"):
        group.commit.run(lambda batch: None)


def test_store_writes_from_many_threads_keep_one_valid_chain(store: BrokerStore) -> None:
    store.create_key("customers")
    nonces = [store.issue_nonce("attest", timedelta(minutes=5)) for _ in range(24)]
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def consume(share: list[str]) -> None:
        start.wait()
        try:
            for value in share:
                store.consume_nonce(value, "attest")
                store.record_refusal("test", actor="a-test", subject=value[:8], reason="racing")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=([n.value for n in nonces[i::8]],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    report = verify_audit_chain(store)
    assert (report.ok, report.head_seq) == (True, 1 + 24)  # key.created, then one refusal per nonce
    assert store.remember_request_nonce("a-test", "0123456789abcdef", T0 + timedelta(minutes=5))


def test_a_write_inside_an_orm_transaction_cannot_deadlock(store: BrokerStore) -> None:
    with pytest.raises(RuntimeError, match="inside a SQLAlchemy write transaction"), store._write():
        store.record_refusal("test", actor="a-test", subject="x", reason="nested")
    assert list(store.iter_audit()) == []


def test_the_writer_lock_excludes_other_processes(tmp_path: Any) -> None:
    database = tmp_path / "broker.db"
    try_lock = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(database) + '-writer.lock'!r}, os.O_RDWR)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(1)\n"
    )
    lock = SqliteWriterLock(str(database))
    with lock:  # what every store writer holds around BEGIN IMMEDIATE ... COMMIT
        assert subprocess.run([sys.executable, "-c", try_lock], check=False).returncode == 1
    assert subprocess.run([sys.executable, "-c", try_lock], check=False).returncode == 0
    assert (tmp_path / "broker.db-writer.lock").stat().st_mode & 0o777 == 0o600
    lock.close()
