"""The store's hot path on the driver's DB-API: prebuilt SQL for nonces, key releases and audit appends.

Why not SQLAlchemy here: a statement built and run through a SQLAlchemy session costs
about 50-150 µs of CPU, the same statement on the driver's cursor 5-20 µs, and a key
release runs about ten of them; profiles put most of the broker's CPU per release in
SQLAlchemy (docs/performance.md, "Key broker"). So the statements of the hot path (request
and attestation nonces, the release's reads, audit appends) are written here once per
dialect and run on the raw ``sqlite3`` / psycopg 3 cursor, inside the group commit's
transaction (``_group_commit.py``); psycopg prepares them server-side after a few uses,
``sqlite3`` keeps them compiled in its statement cache. Everything else (enrollment, keys,
policies, the owner API's reads) stays on SQLAlchemy.

Values are written exactly as SQLAlchemy writes them (``models.py``): on SQLite, naive
UTC text ``YYYY-MM-DD HH:MM:SS.ffffff`` and 0/1 booleans; on PostgreSQL, aware datetimes
and booleans, adapted by psycopg. ``tests/broker/test_group_commit.py`` reads rows written
here back through the ORM.

A :class:`WriteBatch` is one write transaction as the group commit's jobs see it. It
starts like every write transaction of the store: SQLite ``BEGIN IMMEDIATE`` (the one
write lock, up front); PostgreSQL ``pg_advisory_xact_lock(AUDIT_LOCK_ID)`` first, so
writers take their locks in one order (advisory lock, then rows) and never deadlock on
them. The audit chain's head is read inside the transaction at the first append and then
kept in memory; a job rolled back to its savepoint restores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from enclaveml.broker.audit import AUDIT_LOCK_ID, AuditEntry, ChainHead, next_entry
from enclaveml.broker.root_key import RootKey

__all__ = ["POSTGRESQL", "SQLITE", "Sql", "WriteBatch", "sql_for"]


def _sqlite_time(at: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME text for an aware datetime (stored as naive UTC)."""
    if at.tzinfo is None:
        raise ValueError("the broker store takes timezone-aware datetimes only")
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("the broker store takes timezone-aware datetimes only")
    return at


@dataclass(frozen=True)
class Sql:
    """The hot path's statements in one dialect's parameter style."""

    dialect: str
    begin: str | None  # emitted to start a write transaction (psycopg begins on its own)
    writer_lock: str | None  # taken first in every write transaction
    insert_nonce: str
    audit_head: str
    insert_audit: str
    policy: str  # (name, revoked) of a policy, FOR SHARE where the database has it
    key_versions: str  # (key_id, name, bound to the policy, version, sealed_material), enabled versions oldest first
    true: bool | int

    def time(self, at: datetime) -> datetime | str:
        return _sqlite_time(at) if self.dialect == "sqlite" else _aware(at)


# Written for SQLite's ``?`` placeholders; PostgreSQL's are the same with ``%s``.
_INSERT_NONCE = "INSERT INTO nonces (purpose, value, expires_at, used) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
_AUDIT_HEAD = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
_INSERT_AUDIT = (
    "INSERT INTO audit_log (seq, at, event, actor, subject, detail, prev_hash, hash, seal) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_POLICY = "SELECT name, revoked FROM policies WHERE policy_id = ?"
# One statement for the key (by id or name; names never look like ids), whether the policy
# may receive it, and its enabled versions: a row per version, one row with NULLs if none.
_KEY_VERSIONS = (
    "SELECT k.key_id, k.name, "
    "EXISTS (SELECT 1 FROM policy_keys b WHERE b.policy_id = ? AND b.key_id = k.key_id), "
    "v.version, v.sealed_material "
    "FROM keys k LEFT JOIN key_versions v ON v.key_id = k.key_id AND v.state = 'enabled' "
    "WHERE k.key_id = ? OR k.name = ? ORDER BY k.key_id, v.version"
)

SQLITE = Sql(
    dialect="sqlite",
    begin="BEGIN IMMEDIATE",
    writer_lock=None,
    insert_nonce=_INSERT_NONCE,
    audit_head=_AUDIT_HEAD,
    insert_audit=_INSERT_AUDIT,
    policy=_POLICY,
    key_versions=_KEY_VERSIONS,
    true=1,
)


def _pg(statement: str) -> str:
    return statement.replace("?", "%s")


POSTGRESQL = Sql(
    dialect="postgresql",
    begin=None,
    writer_lock="SELECT pg_advisory_xact_lock(%s)",
    insert_nonce=_pg(_INSERT_NONCE),
    audit_head=_AUDIT_HEAD,
    insert_audit=_pg(_INSERT_AUDIT),
    policy=_pg(_POLICY) + " FOR SHARE",
    key_versions=_pg(_KEY_VERSIONS),
    true=True,
)


def sql_for(dialect: str) -> Sql:
    if dialect == "sqlite":
        return SQLITE
    if dialect == "postgresql":
        return POSTGRESQL
    raise ValueError(f"no hot-path statements for {dialect!r}")


class WriteBatch:
    """One write transaction on a driver connection (module docstring); not thread-safe.

    The group commit calls ``begin``, then per job ``savepoint`` / ``release`` or
    ``rollback_to``, then ``commit`` (or ``rollback``). Jobs call the rest.
    """

    def __init__(self, connection: Any, sql: Sql, root: RootKey) -> None:
        self._connection = connection
        self._cursor = connection.cursor()
        self.sql = sql
        self._root = root
        self._head: ChainHead | None = None

    # -- transaction control (the group commit) -----------------------------------------

    def begin(self) -> None:
        if self.sql.begin is not None:
            self._cursor.execute(self.sql.begin)
        if self.sql.writer_lock is not None:
            self._cursor.execute(self.sql.writer_lock, (AUDIT_LOCK_ID,))
        self._head = None

    def savepoint(self) -> ChainHead | None:
        """Start a job's savepoint; returns what ``rollback_to`` restores."""
        self._cursor.execute("SAVEPOINT job")
        return self._head

    def release(self) -> None:
        self._cursor.execute("RELEASE SAVEPOINT job")

    def rollback_to(self, head: ChainHead | None) -> None:
        """Undo the current job's writes (and its audit entries), keep the others'."""
        self._cursor.execute("ROLLBACK TO SAVEPOINT job")
        self._cursor.execute("RELEASE SAVEPOINT job")
        self._head = head

    def commit(self) -> None:
        self._connection.commit()

    def rollback(self) -> None:
        self._connection.rollback()

    def close(self) -> None:
        self._cursor.close()

    # -- what jobs do -------------------------------------------------------------------

    def fetchone(self, statement: str, *params: Any) -> Any:
        self._cursor.execute(statement, params)
        return self._cursor.fetchone()

    def fetchall(self, statement: str, *params: Any) -> Sequence[Any]:
        self._cursor.execute(statement, params)
        rows: Sequence[Any] = self._cursor.fetchall()
        return rows

    def insert_nonce(self, purpose: str, value: str, expires_at: datetime) -> bool:
        """Insert a used nonce; False when it is there already (used before)."""
        self._cursor.execute(self.sql.insert_nonce, (purpose, value, self.sql.time(expires_at), self.sql.true))
        return bool(self._cursor.rowcount == 1)

    def append_audit(self, event: str, actor: str, subject: str, at: datetime, **detail: Any) -> AuditEntry:
        """Append an entry after the chain's head (read in this transaction the first time)."""
        if self._head is None:
            self._cursor.execute(self.sql.audit_head)
            self._head = ChainHead.of(self._cursor.fetchone())
        entry = next_entry(self._head, self._root, event=event, actor=actor, subject=subject, detail=detail, at=at)
        row = (entry.seq, self.sql.time(at), event, entry.actor, entry.subject, entry.detail_json)
        self._cursor.execute(self.sql.insert_audit, (*row, entry.prev_hash, entry.hash, entry.seal))
        self._head = ChainHead(entry.seq, bytes.fromhex(entry.hash))
        return entry
