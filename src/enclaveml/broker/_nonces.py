"""The nonce half of :class:`~enclaveml.broker.store.BrokerStore`: single use, across processes.

Attestation nonces are *stateless until used*: issuing one writes nothing. A nonce is 32
bytes, sent as base64url without padding::

    expires_us (u64 big-endian, µs since the epoch) ‖ random (8) ‖ mac (16)
    mac = HMAC-SHA256(nonce_key, "enclaveml broker nonce v1" ‖ 0 ‖ purpose ‖ 0 ‖ expires_us ‖ random)[:16]

(``nonce_key``: ``root_key.py``). Consuming one checks the MAC (else ``unknown_nonce``:
never issued, or issued for another purpose), the expiry (``stale_nonce``), then inserts
it into ``nonces`` as used; the primary key makes the database decide which of two
concurrent consumers wins, whether threads, processes or broker replicas sharing the
root key, and the loser is told ``reused_nonce``. A used nonce's row outlives its expiry
until :meth:`BrokerNonces.purge_expired_nonces`; after that the expiry alone refuses it.

Request nonces (signed requests, ``auth.py``) are inserted already used under purpose
``request`` and value ``SHA-256(app_id ‖ 0 ‖ nonce)``; a second insert of the same value is
a replay. They are normally written in the request's first write transaction
(``BrokerStore.request_scope``), so a request costs no extra transaction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy.orm import Session

from enclaveml.broker._database import StoreCore, as_utc, insert_ignore, table_of
from enclaveml.broker._dbapi import WriteBatch
from enclaveml.broker.models import IssuedNonce, NonceRow
from enclaveml.errors import AttestationError, AuthError

__all__ = ["REQUEST_NONCE_PURPOSE", "BrokerNonces", "ReplayedRequest", "RequestNonce", "nonce_error"]

T = TypeVar("T")
REQUEST_NONCE_PURPOSE = "request"
_PURPOSE_RE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_MAC_LABEL = b"enclaveml broker nonce v1\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReplayedRequest(AuthError):
    """A signed request's nonce was used before: the request is a replay."""

    def __init__(self) -> None:
        super().__init__("request was replayed (nonce already used)", "sign every request with a fresh nonce")


@dataclass
class RequestNonce:
    """A signed request's nonce, until a committed transaction has recorded it.

    ``BrokerStore.request_scope`` keeps one per thread for the store's synchronous methods;
    the HTTP API's coroutines pass theirs to ``BrokerStore.commit_async``.
    """

    value: str
    expires_at: datetime
    recorded: bool = False
    replayed: bool = False


def nonce_error(reason: str, purpose: str) -> AttestationError:
    """The refusal of an attestation nonce (``unknown_nonce``, ``reused_nonce``, ``stale_nonce``)."""
    what = {"unknown_nonce": "was never issued", "reused_nonce": "was already used", "stale_nonce": "expired"}
    return AttestationError(reason, f"the {purpose} nonce {what[reason]}", "ask the broker for a fresh nonce")


def _request_nonce_value(app_id: str, nonce: str) -> str:
    return hashlib.sha256(app_id.encode() + b"\x00" + nonce.encode()).hexdigest()


def _expiry(expires: datetime | int) -> datetime:
    return datetime.fromtimestamp(expires, UTC) if isinstance(expires, int) else as_utc(expires)


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(microseconds=1)


def _after_request_nonce(pending: RequestNonce, job: Callable[[WriteBatch], T]) -> Callable[[WriteBatch], T]:
    """``job``, after recording the request's nonce in the same transaction (a conflict: ``ReplayedRequest``)."""

    def recorded_first(batch: WriteBatch) -> T:
        if not batch.insert_nonce(REQUEST_NONCE_PURPOSE, pending.value, pending.expires_at):
            raise ReplayedRequest
        return job(batch)

    return recorded_first


class BrokerNonces(StoreCore):
    """Mixed into ``BrokerStore``."""

    # -- nonces -------------------------------------------------------------------------

    def _nonce_mac(self, purpose: str, body: bytes) -> bytes:
        return self._root.nonce_mac(_MAC_LABEL + purpose.encode() + b"\x00" + body)[:16]

    def issue_nonce(self, purpose: str, ttl: timedelta, *, now: datetime | None = None) -> IssuedNonce:
        """A fresh single-use nonce valid for ``ttl`` (module docstring); writes nothing."""
        if not _PURPOSE_RE.fullmatch(purpose) or purpose == REQUEST_NONCE_PURPOSE:
            raise ValueError(f"invalid nonce purpose {purpose!r}")
        if ttl <= timedelta(0):
            raise ValueError("nonce ttl must be positive")
        expires_at = as_utc(now) + ttl
        body = struct.pack(">Q", _micros(expires_at)) + os.urandom(8)
        value = base64.urlsafe_b64encode(body + self._nonce_mac(purpose, body)).decode().rstrip("=")
        return IssuedNonce(value, purpose, expires_at)

    def _nonce_expiry(self, value: str, purpose: str) -> datetime | None:
        """When a nonce we issued for ``purpose`` expires; None for anything else."""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) != 32 or not hmac.compare_digest(raw[16:], self._nonce_mac(purpose, raw[:16])):
            return None
        return _EPOCH + timedelta(microseconds=struct.unpack(">Q", raw[:8])[0])

    def _nonce_refusal(self, value: str, purpose: str, ts: datetime) -> tuple[str | None, datetime | None]:
        """``(reason or None, expiry)`` for a nonce before it is used: ``unknown_nonce`` or ``stale_nonce``."""
        expires_at = self._nonce_expiry(value, purpose) if purpose != REQUEST_NONCE_PURPOSE else None
        if expires_at is None:
            return "unknown_nonce", None
        return ("stale_nonce" if expires_at <= ts else None), expires_at

    def _burn_nonce(self, batch: WriteBatch, nonce: IssuedNonce) -> bool:
        """Mark ``nonce`` used in ``batch``'s transaction; False if it already was."""
        return batch.insert_nonce(nonce.purpose, nonce.value, nonce.expires_at)

    def _nonce_refused(
        self, batch: WriteBatch, reason: str, purpose: str, actor: str, ts: datetime
    ) -> AttestationError:
        """Audit ``nonce.refused`` in ``batch``; the error to raise once it commits."""
        batch.append_audit("nonce.refused", actor, purpose, ts, reason=reason)
        return nonce_error(reason, purpose)

    def check_nonce_unaudited(
        self, value: str, purpose: str, now: datetime | None = None
    ) -> tuple[IssuedNonce | None, str | None]:
        """``check_nonce`` without writing: ``(nonce, None)``, or ``(None, reason)`` for the caller to audit
        (``record_refusal("nonce", subject=purpose, reason=...)`` is the entry ``check_nonce`` writes)."""
        reason, expires_at = self._nonce_refusal(value, purpose, as_utc(now))
        if reason is None and expires_at is not None:
            return IssuedNonce(value, purpose, expires_at), None
        return None, reason or "unknown_nonce"

    def check_nonce(
        self, value: str, purpose: str, now: datetime | None = None, *, actor: str = "anonymous"
    ) -> IssuedNonce:
        """A nonce this broker issued for ``purpose``, unexpired (not yet marked used); else ``AttestationError``.

        Writes only to audit a refusal. The caller marks the nonce used in the transaction that
        records the attempt's outcome (``release_key_material(nonce=...)``,
        ``record_refusal(nonce=...)``), so the outcome and the nonce commit together.
        """
        ts = as_utc(now)
        nonce, reason = self.check_nonce_unaudited(value, purpose, ts)
        if nonce is not None:
            return nonce
        raise self._commit(lambda batch: self._nonce_refused(batch, reason or "unknown_nonce", purpose, actor, ts))

    def consume_nonce(self, value: str, purpose: str, now: datetime | None = None, *, actor: str = "anonymous") -> None:
        """Use a nonce once, atomically across threads and processes; else ``AttestationError``.

        ``reason``: ``unknown_nonce``, ``stale_nonce`` (expired) or ``reused_nonce``.
        """
        ts = as_utc(now)
        reason, expires_at = self._nonce_refusal(value, purpose, ts)

        def use(batch: WriteBatch) -> AttestationError | None:
            if reason is None and expires_at is not None:
                if self._burn_nonce(batch, IssuedNonce(value, purpose, expires_at)):
                    return None
                return self._nonce_refused(batch, "reused_nonce", purpose, actor, ts)
            return self._nonce_refused(batch, reason or "unknown_nonce", purpose, actor, ts)

        error = self._commit(use)
        if error is not None:
            raise error

    def remember_request_nonce(self, app_id: str, nonce: str, expires: datetime | int) -> bool:
        """Record a signed request's nonce; False if this app used it before (a replay).

        ``expires`` (a datetime or seconds since the epoch) must outlast the signature's clock
        window: expired rows may be purged, and after that only the window refuses a replay.
        """
        value, expires_at = _request_nonce_value(app_id, nonce), _expiry(expires)
        return self._commit(lambda batch: batch.insert_nonce(REQUEST_NONCE_PURPOSE, value, expires_at))

    def _insert_request_nonce(self, session: Session, value: str, expires_at: datetime) -> bool:
        """The request nonce in a SQLAlchemy write transaction (``BrokerStore._write``)."""
        row = {"purpose": REQUEST_NONCE_PURPOSE, "value": value, "expires_at": expires_at, "used": True}
        return insert_ignore(session, NonceRow, **row)

    @contextmanager
    def request_scope(self, app_id: str, nonce: str, expires: datetime | int) -> Iterator[None]:
        """Run one signed request (in this thread); its nonce is recorded once, or ``ReplayedRequest``.

        The nonce rides in the request's first write transaction (``BrokerStore._commit`` or
        ``BrokerStore._write``), so a replay is refused before it changes anything.
        A request that commits no write (reads only, or its writes rolled back) records the
        nonce in its own transaction when the scope ends; a replayed read-only request is
        thus refused after the reads, before its answer is sent.
        """
        pending = self.request_nonce(app_id, nonce, expires)
        self._request_local.pending = pending
        try:
            yield
        finally:
            self._request_local.pending = None
            if not pending.recorded and not pending.replayed:
                value, expires_at = pending.value, pending.expires_at
                if not self._commit(lambda batch: batch.insert_nonce(REQUEST_NONCE_PURPOSE, value, expires_at)):
                    raise ReplayedRequest

    def request_nonce(self, app_id: str, nonce: str, expires: datetime | int) -> RequestNonce:
        """A signed request's nonce, to record with the request's first write (``commit_async``)."""
        return RequestNonce(_request_nonce_value(app_id, nonce), _expiry(expires))

    def _commit(self, job: Callable[[WriteBatch], T]) -> T:
        """``job``'s result once the group commit's transaction that ran it committed.

        The current signed request's nonce (``request_scope``), if pending, goes in first, in the same job.
        """
        if getattr(self._request_local, "writing", False):  # its lock is ours: the writer would wait forever
            raise RuntimeError("the group commit cannot be used inside a SQLAlchemy write transaction")
        pending = self._pending_request_nonce()
        if pending is None:
            return self._group.run(job)
        try:
            result = self._group.run(_after_request_nonce(pending, job))
        except ReplayedRequest:
            pending.replayed = True
            raise
        pending.recorded = True
        return result

    async def commit_async(self, job: Callable[[WriteBatch], T], request_nonce: RequestNonce | None = None) -> T:
        """``_commit`` for coroutines on an event loop: awaits the group commit, blocks nothing.

        ``request_nonce`` (``request_nonce()``), unless already recorded, goes in first, in the
        same job; a replay raises ``ReplayedRequest`` and ``job`` does not run.
        """
        if request_nonce is None or request_nonce.recorded:
            return await self._group.run_async(job)
        try:
            result = await self._group.run_async(_after_request_nonce(request_nonce, job))
        except ReplayedRequest:
            request_nonce.replayed = True
            raise
        request_nonce.recorded = True
        return result

    def _pending_request_nonce(self) -> RequestNonce | None:
        """The current request's nonce if no committed transaction has recorded it yet.

        ``BrokerStore._commit`` and ``BrokerStore._write`` insert it first thing (a conflict is
        a replay: mark ``replayed``, raise ``ReplayedRequest``) and mark it ``recorded``
        after the commit.
        """
        pending: RequestNonce | None = getattr(self._request_local, "pending", None)
        return pending if pending is not None and not pending.recorded else None

    def purge_expired_nonces(self, now: datetime | None = None) -> int:
        """Delete nonces that expired before ``now``; returns how many."""
        nonces = table_of(NonceRow)
        with self._write() as session:
            return session.connection().execute(nonces.delete().where(nonces.c.expires_at < as_utc(now))).rowcount
