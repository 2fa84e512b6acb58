"""Engines for the broker store: SQLite (embedded, the default) or PostgreSQL (by URL).

SQLite (``sqlite:///PATH``): the file is created mode 0600 (its directory 0700 when new);
every connection sets ``journal_mode=WAL`` (readers never block the writer),
``synchronous=FULL`` (a committed key survives power loss, not just a killed process),
``foreign_keys=ON`` and a 30 s ``busy_timeout``. SQLAlchemy, not the ``sqlite3`` module,
emits ``BEGIN``: write transactions (connections carrying the :data:`WRITE_OPTION`
execution option) start with ``BEGIN IMMEDIATE``, which takes the database's one write lock
up front, so every write transaction — audit appends included — is serialised and none
fails half-way on a lock upgrade. In-memory databases are refused: each pooled connection
would see a different, empty one.

Before ``BEGIN IMMEDIATE``, the store's writers queue on :class:`SqliteWriterLock`: a
thread lock, then ``flock`` on ``<database>-writer.lock`` (mode 0600) for writers in other
processes (``serve_workers``). SQLite's busy handler *sleeps* between tries (1, 2, 5, ...
up to 100 ms) and made waiting writers miss their turn; a blocked ``flock`` wakes as soon as
it is released. Writers that do not take it (another program) still meet the busy timeout.

PostgreSQL (``postgresql://``, ``postgres://`` or ``postgresql+psycopg://``): psycopg 3,
``READ COMMITTED``, connections checked before use. Every write transaction of the store
takes ``pg_advisory_xact_lock(AUDIT_LOCK_ID)`` first (:func:`lock_writers`): nearly every
write appends to the audit chain, which must be serialised anyway (``audit.py``), and one
lock taken before any row lock gives all writers one lock order, so the group commit's
batches (``_group_commit.py``) and a revocation never deadlock.

Bound parameters are hidden from SQLAlchemy's error messages and logs: they include sealed
key material and api key hashes.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session

from enclaveml.broker._dbapi import WriteBatch
from enclaveml.broker._group_commit import GroupCommit
from enclaveml.broker.audit import AUDIT_LOCK_ID
from enclaveml.broker.root_key import RootKey
from enclaveml.errors import ConfigError

__all__ = [
    "WRITE_OPTION",
    "SqliteWriterLock",
    "StoreCore",
    "as_utc",
    "create_broker_engine",
    "insert_ignore",
    "lock_writers",
    "redacted_url",
    "table_of",
]

T = TypeVar("T")
_WRITER_LOCK = text("SELECT pg_advisory_xact_lock(:id)")

WRITE_OPTION = "enclaveml_broker_write"
_BUSY_TIMEOUT_S = 30
_HINT = "use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"


def redacted_url(url: str | URL) -> str:
    """The URL with any password replaced by ``***``, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def create_broker_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"not a database URL: {redacted_url(url)}", _HINT) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend in ("postgresql", "postgres"):
        return _postgresql_engine(parsed)
    raise ConfigError(f"unsupported broker database {parsed.drivername!r}", _HINT)


def _sqlite_engine(url: URL) -> Engine:
    if url.drivername not in ("sqlite", "sqlite+pysqlite"):
        raise ConfigError(f"unsupported SQLite driver {url.drivername!r}", _HINT)
    if not url.database or url.database == ":memory:" or url.query.get("mode") == "memory":
        raise ConfigError("the broker store cannot be an in-memory SQLite database", "give a file: sqlite:///PATH")
    path = Path(url.database)
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise ConfigError(
            f"cannot create broker store {path}: {exc.strerror}", "check the path and permissions"
        ) from None
    engine = create_engine(
        url,
        connect_args={"timeout": _BUSY_TIMEOUT_S, "check_same_thread": False},
        pool_size=8,
        max_overflow=16,
        hide_parameters=True,
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        for pragma in (
            f"busy_timeout = {_BUSY_TIMEOUT_S * 1000}",
            "foreign_keys = ON",
            "journal_mode = WAL",
            "synchronous = FULL",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class SqliteWriterLock:
    """The store's SQLite writers, one at a time across threads and processes (module docstring)."""

    def __init__(self, database: str) -> None:
        self._path = f"{database}-writer.lock"
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int:
        """This process's own open file: a lock file opened before a fork would be one lock for both."""
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def __enter__(self) -> SqliteWriterLock:
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._file(), fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None


def _postgresql_engine(url: URL) -> Engine:
    if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ConfigError(f"unsupported PostgreSQL driver {url.drivername!r}", "use postgresql+psycopg:// (psycopg 3)")
    return create_engine(
        url.set(drivername="postgresql+psycopg"),
        pool_pre_ping=True,
        pool_size=8,
        max_overflow=16,
        hide_parameters=True,
    )


def lock_writers(session: Session) -> None:
    """First thing in a write transaction on PostgreSQL: the writers' advisory lock (module docstring)."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(_WRITER_LOCK, {"id": AUDIT_LOCK_ID})


def as_utc(now: datetime | None) -> datetime:
    """``now`` in UTC (the current time when None); naive datetimes are refused."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return now.astimezone(UTC)


def table_of(row_class: type[Any]) -> Table:
    return cast(Table, row_class.__table__)


def insert_ignore(session: Session, row_class: type[Any], **values: Any) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was inserted.

    RETURNING tells, not ``rowcount``: psycopg under SQLAlchemy reports -1 for INSERTs.
    """
    table = table_of(row_class)
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).values(**values).on_conflict_do_nothing()
    returning = statement.returning(*table.primary_key.columns)
    return session.connection().execute(returning).first() is not None


class StoreCore:
    """What the parts of ``BrokerStore`` share; ``BrokerStore`` provides each of these."""

    _root: RootKey
    _url: str
    _request_local: threading.local
    _group: GroupCommit

    def _write(self) -> AbstractContextManager[Session]:
        """A write transaction (SQLite: ``BEGIN IMMEDIATE``)."""
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Session]:
        raise NotImplementedError

    def _commit(self, job: Callable[[WriteBatch], T]) -> T:
        """Run ``job`` in the group commit's next transaction (``_group_commit.py``); its result once committed."""
        raise NotImplementedError

    def _open_version(self, key_id: str, version: int, sealed: bytes | None) -> bytes:
        """A key version's material, unsealed by the root key (``BrokerKms``)."""
        raise NotImplementedError

    def _audit(self, session: Session, event: str, actor: str, subject: str, at: datetime, **detail: Any) -> None:
        """Append an audit entry in ``session``'s transaction."""
        raise NotImplementedError
