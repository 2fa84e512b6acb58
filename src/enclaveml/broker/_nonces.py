"""The nonce half of :class:`~enclaveml.broker.store.BrokerStore`: single use, across processes.

Attestation nonces are issued (``used`` false) and consumed once by a conditional
``UPDATE nonces SET used = true WHERE purpose = ? AND value = ? AND used = false AND
expires_at > now``: the database decides which of two concurrent consumers wins, whether
they are threads, processes or broker replicas; the loser sees ``rowcount`` 0. Request
nonces (signed requests, ``auth.py``) are inserted already used under purpose ``request``
and value ``SHA-256(app_id ‖ 0 ‖ nonce)``; a second insert of the same value is a replay.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from enclaveml.broker._database import StoreCore, as_utc, insert_ignore, table_of
from enclaveml.broker.models import IssuedNonce, NonceRow
from enclaveml.errors import AttestationError

__all__ = ["REQUEST_NONCE_PURPOSE", "BrokerNonces"]

REQUEST_NONCE_PURPOSE = "request"
_PURPOSE_RE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")


class BrokerNonces(StoreCore):
    """Mixed into ``BrokerStore``."""

    # -- nonces -------------------------------------------------------------------------

    def issue_nonce(self, purpose: str, ttl: timedelta, *, now: datetime | None = None) -> IssuedNonce:
        """A fresh single-use nonce (32 random bytes, base64url) valid for ``ttl``."""
        if not _PURPOSE_RE.fullmatch(purpose) or purpose == REQUEST_NONCE_PURPOSE:
            raise ValueError(f"invalid nonce purpose {purpose!r}")
        if ttl <= timedelta(0):
            raise ValueError("nonce ttl must be positive")
        nonce = IssuedNonce(secrets.token_urlsafe(32), purpose, as_utc(now) + ttl)
        with self._write() as session:
            session.add(NonceRow(purpose=purpose, value=nonce.value, expires_at=nonce.expires_at, used=False))
        return nonce

    def consume_nonce(self, value: str, purpose: str, now: datetime | None = None, *, actor: str = "anonymous") -> None:
        """Use a nonce once, atomically across threads and processes; else ``AttestationError``.

        ``reason``: ``unknown_nonce``, ``stale_nonce`` (expired) or ``reused_nonce``.
        """
        ts = as_utc(now)
        nonces = table_of(NonceRow)
        claim = (
            update(nonces)
            .where(nonces.c.purpose == purpose, nonces.c.value == value)
            .where(nonces.c.used.is_(False), nonces.c.expires_at > ts)
            .values(used=True)
        )
        with self._write() as session:
            if session.connection().execute(claim).rowcount == 1:
                return
            row = session.get(NonceRow, (purpose, value))
            reason = "unknown_nonce" if row is None else "reused_nonce" if row.used else "stale_nonce"
            self._audit(session, "nonce.refused", actor, purpose, ts, reason=reason)
        what = {"unknown_nonce": "was never issued", "reused_nonce": "was already used", "stale_nonce": "expired"}
        raise AttestationError(reason, f"the {purpose} nonce {what[reason]}", "ask the broker for a fresh nonce")

    def remember_request_nonce(self, app_id: str, nonce: str, expires: datetime | int) -> bool:
        """Record a signed request's nonce; False if this app used it before (a replay).

        ``expires`` (a datetime or seconds since the epoch) must outlast the signature's clock
        window: expired rows may be purged, and after that only the window refuses a replay.
        """
        expires_at = datetime.fromtimestamp(expires, UTC) if isinstance(expires, int) else as_utc(expires)
        value = hashlib.sha256(app_id.encode() + b"\x00" + nonce.encode()).hexdigest()
        with self._write() as session:
            return insert_ignore(
                session, NonceRow, purpose=REQUEST_NONCE_PURPOSE, value=value, expires_at=expires_at, used=True
            )

    def purge_expired_nonces(self, now: datetime | None = None) -> int:
        """Delete nonces that expired before ``now``; returns how many."""
        nonces = table_of(NonceRow)
        with self._write() as session:
            return session.connection().execute(nonces.delete().where(nonces.c.expires_at < as_utc(now))).rowcount
