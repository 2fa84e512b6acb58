"""The embedded key management backend: primary keys in one passphrase-sealed file.

Store layout (JSON, mode 0600, directory 0700)::

    {"format": "enclaveml-keystore", "version": 1,
     "kdf": {"name": "scrypt", "log_n": 17, "r": 8, "p": 1, "salt": b64(16 bytes)},
     "check": b64(32 bytes), "nonce": b64(12 bytes), "sealed": b64(AES-256-GCM ciphertext)}

``master = scrypt(passphrase UTF-8, salt, 2**log_n, r, p, 32 bytes)``; HKDF-SHA256 splits it
into ``check_key`` (info ``enclaveml keystore check``) and ``seal_key`` (info ``enclaveml
keystore seal``). ``check = HMAC-SHA256(check_key, "enclaveml keystore v1")``. ``sealed`` is
AES-256-GCM under ``seal_key`` with ``nonce`` and, as associated data, the canonical JSON
(sorted keys, compact separators) of the ``format``, ``version`` and ``kdf`` fields. The
plaintext is ``{"created": iso, "keys": [{"key_id", "name", "created", "versions": [{"version",
"created", "state", "material": b64 | null}]}]}``; destroyed versions have ``material`` null.

Why: scrypt is memory-hard, so each passphrase guess against a stolen store costs ~128 MiB
and a fraction of a second. The ``check`` value lets us tell "wrong passphrase"
(``AuthError``) from "the file was modified" (``KeyStoreCorrupted``) without weakening
anything: the sealed blob already lets an attacker test guesses offline, and the check is
an independent HKDF output that reveals nothing about ``seal_key``. Tampering with the KDF
parameters changes the derived keys, so it surfaces as ``AuthError``; out-of-range KDF
parameters (which could exhaust memory) are rejected as ``KeyStoreCorrupted`` before
deriving anything.

The file on disk is the truth: every operation re-reads it, only the derived keys are
cached. Mutations take an exclusive lock on ``<store>.lock``, re-read the store inside it,
re-seal with a fresh nonce and replace the file atomically and durably.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import filelock
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from enclaveml._atomic import atomic_output
from enclaveml.crypto._keywrap import unwrap_key, wrap_key
from enclaveml.crypto.gramine_pf import derive_wrap_key
from enclaveml.errors import AuthError, ConfigError, KeyNotFound, KeyServiceError, KeyStoreCorrupted
from enclaveml.kms._protocol import KeyInfo, KeyVersionInfo, WrappedKey

__all__ = ["SCRYPT_DEFAULT", "SCRYPT_FAST_FOR_TESTS", "LocalKms", "ScryptParams", "SecretKeyVersion"]

_FORMAT = "enclaveml-keystore"
_VERSION = 1
_CHECK_MESSAGE = b"enclaveml keystore v1"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_ID_RE = re.compile(r"k-[0-9a-f]{16}")
_LOCK_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost parameters: N = 2**log_n, block size r, parallelism p."""

    log_n: int
    r: int
    p: int

    def __post_init__(self) -> None:
        if not 12 <= self.log_n <= 22:
            raise ValueError("scrypt log_n must be between 12 and 22")
        if not (1 <= self.r <= 32 and 1 <= self.p <= 16):
            raise ValueError("scrypt r must be 1..32 and p 1..16")
        if 128 * self.r * 2**self.log_n > 1 << 30:
            raise ValueError("scrypt parameters need more than 1 GiB of memory")


SCRYPT_DEFAULT = ScryptParams(log_n=17, r=8, p=1)
SCRYPT_FAST_FOR_TESTS = ScryptParams(log_n=12, r=8, p=1)


@dataclass(frozen=True)
class SecretKeyVersion:
    """One version of a primary key **with its secret material** (``repr`` never shows the material)."""

    name: str
    key_id: str
    version: int
    material: bytes = field(repr=False)


@dataclass
class _Version:
    version: int
    created: datetime
    state: str
    material: bytes | None


@dataclass
class _Key:
    key_id: str
    name: str
    created: datetime
    versions: list[_Version]

    def primary(self) -> _Version:
        return max((v for v in self.versions if v.state == "enabled"), key=lambda v: v.version)

    def info(self) -> KeyInfo:
        versions = tuple(KeyVersionInfo(v.version, v.created, v.state) for v in self.versions)
        return KeyInfo("local", self.key_id, self.name, self.created, self.primary().version, versions)


@dataclass
class _Store:
    doc: dict[str, Any]  # the outer JSON document as read from disk
    created: datetime
    keys: list[_Key]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise ValueError("not a base64 string")
    raw = base64.b64decode(value, validate=True)
    if size is not None and len(raw) != size:
        raise ValueError("wrong length")
    return raw


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _bound(doc: dict[str, Any]) -> bytes:
    """The sealed blob's associated data: the canonical JSON of format, version and kdf."""
    return _canonical({k: doc[k] for k in ("format", "version", "kdf")})


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return now.astimezone(UTC)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("not an integer")
    return value


def _derive(passphrase: bytes, params: ScryptParams, salt: bytes) -> tuple[bytes, bytes]:
    kdf = Scrypt(salt=salt, length=32, n=2**params.log_n, r=params.r, p=params.p)
    master = kdf.derive(passphrase)

    def split(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)

    return split(b"enclaveml keystore check"), split(b"enclaveml keystore seal")


def _parse_payload(payload: Any) -> tuple[datetime, list[_Key]]:
    def version(v: Any) -> _Version:
        if v["state"] not in ("enabled", "destroyed"):
            raise ValueError("bad state")
        material = _unb64(v["material"], 32) if v["state"] == "enabled" else None
        return _Version(_int(v["version"]), datetime.fromisoformat(v["created"]), v["state"], material)

    def key(k: Any) -> _Key:
        versions = [version(v) for v in k["versions"]]
        key = _Key(str(k["key_id"]), str(k["name"]), datetime.fromisoformat(k["created"]), versions)
        key.primary()  # raises ValueError if no version is enabled
        return key

    return datetime.fromisoformat(payload["created"]), [key(k) for k in payload["keys"]]


def _dump_payload(created: datetime, keys: list[_Key]) -> bytes:
    def version(v: _Version) -> dict[str, Any]:
        m = None if v.material is None else _b64(v.material)
        return {"version": v.version, "created": v.created.isoformat(), "state": v.state, "material": m}

    def key(k: _Key) -> dict[str, Any]:
        versions = [version(v) for v in k.versions]
        return {"key_id": k.key_id, "name": k.name, "created": k.created.isoformat(), "versions": versions}

    return _canonical({"created": created.isoformat(), "keys": [key(k) for k in keys]})


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the store's exclusive lock (``<store>.lock``) for one read-modify-write."""
    lock = filelock.FileLock(str(path) + ".lock", timeout=_LOCK_TIMEOUT_S, mode=0o600)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise KeyServiceError(
            f"timed out waiting for the key store lock {lock.lock_file}",
            "another enclaveml process is changing the key store; retry when it is done",
        ) from None
    try:
        yield
    finally:
        lock.release()


class LocalKms:
    """Primary keys kept in a passphrase-sealed file (see the module docstring)."""

    kms_name = "local"

    def __init__(self, store_path: Path, passphrase: str) -> None:
        self._path = Path(store_path)
        self._passphrase = passphrase.encode("utf-8")
        self._cached: tuple[bytes, bytes, bytes] | None = None  # (canonical kdf, check key, seal key)
        self._load()  # fail early on a missing store, a wrong passphrase or corruption

    @property
    def store_path(self) -> Path:
        return self._path

    @classmethod
    def init(
        cls,
        store_path: Path,
        passphrase: str,
        *,
        kdf: ScryptParams = SCRYPT_DEFAULT,
        now: datetime | None = None,
    ) -> LocalKms:
        """Create a new, empty key store at ``store_path`` and open it."""
        path = Path(store_path)
        if not passphrase:
            raise ConfigError("the key store passphrase must not be empty")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(path):
            if path.exists():
                raise ConfigError(
                    f"key store {path} already exists",
                    "choose another ENCLAVEML_HOME, or delete the existing store if you mean to start over",
                )
            salt = os.urandom(16)
            kdf_doc = {"name": "scrypt", "log_n": kdf.log_n, "r": kdf.r, "p": kdf.p, "salt": _b64(salt)}
            check_key, seal_key = _derive(passphrase.encode("utf-8"), kdf, salt)
            check = _b64(hmac.new(check_key, _CHECK_MESSAGE, hashlib.sha256).digest())
            doc = {"format": _FORMAT, "version": _VERSION, "kdf": kdf_doc, "check": check}
            _write(path, doc, seal_key, _dump_payload(_utc(now), []))
        return cls(path, passphrase)

    def create_key(self, name: str, *, now: datetime | None = None) -> KeyInfo:
        if not _NAME_RE.fullmatch(name) or _KEY_ID_RE.fullmatch(name):
            raise ConfigError(
                f"invalid key name {name!r}",
                "use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit "
                "(and not shaped like a key id k-<16 hex>)",
            )
        ts = _utc(now)
        with _locked(self._path):
            store = self._load()
            if any(k.name == name for k in store.keys):
                raise ConfigError(f"key {name} already exists", f"use `enclaveml kms rotate {name}` for a new version")
            key = _Key("k-" + secrets.token_hex(8), name, ts, [_Version(1, ts, "enabled", os.urandom(32))])
            store.keys.append(key)
            self._save(store)
        return key.info()

    def list_keys(self) -> list[KeyInfo]:
        return [k.info() for k in self._load().keys]

    def describe_key(self, name_or_id: str) -> KeyInfo:
        return self._find(self._load(), name_or_id).info()

    def rotate_key(self, name_or_id: str, *, now: datetime | None = None) -> KeyInfo:
        ts = _utc(now)
        with _locked(self._path):
            store = self._load()
            key = self._find(store, name_or_id)
            next_version = max(v.version for v in key.versions) + 1
            key.versions.append(_Version(next_version, ts, "enabled", os.urandom(32)))
            self._save(store)
        return key.info()

    def wrap_data_key(self, name_or_id: str, data_key: bytes, associated_data: bytes) -> WrappedKey:
        key = self._find(self._load(), name_or_id)
        primary = key.primary()
        assert primary.material is not None
        ciphertext = wrap_key(primary.material, key.key_id, primary.version, data_key, associated_data)
        return WrappedKey("local", key.key_id, primary.version, ciphertext)

    def unwrap_data_key(self, wrapped: WrappedKey, associated_data: bytes) -> bytes:
        if wrapped.kms != self.kms_name:
            raise KeyNotFound(
                f"the data key is held by the {wrapped.kms!r} KMS, not the local key store",
                f"use the {wrapped.kms!r} key management backend to decrypt this file",
            )
        store = self._load()
        key = next((k for k in store.keys if k.key_id == wrapped.key_id), None)
        if key is None:
            raise KeyNotFound(f"key {wrapped.key_id} is not in key store {self._path}")
        version = next((v for v in key.versions if v.version == wrapped.key_version), None)
        if version is None:
            raise KeyNotFound(f"key {key.name} has no version {wrapped.key_version}")
        if version.material is None:
            raise KeyNotFound(f"key {key.name} version {version.version} was destroyed")
        return unwrap_key(version.material, key.key_id, version.version, wrapped.ciphertext, associated_data)

    def destroy_key_version(self, name_or_id: str, version: int) -> KeyInfo:
        """Wipe one version's material for good; data keys it wrapped no longer unwrap."""
        with _locked(self._path):
            store = self._load()
            key = self._find(store, name_or_id)
            target = next((v for v in key.versions if v.version == version), None)
            if target is None:
                raise KeyNotFound(f"key {key.name} has no version {version}")
            if target.state == "enabled":
                if sum(v.state == "enabled" for v in key.versions) == 1:
                    raise ConfigError(
                        f"version {version} is the only enabled version of key {key.name}",
                        f"run `enclaveml kms rotate {key.name}` first, then destroy the old version",
                    )
                target.state, target.material = "destroyed", None
                self._save(store)
        return key.info()

    def export_secret_keys_for_trusted_runtime(self) -> list[SecretKeyVersion]:
        """Every enabled version of every primary key, **with its secret material**.

        Only for handing primary keys (KEKs) to an engine that runs in this process's trust
        domain and cannot call back into Python: the Spark JVM's parquet-mr ``KmsClient``
        (``enclaveml.analytics.spark_keys``). The material must stay in memory: never log,
        print or persist it. Destroyed versions have no material and are not returned. The
        store's seal is verified first, as on every call.
        """
        return [
            SecretKeyVersion(key.name, key.key_id, version.version, version.material)
            for key in self._load().keys
            for version in key.versions
            if version.material is not None
        ]

    def gramine_pf_key(self, name_or_id: str, version: int | None = None) -> bytes:
        """The 16-byte Gramine protected-files wrap key derived from a version of this key (default: primary).

        ``crypto.gramine_pf.derive_wrap_key``: one-way, so handing it out reveals nothing of
        the primary key; secret (it decrypts the protected files): write it only to a 0600 file.
        """
        key = self._find(self._load(), name_or_id)
        chosen = key.primary() if version is None else next((v for v in key.versions if v.version == version), None)
        if chosen is None or chosen.material is None:
            raise KeyNotFound(f"key {key.name} has no enabled version {version}")
        return derive_wrap_key(chosen.material, key.key_id, chosen.version)

    def _find(self, store: _Store, name_or_id: str) -> _Key:
        for key in store.keys:
            if name_or_id in (key.key_id, key.name):
                return key
        raise KeyNotFound(f"no key {name_or_id!r} in key store {self._path}")

    def _load(self) -> _Store:
        corrupted = KeyStoreCorrupted(f"key store {self._path} failed its integrity check")
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"no key store at {self._path}", "run `enclaveml kms init` to create one") from None
        try:
            doc = json.loads(raw)
            if doc["format"] != _FORMAT:
                raise ValueError("not a key store")
            if _int(doc["version"]) != _VERSION:
                raise KeyStoreCorrupted(
                    f"key store {self._path} has unsupported version {doc['version']}",
                    "it was written by another enclaveml version; upgrade enclaveml",
                )
            kdf = doc["kdf"]
            if kdf["name"] != "scrypt":
                raise ValueError("unknown kdf")
            params = ScryptParams(_int(kdf["log_n"]), _int(kdf["r"]), _int(kdf["p"]))
            salt = _unb64(kdf["salt"], 16)
            check = _unb64(doc["check"], 32)
            nonce = _unb64(doc["nonce"], 12)
            sealed = _unb64(doc["sealed"])
            aad = _bound(doc)
        except (ValueError, TypeError, KeyError, RecursionError, binascii.Error):
            raise corrupted from None
        kdf_canonical = _canonical(kdf)
        if self._cached is None or self._cached[0] != kdf_canonical:
            self._cached = (kdf_canonical, *_derive(self._passphrase, params, salt))
        _, check_key, seal_key = self._cached
        expected = hmac.new(check_key, _CHECK_MESSAGE, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, check):
            raise AuthError(f"wrong passphrase for key store {self._path}")
        try:
            plaintext = AESGCM(seal_key).decrypt(nonce, sealed, aad)
            created, keys = _parse_payload(json.loads(plaintext))
        except (InvalidTag, ValueError, TypeError, KeyError, RecursionError, binascii.Error):
            raise corrupted from None
        return _Store(doc, created, keys)

    def _save(self, store: _Store) -> None:
        assert self._cached is not None
        _write(self._path, store.doc, self._cached[2], _dump_payload(store.created, store.keys))


def _write(path: Path, doc: dict[str, Any], seal_key: bytes, payload: bytes) -> None:
    """Seal ``payload`` with a fresh nonce into ``doc`` and replace the store atomically."""
    nonce = os.urandom(12)
    sealed = AESGCM(seal_key).encrypt(nonce, payload, _bound(doc))
    out = {k: doc[k] for k in ("format", "version", "kdf", "check")}
    out.update(nonce=_b64(nonce), sealed=_b64(sealed))
    try:
        with atomic_output(path, mode=0o600, durable=True) as f:
            f.write(json.dumps(out, indent=2).encode() + b"\n")
    except OSError as exc:
        raise KeyServiceError(f"cannot write key store {path}: {exc.strerror}") from None
