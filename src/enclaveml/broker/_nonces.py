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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from enclaveml.broker._database import StoreCore, as_utc, insert_ignore, table_of
from enclaveml.broker.models import IssuedNonce, NonceRow
from enclaveml.errors import AttestationError, AuthError

__all__ = ["REQUEST_NONCE_PURPOSE", "BrokerNonces", "ReplayedRequest"]

REQUEST_NONCE_PURPOSE = "request"
_PURPOSE_RE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_MAC_LABEL = b"enclaveml broker nonce v1\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReplayedRequest(AuthError):
    """A signed request's nonce was used before: the request is a replay."""

    def __init__(self) -> None:
        super().__init__("request was replayed (nonce already used)", "sign every request with a fresh nonce")


@dataclass
class _PendingNonce:
    """The current request's nonce, until a committed transaction has recorded it."""

    value: str
    expires_at: datetime
    recorded: bool = False
    replayed: bool = False


def _request_nonce_value(app_id: str, nonce: str) -> str:
    return hashlib.sha256(app_id.encode() + b"\x00" + nonce.encode()).hexdigest()


def _expiry(expires: datetime | int) -> datetime:
    return datetime.fromtimestamp(expires, UTC) if isinstance(expires, int) else as_utc(expires)


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(microseconds=1)


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

    def _burn_nonce(self, session: Session, nonce: IssuedNonce) -> bool:
        """Mark ``nonce`` used in ``session``'s transaction; False if it already was."""
        row = {"purpose": nonce.purpose, "value": nonce.value, "expires_at": nonce.expires_at, "used": True}
        return insert_ignore(session, NonceRow, **row)

    def _nonce_refused(self, session: Session, reason: str, purpose: str, actor: str, ts: datetime) -> AttestationError:
        """Audit ``nonce.refused`` in ``session``; the error to raise once it commits."""
        self._audit(session, "nonce.refused", actor, purpose, ts, reason=reason)
        what = {"unknown_nonce": "was never issued", "reused_nonce": "was already used", "stale_nonce": "expired"}
        return AttestationError(reason, f"the {purpose} nonce {what[reason]}", "ask the broker for a fresh nonce")

    def check_nonce(
        self, value: str, purpose: str, now: datetime | None = None, *, actor: str = "anonymous"
    ) -> IssuedNonce:
        """A nonce this broker issued for ``purpose``, unexpired (not yet marked used); else ``AttestationError``.

        Writes only to audit a refusal. The caller marks the nonce used in the transaction that
        records the attempt's outcome (``release_key_material(nonce=...)``,
        ``record_refusal(nonce=...)``), so the outcome and the nonce commit together.
        """
        ts = as_utc(now)
        reason, expires_at = self._nonce_refusal(value, purpose, ts)
        if reason is None and expires_at is not None:
            return IssuedNonce(value, purpose, expires_at)
        with self._write() as session:
            error = self._nonce_refused(session, reason or "unknown_nonce", purpose, actor, ts)
        raise error

    def consume_nonce(self, value: str, purpose: str, now: datetime | None = None, *, actor: str = "anonymous") -> None:
        """Use a nonce once, atomically across threads and processes; else ``AttestationError``.

        ``reason``: ``unknown_nonce``, ``stale_nonce`` (expired) or ``reused_nonce``.
        """
        ts = as_utc(now)
        reason, expires_at = self._nonce_refusal(value, purpose, ts)
        with self._write() as session:
            if reason is None and expires_at is not None:
                if self._burn_nonce(session, IssuedNonce(value, purpose, expires_at)):
                    return
                reason = "reused_nonce"
            error = self._nonce_refused(session, reason or "unknown_nonce", purpose, actor, ts)
        raise error

    def remember_request_nonce(self, app_id: str, nonce: str, expires: datetime | int) -> bool:
        """Record a signed request's nonce; False if this app used it before (a replay).

        ``expires`` (a datetime or seconds since the epoch) must outlast the signature's clock
        window: expired rows may be purged, and after that only the window refuses a replay.
        """
        with self._write() as session:
            return self._insert_request_nonce(session, _request_nonce_value(app_id, nonce), _expiry(expires))

    def _insert_request_nonce(self, session: Session, value: str, expires_at: datetime) -> bool:
        return self._burn_nonce(session, IssuedNonce(value, REQUEST_NONCE_PURPOSE, expires_at))

    @contextmanager
    def request_scope(self, app_id: str, nonce: str, expires: datetime | int) -> Iterator[None]:
        """Run one signed request (in this thread); its nonce is recorded once, or ``ReplayedRequest``.

        The nonce rides in the request's first write transaction (``BrokerStore._write``),
        so a replay is refused before it changes anything.
        A request that commits no write (reads only, or its writes rolled back) records the
        nonce in its own transaction when the scope ends; a replayed read-only request is
        thus refused after the reads, before its answer is sent.
        """
        pending = _PendingNonce(_request_nonce_value(app_id, nonce), _expiry(expires))
        self._request_local.pending = pending
        try:
            yield
        finally:
            self._request_local.pending = None
            if not pending.recorded and not pending.replayed:
                with self._write() as session:
                    if not self._insert_request_nonce(session, pending.value, pending.expires_at):
                        raise ReplayedRequest

    def _pending_request_nonce(self) -> _PendingNonce | None:
        """The current request's nonce if no committed transaction has recorded it yet.

        ``BrokerStore._write`` inserts it first thing (``_insert_request_nonce``; a conflict is
        a replay: mark ``replayed``, raise ``ReplayedRequest``) and marks it ``recorded``
        after the commit.
        """
        pending: _PendingNonce | None = getattr(self._request_local, "pending", None)
        return pending if pending is not None and not pending.recorded else None

    def purge_expired_nonces(self, now: datetime | None = None) -> int:
        """Delete nonces that expired before ``now``; returns how many."""
        nonces = table_of(NonceRow)
        with self._write() as session:
            return session.connection().execute(nonces.delete().where(nonces.c.expires_at < as_utc(now))).rowcount
