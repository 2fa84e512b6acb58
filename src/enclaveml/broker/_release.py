"""The key-release half of :class:`~enclaveml.broker.store.BrokerStore`: one release, one transaction.

``release_key_material(policy_id, key, nonce=...)`` runs as a job of the group commit
(``release_job``; ``_group_commit.py``): in one transaction it marks the attestation nonce
used (used before: ``reused_nonce``, audited, nothing released), re-reads the policy — ``FOR
SHARE`` on PostgreSQL, so a concurrent revocation commits wholly before or after it — the key
and the binding between them, unseals every enabled version and appends ``key.released``;
or, if the policy was revoked or does not cover the key, appends ``release.refused`` and
releases nothing. The caller has already verified the workload's evidence against the
policy. The statements run on the driver's cursor (``_dbapi.py``): this is the broker's hot
path (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

from enclaveml.broker._database import as_utc
from enclaveml.broker._dbapi import WriteBatch
from enclaveml.broker._nonces import BrokerNonces
from enclaveml.broker.models import IssuedNonce
from enclaveml.errors import EnclaveMLError, PolicyError
from enclaveml.runtime.session import ReleasedKey

__all__ = ["BrokerRelease", "ReleaseRefused"]


class _PolicyState(NamedTuple):
    name: str
    revoked: bool


class _KeyRef(NamedTuple):
    key_id: str
    name: str


class ReleaseRefused(PolicyError):
    """A key release was refused; ``reason`` is a stable code (``unknown_policy``,
    ``policy_revoked``, ``unknown_key``, ``key_not_bound``)."""

    def __init__(self, reason: str, what: str) -> None:
        super().__init__(what, "register a policy that covers this key, or use the policy that does")
        self.reason = reason


def _release_refusal(
    policy_id: str, policy: _PolicyState | None, key_name: str, key: _KeyRef | None, bound: bool
) -> ReleaseRefused | None:
    if policy is None:
        return ReleaseRefused("unknown_policy", f"no policy {policy_id!r}")
    if policy.revoked:
        return ReleaseRefused("policy_revoked", f"policy {policy.name} ({policy_id}) was revoked")
    if key is None:
        return ReleaseRefused("unknown_key", f"no key {key_name!r}")
    if not bound:
        return ReleaseRefused("key_not_bound", f"policy {policy.name} may not receive key {key.name}")
    return None


class BrokerRelease(BrokerNonces):
    """Mixed into ``BrokerStore`` (with ``BrokerKms``, which unseals versions)."""

    def release_key_material(
        self,
        policy_id: str,
        key_name: str,
        *,
        actor: str = "anonymous",
        now: datetime | None = None,
        nonce: IssuedNonce | None = None,
    ) -> list[ReleasedKey]:
        """Every enabled version of the key, if the (unrevoked) policy covers it; else ``ReleaseRefused``.

        The caller has already verified the workload's evidence against this policy. ``nonce``
        (from ``check_nonce``) is marked used in the same transaction; if it already was, the
        release is refused (``AttestationError`` ``reused_nonce``) and nothing is released.
        """
        released, error = self._commit(self.release_job(policy_id, key_name, actor=actor, now=now, nonce=nonce))
        if error is not None:
            raise error
        return released

    def release_job(
        self,
        policy_id: str,
        key_name: str,
        *,
        actor: str = "anonymous",
        now: datetime | None = None,
        nonce: IssuedNonce | None = None,
    ) -> Callable[[WriteBatch], tuple[list[ReleasedKey], EnclaveMLError | None]]:
        """``release_key_material`` as a job for ``commit_async``: ``(keys, None)`` or ``([], the error)``."""
        ts = as_utc(now)

        def release(batch: WriteBatch) -> tuple[list[ReleasedKey], EnclaveMLError | None]:
            if nonce is not None and not self._burn_nonce(batch, nonce):
                return [], self._nonce_refused(batch, "reused_nonce", nonce.purpose, actor, ts)
            return self._release_in(batch, policy_id, key_name, actor, ts)

        return release

    def _release_in(
        self, batch: WriteBatch, policy_id: str, key_name: str, actor: str, ts: datetime
    ) -> tuple[list[ReleasedKey], ReleaseRefused | None]:
        """The release in ``batch``: the keys (audited ``key.released``), or the audited refusal.

        The driver's cursor, not SQLAlchemy: this is the broker's hot path (``_dbapi.py``).
        """
        sql = batch.sql
        # FOR SHARE (PostgreSQL): a concurrent revocation commits either wholly before or after this release.
        found = batch.fetchone(sql.policy, policy_id)
        policy = None if found is None else _PolicyState(found[0], bool(found[1]))
        rows = batch.fetchall(sql.key_versions, policy_id, key_name, key_name)
        key = _KeyRef(rows[0][0], rows[0][1]) if rows else None
        bound = bool(rows[0][2]) if rows else False
        refusal = _release_refusal(policy_id, policy, key_name, key, bound)
        if refusal is not None:
            batch.append_audit("release.refused", actor, key_name, ts, policy_id=policy_id, reason=refusal.reason)
            return [], refusal
        assert key is not None
        released = [
            ReleasedKey(key.name, key.key_id, version, self._open_version(key.key_id, version, bytes(sealed)))
            for key_id, _name, _bound, version, sealed in rows
            if key_id == key.key_id and version is not None
        ]
        numbers = [k.version for k in released]
        batch.append_audit("key.released", actor, key.key_id, ts, policy_id=policy_id, versions=numbers)
        return released, None
