"""The key broker's persistence: apps, primary keys, policies, nonces and the audit log.

``BrokerStore(url, root_key)`` opens (and migrates) a SQLite or PostgreSQL database
(``_database.py``) and checks the root key against the store's check value. Every method
is one transaction; every enrollment, key creation and rotation, policy change, key
release and refusal appends its audit entry (``audit.py``) *in the same transaction*, so
the log and the state never disagree, even after ``kill -9``.

Two write paths: the owner and admin methods write through SQLAlchemy sessions
(``_write``); the workload's hot path — nonces, key releases, refusals — runs prebuilt
statements on the driver (``_dbapi.py``) in the group commit (``_group_commit.py``,
``_commit``), which commits the writes of concurrent requests in one transaction and
answers none before it committed. Both hold the same locks (SQLite: one in-process lock,
then ``BEGIN IMMEDIATE``; PostgreSQL: the writers' advisory lock).

It implements the :class:`~enclaveml.kms.KeyManagementService` protocol server-side (kms
name ``broker``, wrapped data keys in the local KMS's format, ``crypto/_keywrap.py``).

Refusals: methods that *refuse* (``verify_api_key``, ``consume_nonce``,
``release_key_material``) record the refusal themselves and raise. Methods that return a
verdict (``signing_key_for`` → None, ``remember_request_nonce`` → False) leave the refusal
to the caller, which records it with :meth:`BrokerStore.record_refusal`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError as DatabaseIntegrityError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from enclaveml.attestation.policy import Policy
from enclaveml.broker._cache import ExpiringCache
from enclaveml.broker._database import (
    WRITE_OPTION,
    SqliteWriterLock,
    as_utc,
    create_broker_engine,
    insert_ignore,
    lock_writers,
    redacted_url,
)
from enclaveml.broker._dbapi import WriteBatch, sql_for
from enclaveml.broker._group_commit import GroupCommit
from enclaveml.broker._kms import BrokerKms
from enclaveml.broker._nonces import REQUEST_NONCE_PURPOSE, ReplayedRequest
from enclaveml.broker._release import BrokerRelease, ReleaseRefused
from enclaveml.broker.audit import AuditEntry, append_audit
from enclaveml.broker.auth import derive_signing_key
from enclaveml.broker.migrations import upgrade_to_head
from enclaveml.broker.models import (
    App,
    AppRow,
    AuditRow,
    EnrolledApp,
    IssuedNonce,
    MetaRow,
    PolicyKeyRow,
    PolicyRecord,
    PolicyRow,
    Role,
)
from enclaveml.broker.root_key import RootKey, derive_root_key
from enclaveml.errors import AuthError, ConfigError, KeyServiceError, KeyStoreCorrupted, PolicyError
from enclaveml.kms.local import SCRYPT_DEFAULT, ScryptParams

__all__ = ["APP_CACHE_TTL_S", "REQUEST_NONCE_PURPOSE", "BrokerStore", "ReleaseRefused", "ReplayedRequest"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_POLICY_TEXT = 64 * 1024
_DUMMY_APP = "a-0000000000000000"
APP_CACHE_TTL_S = 5.0
_CACHE_MAX = 4096


@contextmanager
def _reachable(url: str) -> Iterator[None]:
    """Turn "cannot connect / cannot open the file" into one clear ``KeyServiceError``."""
    try:
        yield
    except OperationalError as exc:
        raise KeyServiceError(
            f"cannot open broker store {url}: {str(exc.orig).strip().splitlines()[0]}",
            "check the database URL, that the server is up, and the file's permissions",
        ) from None


def _root_kdf(engine: Engine, kdf: ScryptParams) -> str | None:
    """The store's ``root_kdf`` setting; a store without a root key yet gets one for ``kdf``."""
    with sessionmaker(engine.execution_options(**{WRITE_OPTION: True})).begin() as session:
        if session.get(MetaRow, "root_check") is None:
            fresh = {"name": "scrypt", "log_n": kdf.log_n, "r": kdf.r, "p": kdf.p}
            fresh["salt"] = base64.b64encode(os.urandom(16)).decode()
            insert_ignore(session, MetaRow, name="root_kdf", value=json.dumps(fresh, sort_keys=True))
        row = session.get(MetaRow, "root_kdf")
        return None if row is None else row.value


def _app(row: AppRow) -> App:
    return App(row.app_id, row.name, Role(row.role), row.created, row.disabled)


def _policy(session: Session, row: PolicyRow) -> PolicyRecord:
    keys = session.scalars(select(PolicyKeyRow.key_id).where(PolicyKeyRow.policy_id == row.policy_id))
    return PolicyRecord(row.policy_id, row.name, row.document, row.revoked, row.created, tuple(sorted(keys)))


class BrokerStore(BrokerKms, BrokerRelease):
    """The broker's database (module docstring). ``url``: ``sqlite:///PATH`` or ``postgresql://...``."""

    kms_name = "broker"

    def __init__(self, url: str, root_key: bytes) -> None:
        self._root = RootKey(root_key)
        self._url = redacted_url(url)
        self._engine = create_broker_engine(url)
        self._reads = sessionmaker(self._engine, expire_on_commit=False)
        self._writes = sessionmaker(self._engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False)
        # SQLite has one writer: queue for it here (threads and processes), not in SQLite's
        # busy handler, which sleeps (up to 100 ms a try) instead of waking the next in line.
        self._writer_lock = (
            SqliteWriterLock(str(self._engine.url.database)) if self._engine.dialect.name == "sqlite" else None
        )
        self._write_lock: AbstractContextManager[object] = self._writer_lock or nullcontext()
        self._request_local = threading.local()
        self._group = GroupCommit(
            self._engine.raw_connection,
            sql_for(self._engine.dialect.name),
            self._root,
            self._write_lock,
            db_error=self._engine.dialect.loaded_dbapi.Error,
            url=self._url,
        )
        self._app_cache: ExpiringCache[str, tuple[App | None, bytes | None]] = ExpiringCache(_CACHE_MAX)
        self._policy_cache: ExpiringCache[tuple[str, bool], tuple[PolicyRecord, ...]] = ExpiringCache(_CACHE_MAX)
        # Unknown apps are checked against these, so they cost what a known app costs.
        self._dummy_hash = os.urandom(32)
        self._dummy_sealed = self._root.seal(os.urandom(32), table="apps", row_id=_DUMMY_APP)
        try:
            with _reachable(self._url):
                upgrade_to_head(self._engine)
                self._check_root_key()
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def from_passphrase(cls, url: str, passphrase: str, *, kdf: ScryptParams = SCRYPT_DEFAULT) -> BrokerStore:
        """Open a store whose root key is ``scrypt(passphrase)``; a new store records ``kdf`` and a salt."""
        return cls(url, cls.passphrase_root_key(url, passphrase, kdf=kdf))

    @staticmethod
    def passphrase_root_key(url: str, passphrase: str, *, kdf: ScryptParams = SCRYPT_DEFAULT) -> bytes:
        """The root key ``from_passphrase`` derives (migrating the store and recording ``kdf`` if new),
        for opening the store in several processes with one derivation."""
        engine = create_broker_engine(url)
        try:
            with _reachable(redacted_url(url)):
                upgrade_to_head(engine)
                stored = _root_kdf(engine, kdf)
        finally:
            engine.dispose()
        if stored is None:
            raise ConfigError(f"broker store {redacted_url(url)} uses a root key file, not a passphrase")
        try:
            doc = json.loads(stored)
            params, salt = ScryptParams(doc["log_n"], doc["r"], doc["p"]), base64.b64decode(doc["salt"])
        except (ValueError, TypeError, KeyError):
            raise KeyStoreCorrupted(f"broker store {redacted_url(url)} has a damaged root_kdf setting") from None
        return derive_root_key(passphrase, salt, params)

    def _check_root_key(self) -> None:
        check = self._root.check_value()
        with self._writes.begin() as session:
            insert_ignore(session, MetaRow, name="root_check", value=check)
            stored = session.get_one(MetaRow, "root_check").value
            by_passphrase = session.get(MetaRow, "root_kdf") is not None
        if not hmac.compare_digest(stored, check):
            raise AuthError(
                f"wrong root key for broker store {self._url}",
                "give the passphrase this store was created with"
                if by_passphrase
                else "give the root key file this store was created with",
            )

    # -- plumbing -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL without its password."""
        return self._url

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def root_key(self) -> RootKey:
        """The keys derived from the root key (``audit.verify_audit_chain`` checks seals with it)."""
        return self._root

    def close(self) -> None:
        self._group.close()
        self._engine.dispose()
        if self._writer_lock is not None:
            self._writer_lock.close()

    def __enter__(self) -> BrokerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A SQLAlchemy write transaction; the current signed request's nonce, if pending, goes in first."""
        pending = self._pending_request_nonce()
        self._request_local.writing = True
        try:
            with self._write_lock, self._writes.begin() as session:
                lock_writers(session)
                if pending is not None and not self._insert_request_nonce(session, pending.value, pending.expires_at):
                    pending.replayed = True
                    raise ReplayedRequest
                yield session
        finally:
            self._request_local.writing = False
        if pending is not None:
            pending.recorded = True

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reads.begin() as session:
            yield session

    def _audit(self, session: Session, event: str, actor: str, subject: str, at: datetime, **detail: Any) -> None:
        append_audit(session, self._root, event=event, actor=actor, subject=subject, detail=detail, at=at)

    def record_refusal(
        self,
        action: str,
        *,
        actor: str,
        subject: str,
        reason: str,
        detail: Mapping[str, Any] | None = None,
        now: datetime | None = None,
        nonce: IssuedNonce | None = None,
    ) -> None:
        """Append ``<action>.refused`` to the audit log (``detail``: ids and reasons, never keys).

        ``nonce`` (from ``check_nonce``): the attempt's nonce, marked used in the same transaction.
        """
        self._commit(
            self.refusal_job(action, actor=actor, subject=subject, reason=reason, detail=detail, now=now, nonce=nonce)
        )

    def refusal_job(
        self,
        action: str,
        *,
        actor: str,
        subject: str,
        reason: str,
        detail: Mapping[str, Any] | None = None,
        now: datetime | None = None,
        nonce: IssuedNonce | None = None,
    ) -> Callable[[WriteBatch], None]:
        """``record_refusal`` as a job for ``commit_async``."""
        ts, extra = as_utc(now), dict(detail or {})

        def refuse(batch: WriteBatch) -> None:
            if nonce is not None:
                self._burn_nonce(batch, nonce)  # already used: the refusal stands either way
            batch.append_audit(f"{action}.refused", actor, subject, ts, reason=reason, **extra)

        return refuse

    def iter_audit(self, *, after_seq: int | None = None) -> Iterator[AuditEntry]:
        """Audit entries in ``seq`` order (all of them, or those after ``after_seq``), streamed."""
        with self._read() as session:
            query = select(AuditRow).order_by(AuditRow.seq)
            if after_seq is not None:
                query = query.where(AuditRow.seq > after_seq)
            for row in session.scalars(query.execution_options(yield_per=500)):
                yield AuditEntry.from_row(row)

    # -- apps ---------------------------------------------------------------------------

    def enroll_app(
        self, name: str, role: Role | str, *, actor: str = "system", now: datetime | None = None
    ) -> EnrolledApp:
        """A new app with a fresh 32-byte api key (returned once, stored only as a keyed hash)."""
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"invalid app name {name!r}", "use 1-64 characters from A-Z a-z 0-9 . _ -")
        try:
            role = Role(role)
        except ValueError:
            raise ConfigError(f"unknown role {role!r}", "use admin, owner or workload") from None
        ts, app_id, api_key = as_utc(now), "a-" + secrets.token_hex(8), secrets.token_bytes(32)
        sealed = self._root.seal(derive_signing_key(api_key), table="apps", row_id=app_id)
        row = AppRow(
            app_id=app_id,
            name=name,
            role=role.value,
            api_key_hash=self._root.api_key_hash(app_id, api_key),
            sealed_signing_key=sealed,
            created=ts,
            disabled=False,
        )
        try:
            with self._write() as session:
                if session.scalar(select(AppRow.app_id).where(AppRow.name == name)) is not None:
                    raise ConfigError(f"app {name} is already enrolled", "choose another name")
                session.add(row)
                self._audit(session, "app.enrolled", actor, app_id, ts, name=name, role=role.value)
        except DatabaseIntegrityError:
            raise ConfigError(f"app {name} is already enrolled", "choose another name") from None
        self._app_cache.invalidate(app_id)
        return EnrolledApp(_app(row), api_key)

    def disable_app(self, app_id: str, *, actor: str = "system", now: datetime | None = None) -> App:
        ts = as_utc(now)
        with self._write() as session:
            row = session.get(AppRow, app_id)
            if row is None:
                raise ConfigError(f"no app {app_id!r}", "`enclaveml broker apps` lists the enrolled apps")
            row.disabled = True
            self._audit(session, "app.disabled", actor, app_id, ts, name=row.name)
            app = _app(row)
        self._app_cache.invalidate(app_id)  # after the commit; voids reads that began before it
        return app

    def list_apps(self) -> list[App]:
        with self._read() as session:
            return [_app(row) for row in session.scalars(select(AppRow).order_by(AppRow.created, AppRow.app_id))]

    def find_app(self, app_id: str) -> App | None:
        return self._cached_app(app_id)[0]

    def app_is_cached(self, app_id: str) -> bool:
        """Whether ``find_app`` / ``signing_key_for`` would answer ``app_id`` without the database."""
        return self._app_cache.get(app_id) is not None

    def _cached_app(self, app_id: str) -> tuple[App | None, bytes | None]:
        """``(app, signing key)`` (key None when unknown or disabled), cached ``APP_CACHE_TTL_S``.

        Every request looks its caller up twice; the cache spares the database. This store's
        own ``disable_app`` takes effect at once; a disable by another broker process sharing
        the database within ``APP_CACHE_TTL_S``. Unknown app ids are cached too (bounded),
        so they cost what a known app costs.
        """
        cached = self._app_cache.get(app_id)
        if cached is not None:
            return cached
        generation = self._app_cache.generation
        with self._read() as session:
            row = session.get(AppRow, app_id)
            sealed, row_id = (row.sealed_signing_key, app_id) if row is not None else (self._dummy_sealed, _DUMMY_APP)
            key = self._root.open(sealed, table="apps", row_id=row_id)
            app = None if row is None else _app(row)
        key_or_none = key if app is not None and not app.disabled else None
        self._app_cache.put(app_id, (app, key_or_none), APP_CACHE_TTL_S, generation)
        return app, key_or_none

    def hash_api_key(self, app_id: str, api_key: bytes) -> bytes:
        """The keyed hash stored for ``api_key`` (``root_key.py``); compare with ``hmac.compare_digest``."""
        return self._root.api_key_hash(app_id, api_key)

    def api_key_hash_for(self, app_id: str) -> bytes | None:
        """The stored api key hash of ``app_id``, or None (unknown or disabled app)."""
        with self._read() as session:
            row = session.get(AppRow, app_id)
            return None if row is None or row.disabled else row.api_key_hash

    def verify_api_key(self, app_id: str, api_key: bytes, *, now: datetime | None = None) -> App:
        """The app, or ``AuthError``; an unknown app costs the same query, hash and compare as a wrong key."""
        with self._read() as session:
            row = session.get(AppRow, app_id)
            stored = row.api_key_hash if row is not None else self._dummy_hash
            matches = hmac.compare_digest(self._root.api_key_hash(app_id, api_key), stored)
            app = _app(row) if row is not None else None
        if matches and app is not None and not app.disabled:
            return app
        reason = "app_disabled" if matches and app is not None else "invalid_credentials"
        self.record_refusal("auth", actor=app_id, subject=app_id, reason=reason, now=now)
        if reason == "app_disabled":
            raise AuthError(f"app {app_id} is disabled", "ask a broker admin to enroll a new app")
        raise AuthError("invalid app id or api key", "check the app id and api key shown at enrollment")

    def signing_key_for(self, app_id: str) -> bytes | None:
        """The request-signing key (``auth.py``) of an enabled app, else None, in equal time."""
        return self._cached_app(app_id)[1]

    # -- policies -----------------------------------------------------------------------

    def register_policy(
        self, name: str, toml_text: str, keys: Sequence[str], *, actor: str = "system", now: datetime | None = None
    ) -> PolicyRecord:
        """Store a policy (its TOML text) and the keys it may receive; returns it with its id."""
        if len(toml_text.encode()) > _MAX_POLICY_TEXT:
            raise PolicyError(f"policy {name} is larger than 64 KiB", "trim the policy document")
        Policy.from_text(toml_text)  # refuse what could never be evaluated
        ts, policy_id = as_utc(now), "p-" + secrets.token_hex(8)
        with self._write() as session:
            key_ids = sorted({self._find_key(session, key).key_id for key in keys})
            row = PolicyRow(policy_id=policy_id, name=name, document=toml_text, revoked=False, created=ts)
            session.add(row)
            session.flush()
            session.add_all(PolicyKeyRow(policy_id=policy_id, key_id=key_id) for key_id in key_ids)
            digest = hashlib.sha256(toml_text.encode()).hexdigest()
            self._audit(session, "policy.registered", actor, policy_id, ts, name=name, keys=key_ids, sha256=digest)
            record = _policy(session, row)
        self._policies_changed()
        return record

    def get_policy(self, policy_id: str) -> PolicyRecord:
        with self._read() as session:
            row = session.get(PolicyRow, policy_id)
            if row is None:
                raise PolicyError(f"no policy {policy_id!r}", "`enclaveml policy list` shows the registered policies")
            return _policy(session, row)

    def list_policies(self, *, include_revoked: bool = True) -> list[PolicyRecord]:
        with self._read() as session:
            query = select(PolicyRow).order_by(PolicyRow.created, PolicyRow.policy_id)
            if not include_revoked:
                query = query.where(PolicyRow.revoked.is_(False))
            return [_policy(session, row) for row in session.scalars(query)]

    def revoke_policy(self, policy_id: str, *, actor: str = "system", now: datetime | None = None) -> PolicyRecord:
        """Revoke a policy for good: it releases nothing afterwards."""
        ts = as_utc(now)
        with self._write() as session:
            row = session.get(PolicyRow, policy_id, with_for_update=True)
            if row is None:
                raise PolicyError(f"no policy {policy_id!r}", "`enclaveml policy list` shows the registered policies")
            if not row.revoked:
                row.revoked, row.revoked_at = True, ts
                self._audit(session, "policy.revoked", actor, policy_id, ts, name=row.name)
            record = _policy(session, row)
        self._policies_changed()
        return record

    def policies_for_key(
        self, name_or_id: str, *, include_revoked: bool = False, max_age_s: float = 0.0
    ) -> list[PolicyRecord]:
        """The policies that may receive the key (unrevoked ones unless asked).

        ``max_age_s`` > 0 accepts an answer cached that long (the release route's policy
        lookup). This store's own policy changes clear the cache at once; another broker
        process's become visible within ``max_age_s``. A cached list never releases under a
        revoked policy: ``release_key_material`` re-reads the policy in its transaction.
        """
        wanted = (name_or_id, include_revoked)
        cached = self._policy_cache.get(wanted) if max_age_s > 0 else None
        if cached is not None:
            return list(cached)
        generation = self._policy_cache.generation
        with self._read() as session:
            key_id = self._find_key(session, name_or_id).key_id
            query = select(PolicyRow).join(PolicyKeyRow).where(PolicyKeyRow.key_id == key_id)
            if not include_revoked:
                query = query.where(PolicyRow.revoked.is_(False))
            query = query.order_by(PolicyRow.created, PolicyRow.policy_id)
            found = [_policy(session, row) for row in session.scalars(query)]
        if max_age_s > 0:
            self._policy_cache.put(wanted, tuple(found), max_age_s, generation)
        return found

    def policies_cached(self, name_or_id: str, *, include_revoked: bool = False) -> bool:
        """Whether ``policies_for_key(..., max_age_s > 0)`` would answer without the database."""
        return self._policy_cache.get((name_or_id, include_revoked)) is not None

    def _policies_changed(self) -> None:
        """After a committed policy change: forget cached policy lists."""
        self._policy_cache.invalidate()
