"""The KMS half of :class:`~enclaveml.broker.store.BrokerStore`: primary keys and data-key wraps.

Same semantics as the local KMS (``kms/local.py``), server-side: key ids ``k-`` + 16 hex,
versions 1, 2, ...; the newest enabled version wraps; wrapped data keys use the local
KMS's format (``crypto/_keywrap.py``) under kms name ``broker``. Each version's 32 bytes
are sealed by the root key for the row ``("key_versions", key_id, version)``.
"""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError as DatabaseIntegrityError
from sqlalchemy.orm import Session

from enclaveml.broker._database import StoreCore, as_utc
from enclaveml.broker.models import KeyRow, KeyVersionRow
from enclaveml.crypto._keywrap import unwrap_key, wrap_key
from enclaveml.crypto.gramine_pf import derive_wrap_key
from enclaveml.errors import ConfigError, KeyNotFound
from enclaveml.kms._protocol import KeyInfo, KeyVersionInfo, WrappedKey

__all__ = ["BrokerKms"]

_KMS = "broker"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the local KMS's rule
_KEY_ID_RE = re.compile(r"k-[0-9a-f]{16}")


def _info(key: KeyRow) -> KeyInfo:
    versions = tuple(KeyVersionInfo(v.version, v.created, v.state) for v in key.versions)
    primary = max(v.version for v in key.versions if v.state == "enabled")
    return KeyInfo(_KMS, key.key_id, key.name, key.created, primary, versions)


class BrokerKms(StoreCore):
    """Mixed into ``BrokerStore``, which provides the root key, sessions and the audit append."""

    def _new_version(self, key_id: str, version: int, created: datetime) -> KeyVersionRow:
        sealed = self._root.seal(os.urandom(32), table="key_versions", row_id=key_id, version=version)
        return KeyVersionRow(key_id=key_id, version=version, created=created, state="enabled", sealed_material=sealed)

    def _material(self, version: KeyVersionRow) -> bytes:
        return self._open_version(version.key_id, version.version, version.sealed_material)

    def _open_version(self, key_id: str, version: int, sealed: bytes | None) -> bytes:
        if sealed is None:
            raise KeyNotFound(f"key {key_id} version {version} was destroyed")
        return self._root.open(sealed, table="key_versions", row_id=key_id, version=version)

    def _find_key_or_none(self, session: Session, name_or_id: str, *, for_update: bool = False) -> KeyRow | None:
        query = select(KeyRow).where(or_(KeyRow.key_id == name_or_id, KeyRow.name == name_or_id))
        return session.scalar(query.with_for_update() if for_update else query)

    def _find_key(self, session: Session, name_or_id: str, *, for_update: bool = False) -> KeyRow:
        key = self._find_key_or_none(session, name_or_id, for_update=for_update)
        if key is None:
            raise KeyNotFound(f"no key {name_or_id!r} in broker store {self._url}")
        return key

    def create_key(self, name: str, *, actor: str = "system", now: datetime | None = None) -> KeyInfo:
        if not _NAME_RE.fullmatch(name) or _KEY_ID_RE.fullmatch(name):
            raise ConfigError(
                f"invalid key name {name!r}",
                "use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit "
                "(and not shaped like a key id k-<16 hex>)",
            )
        ts, key_id = as_utc(now), "k-" + secrets.token_hex(8)
        exists = ConfigError(f"key {name} already exists", f"use `enclaveml kms rotate {name}` for a new version")
        try:
            with self._write() as session:
                if session.scalar(select(KeyRow.key_id).where(KeyRow.name == name)) is not None:
                    raise exists
                key = KeyRow(key_id=key_id, name=name, created=ts)
                key.versions.append(self._new_version(key_id, 1, ts))
                session.add(key)
                self._audit(session, "key.created", actor, key_id, ts, name=name, version=1)
                return _info(key)
        except DatabaseIntegrityError:
            raise exists from None

    def rotate_key(self, name_or_id: str, *, actor: str = "system", now: datetime | None = None) -> KeyInfo:
        ts = as_utc(now)
        with self._write() as session:
            key = self._find_key(session, name_or_id, for_update=True)
            version = max(v.version for v in key.versions) + 1
            key.versions.append(self._new_version(key.key_id, version, ts))
            self._audit(session, "key.rotated", actor, key.key_id, ts, name=key.name, version=version)
            return _info(key)

    def gramine_pf_key(
        self, name_or_id: str, version: int | None = None, *, actor: str = "system", now: datetime | None = None
    ) -> bytes:
        """The 16-byte Gramine wrap key derived from a version of the key (default: primary); audited.

        ``crypto.gramine_pf.derive_wrap_key``: what secret provisioning sends an attested
        enclave for this key, handed to the key's owner to encrypt protected files.
        """
        ts = as_utc(now)
        with self._write() as session:
            key = self._find_key(session, name_or_id)
            enabled = [v for v in key.versions if v.state == "enabled"]
            chosen = (
                max(enabled, key=lambda v: v.version)
                if version is None
                else next((v for v in enabled if v.version == version), None)
            )
            if chosen is None:
                raise KeyNotFound(f"key {key.name} has no enabled version {version}")
            derived = derive_wrap_key(self._material(chosen), key.key_id, chosen.version)
            self._audit(session, "key.gramine_pf_key", actor, key.key_id, ts, name=key.name, version=chosen.version)
        return derived

    def list_keys(self) -> list[KeyInfo]:
        with self._read() as session:
            return [_info(key) for key in session.scalars(select(KeyRow).order_by(KeyRow.created, KeyRow.key_id))]

    def describe_key(self, name_or_id: str) -> KeyInfo:
        with self._read() as session:
            return _info(self._find_key(session, name_or_id))

    def wrap_data_key(self, name_or_id: str, data_key: bytes, associated_data: bytes) -> WrappedKey:
        """Wrap ``data_key`` with the key's primary version (the local KMS's wrap format)."""
        with self._read() as session:
            key = self._find_key(session, name_or_id)
            primary = max((v for v in key.versions if v.state == "enabled"), key=lambda v: v.version)
            kek, key_id, version = self._material(primary), key.key_id, primary.version
        return WrappedKey(_KMS, key_id, version, wrap_key(kek, key_id, version, data_key, associated_data))

    def unwrap_data_key(self, wrapped: WrappedKey, associated_data: bytes) -> bytes:
        if wrapped.kms != _KMS:
            raise KeyNotFound(
                f"the data key is held by the {wrapped.kms!r} KMS, not the key broker",
                f"use the {wrapped.kms!r} key management backend to decrypt this file",
            )
        with self._read() as session:
            row = session.get(KeyVersionRow, (wrapped.key_id, wrapped.key_version))
            if row is None:
                raise KeyNotFound(f"key {wrapped.key_id} has no version {wrapped.key_version} in the broker")
            kek = self._material(row)
        return unwrap_key(kek, wrapped.key_id, wrapped.key_version, wrapped.ciphertext, associated_data)
