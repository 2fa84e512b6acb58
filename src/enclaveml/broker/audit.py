"""The broker's append-only audit log: a SHA-256 hash chain, sealed by the root key.

Entry ``n`` (``seq`` = 1, 2, 3, ... without gaps) stores::

    hash_n = SHA-256(prev_hash_n ‖ canonical_json({"seq", "at", "event", "actor", "subject", "detail"}))
    prev_hash_n = hash_{n-1}        (32 zero bytes for seq 1)
    seal_n = HMAC-SHA256(audit_key, hash_n)        (audit_key: root_key.py)

``canonical_json`` is ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)`` in UTF-8; ``at`` is written ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC);
hashes and seals are stored as lowercase hex; ``detail`` is stored as its canonical JSON.

The chain shows an edited, deleted, inserted or reordered entry to anyone who can read
the table; the seal also shows a chain that was *recomputed* after an edit, unless the
editor had the root key. Deleting entries from the end leaves a shorter valid chain:
compare ``AuditReport.head_seq`` / ``head_hash`` with a value recorded elsewhere.

``detail`` holds names, ids, versions and reasons — never key material; ``next_entry``
refuses bytes outright. Appends are serialised so concurrent writers never fork the
chain: on SQLite every write transaction already holds the one write lock (``BEGIN
IMMEDIATE``); on PostgreSQL every write transaction takes ``pg_advisory_xact_lock`` first,
released at commit. Either way the chain's head is read inside the transaction that
appends, and the entry commits or rolls back with the change it records. ``append_audit``
appends in an ORM session; the group commit (``_group_commit.py``) appends several entries
in one transaction, keeping the head in memory between them (``next_entry``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from enclaveml.broker.models import AuditRow
from enclaveml.broker.root_key import RootKey

if TYPE_CHECKING:
    from enclaveml.broker.store import BrokerStore

__all__ = [
    "AUDIT_LOCK_ID",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditReport",
    "ChainHead",
    "append_audit",
    "check_audit_chain",
    "next_entry",
    "verify_audit_chain",
]

GENESIS_HASH = bytes(32)
AUDIT_LOCK_ID = 0x656E636D_61756474  # "encm" "audt": PostgreSQL's advisory lock for writers
_ACTOR_MAX, _SUBJECT_MAX = 128, 256
_COLUMNS = ("seq", "at", "event", "actor", "subject", "prev_hash", "hash", "seal")
# Built once: constructing statements per append was a measurable part of a key release.
_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:id)")
_LAST_ENTRY = select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)
_INSERT_ENTRY = insert(AuditRow)


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def format_time(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(
    prev_hash: bytes, seq: int, at: datetime, event: str, actor: str, subject: str, detail: Mapping[str, Any]
) -> bytes:
    """``SHA-256(prev_hash ‖ canonical_json(entry))`` (module docstring)."""
    body = {"seq": seq, "at": format_time(at), "event": event, "actor": actor, "subject": subject, "detail": detail}
    return hashlib.sha256(prev_hash + canonical_json(body)).digest()


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: datetime
    event: str
    actor: str
    subject: str
    detail_json: str  # as stored; ``detail`` parses it
    prev_hash: str
    hash: str
    seal: str

    @property
    def detail(self) -> dict[str, Any]:
        value = json.loads(self.detail_json)
        if not isinstance(value, dict):
            raise ValueError("audit detail is not a JSON object")
        return value

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditEntry:
        return cls(row.seq, row.at, row.event, row.actor, row.subject, row.detail, row.prev_hash, row.hash, row.seal)


@dataclass(frozen=True)
class ChainHead:
    """The newest entry's ``seq`` and hash (0 and ``GENESIS_HASH`` for an empty log)."""

    seq: int
    hash: bytes

    @classmethod
    def of(cls, row: tuple[int, str] | None) -> ChainHead:
        """From the ``(seq, hash hex)`` of the newest row, or None."""
        return cls(0, GENESIS_HASH) if row is None else cls(int(row[0]), bytes.fromhex(row[1]))


def next_entry(
    head: ChainHead,
    root: RootKey,
    *,
    event: str,
    actor: str,
    subject: str,
    detail: Mapping[str, Any],
    at: datetime,
) -> AuditEntry:
    """The entry that follows ``head`` (hashed and sealed); the caller inserts it."""
    detail_text = canonical_json(dict(detail)).decode()  # TypeError on bytes: key material never gets in
    actor, subject = actor[:_ACTOR_MAX], subject[:_SUBJECT_MAX]
    seq = head.seq + 1
    digest = entry_hash(head.hash, seq, at, event, actor, subject, json.loads(detail_text))
    seal = root.audit_seal(digest).hex()
    return AuditEntry(seq, at, event, actor, subject, detail_text, head.hash.hex(), digest.hex(), seal)


def append_audit(
    session: Session,
    root: RootKey,
    *,
    event: str,
    actor: str,
    subject: str,
    detail: Mapping[str, Any],
    at: datetime,
) -> AuditEntry:
    """Append one entry in ``session``'s (write) transaction; it commits with the change."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":  # already held by the store's writers; taken again for other callers
        conn.execute(_ADVISORY_LOCK, {"id": AUDIT_LOCK_ID})
    last = conn.execute(_LAST_ENTRY).first()
    head = ChainHead.of(None if last is None else (last.seq, last.hash))
    entry = next_entry(head, root, event=event, actor=actor, subject=subject, detail=detail, at=at)
    conn.execute(_INSERT_ENTRY, {name: getattr(entry, name) for name in _COLUMNS} | {"detail": entry.detail_json})
    return entry


@dataclass(frozen=True)
class AuditReport:
    """The outcome of a chain check. ``first_bad_seq`` names the first entry that fails."""

    entries: int  # entries checked, up to and including the first bad one
    head_seq: int  # last good entry (0 when none)
    head_hash: str  # its hash (the genesis value when none)
    first_bad_seq: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None


def _problem(entry: AuditEntry, expected_seq: int, prev: bytes, root: RootKey | None) -> str | None:
    if entry.seq < expected_seq:
        return f"entry {entry.seq} is out of sequence (inserted before entry {expected_seq})"
    if entry.seq > expected_seq:
        return f"entry {expected_seq} is missing (deleted); the next entry is {entry.seq}"
    if not hmac.compare_digest(entry.prev_hash, prev.hex()):
        return (
            f"entry {entry.seq} does not follow entry {entry.seq - 1} (prev_hash differs): "
            "entries were deleted, inserted or reordered"
        )
    try:
        digest = entry_hash(prev, entry.seq, entry.at, entry.event, entry.actor, entry.subject, entry.detail)
    except ValueError:
        digest = b""
    if not hmac.compare_digest(digest.hex(), entry.hash):
        return f"entry {entry.seq} was modified (its content does not match its hash)"
    if root is not None and not hmac.compare_digest(root.audit_seal(digest).hex(), entry.seal):
        return f"entry {entry.seq} has a bad seal: the chain was rewritten by someone without the root key"
    return None


def check_audit_chain(entries: Iterable[AuditEntry], root: RootKey | None) -> AuditReport:
    """Check ``entries`` (in ``seq`` order); seals too when ``root`` is given."""
    prev, expected, checked = GENESIS_HASH, 1, 0
    for entry in entries:
        checked += 1
        problem = _problem(entry, expected, prev, root)
        if problem is not None:
            return AuditReport(checked, expected - 1, prev.hex(), min(expected, entry.seq), problem)
        prev, expected = bytes.fromhex(entry.hash), expected + 1
    return AuditReport(checked, expected - 1, prev.hex())


def verify_audit_chain(store: BrokerStore) -> AuditReport:
    """Check the whole audit log of ``store``: links, hashes and seals."""
    return check_audit_chain(store.iter_audit(), store.root_key)
