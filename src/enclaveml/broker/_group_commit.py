"""Group commit: the write jobs of concurrent requests commit together, in one transaction.

Every key release ends in a write (its nonces, the release and its audit entry) and every
commit waits for the disk (``fsync``; SQLite ``synchronous=FULL``, PostgreSQL
``synchronous_commit``), which takes 0.2-8 ms on the machines we measured. One commit per
request capped a broker at a few hundred releases per second, all but one of its threads
waiting for the single writer (docs/performance.md, "Key broker"). Here one writer thread
per store takes every job queued while the previous transaction committed and runs them
in the next transaction, in the order they came:

1. ``begin`` (SQLite ``BEGIN IMMEDIATE``; PostgreSQL the writers' advisory lock; under the
   store's in-process write lock, shared with its SQLAlchemy writers);
2. per job, a savepoint: a job that raises is rolled back to it alone, with the audit
   entries it appended, and its caller gets the exception; the others go on (a batch of one
   job needs no savepoint: the whole transaction is rolled back);
3. one ``COMMIT`` for all; only then does any caller get its result. If the commit fails,
   every caller in the batch gets ``KeyServiceError`` and nothing of theirs was written.

So each job is atomic, the audit chain grows in job order with its head read inside the
transaction, and nothing is answered before it is durable: the guarantees of one
transaction per request, with one disk flush per batch. At low load a batch is one job and
costs what a plain transaction costs, plus a hand-over to the writer thread (~20-50 µs).

Callers wait in one of two ways: ``run`` blocks the calling thread; ``run_async`` awaits
on an asyncio loop (the HTTP API's hot routes run on uvicorn's loop, not in worker
threads), and the writer wakes each loop once per batch. Jobs run in the writer thread:
they must be short and must not wait for the group commit themselves (that would
deadlock; ``run`` refuses it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from enclaveml.broker._dbapi import Sql, WriteBatch
from enclaveml.broker.root_key import RootKey
from enclaveml.errors import KeyServiceError

__all__ = ["MAX_BATCH", "GroupCommit"]

logger = logging.getLogger("enclaveml.broker")

T = TypeVar("T")
MAX_BATCH = 64  # jobs per transaction at most: bounds how long one commit keeps its callers waiting


class _Job(Generic[T]):
    """A job and how its caller waits: on ``done`` (a thread) or on ``future`` (an asyncio loop)."""

    __slots__ = ("done", "error", "fn", "future", "result")

    def __init__(self, fn: Callable[[WriteBatch], T], future: asyncio.Future[T] | None = None) -> None:
        self.fn = fn
        self.result: T | None = None
        self.error: BaseException | None = None
        self.future = future
        self.done: threading.Lock | None = None
        if future is None:
            self.done = threading.Lock()  # held until the job's transaction ended: a one-shot latch
            self.done.acquire()


def _settle(jobs: list[_Job[Any]]) -> None:
    """On the loop: hand each awaiting caller its result (unless it stopped waiting)."""
    for job in jobs:
        assert job.future is not None
        if job.future.cancelled():
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)


def _wake(jobs: list[_Job[Any]]) -> None:
    """After a batch: release the waiting threads, and wake each loop once for its callers."""
    by_loop: defaultdict[asyncio.AbstractEventLoop, list[_Job[Any]]] = defaultdict(list)
    for job in jobs:
        if job.done is not None:
            job.done.release()
        elif job.future is not None:
            by_loop[job.future.get_loop()].append(job)
    for loop, waiting in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, waiting)
        except RuntimeError:  # the loop was closed: nobody is waiting any more
            logger.debug("broker: a group commit finished after its event loop closed")


class GroupCommit:
    """One writer thread committing the jobs given to :meth:`run` in batches (module docstring).

    ``connect()`` opens a driver connection for the writer (SQLAlchemy's
    ``engine.raw_connection()``); ``lock`` is held around each batch (the store's
    in-process write lock); ``db_error``: the driver's base exception, turned into
    ``KeyServiceError`` naming ``url``. The thread starts with the first job.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        sql: Sql,
        root: RootKey,
        lock: AbstractContextManager[object],
        *,
        db_error: type[BaseException],
        url: str,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._connect, self._sql, self._root, self._lock = connect, sql, root, lock
        self._db_error, self._url, self._max_batch = db_error, url, max_batch
        self._queue: deque[_Job[Any]] = deque()
        self._wakeup = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._connection: Any = None
        self.batches = 0  # transactions committed or attempted (tests and metrics)
        self.jobs = 0

    def run(self, fn: Callable[[WriteBatch], T]) -> T:
        """Run ``fn`` in the next batch's transaction; its result once that committed, or its exception."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a group-commit job cannot wait for the group commit")
        job: _Job[T] = _Job(fn)
        self._enqueue(job)
        assert job.done is not None
        job.done.acquire()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    async def run_async(self, fn: Callable[[WriteBatch], T]) -> T:
        """``run`` for a coroutine: awaits the batch's commit without blocking the loop.

        A caller that is cancelled stops waiting; its job still commits or fails with its batch.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(fn, future))
        return await future

    def _enqueue(self, job: _Job[Any]) -> None:
        if self._pid != os.getpid():  # forked: the writer thread stayed in the parent
            raise KeyServiceError(
                f"broker store {self._url} was opened in another process", "open the store after forking"
            )
        with self._wakeup:
            if self._closed:
                raise KeyServiceError(f"broker store {self._url} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, name="broker-group-commit", daemon=True)
                self._thread.start()
            self._queue.append(job)
            self._wakeup.notify()

    def close(self) -> None:
        """Finish the queued jobs, stop the writer thread and close its connection."""
        with self._wakeup:
            self._closed = True
            thread = self._thread
            self._wakeup.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the writer thread --------------------------------------------------------------

    def _take(self) -> list[_Job[Any]]:
        """The queued jobs (at most ``max_batch``), waiting for one; [] once closed and drained."""
        with self._wakeup:
            while not self._queue:
                if self._closed:
                    return []
                self._wakeup.wait()
            count = min(len(self._queue), self._max_batch)
            return [self._queue.popleft() for _ in range(count)]

    def _write_loop(self) -> None:
        try:
            while jobs := self._take():
                try:
                    self._commit(jobs)
                except BaseException as exc:  # the batch as a whole failed: nothing of it was written
                    failure = self._as_service_error(exc)
                    for job in jobs:
                        job.result, job.error = None, failure
                    self._drop_connection(broken=True)
                finally:
                    _wake(jobs)
        finally:
            self._drop_connection(broken=False)

    def _commit(self, jobs: list[_Job[Any]]) -> None:
        self.batches += 1
        self.jobs += len(jobs)
        with self._lock:
            if self._connection is None:
                self._connection = self._connect()
            batch = WriteBatch(self._connection.driver_connection, self._sql, self._root)
            try:
                batch.begin()
                if len(jobs) == 1:
                    self._run_alone(batch, jobs[0])
                    return
                for job in jobs:
                    head = batch.savepoint()
                    try:
                        job.result = job.fn(batch)
                    except Exception as exc:
                        batch.rollback_to(head)
                        job.error = self._as_service_error(exc) if isinstance(exc, self._db_error) else exc
                    else:
                        batch.release()
                batch.commit()
            except BaseException:
                self._rollback(batch)
                raise
            finally:
                batch.close()

    def _run_alone(self, batch: WriteBatch, job: _Job[Any]) -> None:
        try:
            job.result = job.fn(batch)
        except Exception as exc:
            batch.rollback()
            job.error = self._as_service_error(exc) if isinstance(exc, self._db_error) else exc
            return
        batch.commit()

    def _rollback(self, batch: WriteBatch) -> None:
        try:
            batch.rollback()
        except Exception:  # the connection is gone; it is dropped next
            logger.debug("broker: rollback after a failed group commit failed too", exc_info=True)

    def _drop_connection(self, *, broken: bool) -> None:
        """Give the connection back to the pool, or discard it after a failure."""
        if self._connection is not None:
            try:
                if broken:
                    self._connection.invalidate()
                else:
                    self._connection.close()
            except Exception:
                logger.debug("broker: closing the group commit's connection failed", exc_info=True)
            self._connection = None

    def _as_service_error(self, exc: BaseException) -> KeyServiceError:
        if isinstance(exc, KeyServiceError):
            return exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, self._db_error):
            logger.error("broker: group commit failed", exc_info=exc)
            first = "internal error"
        return KeyServiceError(f"broker store {self._url} failed to commit: {first}", "check the database and retry")
