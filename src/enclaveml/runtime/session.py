"""The job's side of ``enclaveml run``: released keys, read once from an inherited pipe.

``enclaveml run`` attests, receives the keys, starts the job with one end of a pipe left
open and writes the key bundle into it. The job finds the descriptor number (never a
secret) in ``ENCLAVEML_SESSION_FD``; ``enclaveml.session()`` reads the bundle once, closes
the descriptor and holds the keys in memory only. Nothing is written to disk or to the
environment in plaintext.

Bundle (UTF-8 JSON, then EOF)::

    {"version": 1, "kms": "broker", "claims": {...},
     "keys": [{"name": "customers", "key_id": "k-…", "version": 2, "material": "<base64>"}]}

``Session`` implements the part of a KMS that envelope decryption needs (``KeyWrapper``),
so ``session.decrypt_file(...)`` and ``open_reader(path, session)`` read files encrypted
with ``--kms broker`` using only the released keys.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from enclaveml.crypto import WrappedKey, decrypt_file, open_reader
from enclaveml.crypto._envelope import Source
from enclaveml.crypto._keywrap import unwrap_key, wrap_key
from enclaveml.crypto._reader import EmlReader
from enclaveml.crypto.gramine_pf import derive_wrap_key
from enclaveml.errors import ConfigError, KeyNotFound

__all__ = ["SESSION_FD_ENV", "ReleasedKey", "Session", "encode_bundle", "session"]

SESSION_FD_ENV = "ENCLAVEML_SESSION_FD"
_MAX_BUNDLE = 1 << 20


@dataclass(frozen=True)
class ReleasedKey:
    name: str
    key_id: str
    version: int
    material: bytes

    def __repr__(self) -> str:  # never print key material
        return f"ReleasedKey(name={self.name!r}, key_id={self.key_id!r}, version={self.version})"

    def to_json(self) -> dict[str, Any]:
        """The key as it travels in a bundle (the broker's sealed answer, the job's pipe)."""
        material = base64.b64encode(self.material).decode()
        return {"name": self.name, "key_id": self.key_id, "version": self.version, "material": material}

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> ReleasedKey:
        """Inverse of :meth:`to_json`; ``KeyError`` / ``TypeError`` / ``ValueError`` when malformed."""
        material = base64.b64decode(item["material"], validate=True)
        return cls(str(item["name"]), str(item["key_id"]), int(item["version"]), material)


def encode_bundle(kms: str, keys: list[ReleasedKey], claims: dict[str, Any]) -> bytes:
    """What the runtime writes into the job's pipe."""
    return json.dumps(
        {
            "version": 1,
            "kms": kms,
            "claims": claims,
            "keys": [k.to_json() for k in keys],
        }
    ).encode()


@dataclass(frozen=True)
class _Ref:
    kms: str
    key_id: str


class Session:
    """Keys released to this job. Use ``enclaveml.session()`` to get one."""

    def __init__(self, kms: str, keys: list[ReleasedKey], claims: dict[str, Any]) -> None:
        self.kms_name = kms
        self.claims = claims
        self._keys = {(k.key_id, k.version): k for k in keys}
        self._by_name = {k.name: k for k in sorted(keys, key=lambda k: k.version)}

    @classmethod
    def from_bundle(cls, data: bytes) -> Session:
        try:
            doc = json.loads(data)
            keys = [ReleasedKey.from_json(k) for k in doc["keys"]]
            return cls(str(doc["kms"]), keys, dict(doc.get("claims", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"the session key bundle is malformed ({type(exc).__name__})", "start the job with `enclaveml run`"
            ) from None

    def key_names(self) -> list[str]:
        return sorted(self._by_name)

    def key(self, name: str) -> bytes:
        """The newest released version of primary key ``name`` (raw 32 bytes)."""
        if name not in self._by_name:
            raise KeyNotFound(f"key {name} was not released to this job", "add it to `enclaveml run --keys`")
        return self._by_name[name].material

    def gramine_pf_key(self, name: str) -> bytes:
        """The 16-byte Gramine protected-files wrap key derived from the released version of ``name``."""
        if name not in self._by_name:
            raise KeyNotFound(f"key {name} was not released to this job", "add it to `enclaveml run --keys`")
        released = self._by_name[name]
        return derive_wrap_key(released.material, released.key_id, released.version)

    def export_secret_keys_for_trusted_runtime(self) -> list[ReleasedKey]:
        """Exactly the released key versions, **with their secret material**.

        Only for handing primary keys (KEKs) to an engine that runs inside this job's
        attested trust domain and cannot call back into Python: the Spark JVM's parquet-mr
        ``KmsClient`` (``enclaveml.analytics.spark_keys``). The material must stay in
        memory: never log, print or persist it.
        """
        return list(self._keys.values())

    # KeyWrapper: enough to decrypt EML files whose data keys the released keys wrapped.
    def describe_key(self, name_or_id: str) -> _Ref:
        for key in self._keys.values():
            if name_or_id in (key.name, key.key_id):
                return _Ref(self.kms_name, key.key_id)
        raise KeyNotFound(f"key {name_or_id} was not released to this job", "add it to `enclaveml run --keys`")

    def wrap_data_key(self, name_or_id: str, data_key: bytes, associated_data: bytes) -> WrappedKey:
        ref = self.describe_key(name_or_id)
        newest = max((k for k in self._keys.values() if k.key_id == ref.key_id), key=lambda k: k.version)
        return WrappedKey(
            self.kms_name,
            newest.key_id,
            newest.version,
            wrap_key(newest.material, newest.key_id, newest.version, data_key, associated_data),
        )

    def unwrap_data_key(self, wrapped: WrappedKey, associated_data: bytes) -> bytes:
        if wrapped.kms != self.kms_name:
            raise KeyNotFound(f"the file's key is held by the {wrapped.kms!r} KMS, not the {self.kms_name!r} session")
        key = self._keys.get((wrapped.key_id, wrapped.key_version))
        if key is None:
            raise KeyNotFound(
                f"key {wrapped.key_id} version {wrapped.key_version} was not released to this job",
                "release that key (and version) to the job's policy",
            )
        return unwrap_key(key.material, key.key_id, key.version, wrapped.ciphertext, associated_data)

    def decrypt_file(self, source: Source, destination: Source, *, context: dict[str, str] | None = None) -> None:
        decrypt_file(source, destination, self, context=context)

    def open_reader(self, path: str | os.PathLike[str], *, context: dict[str, str] | None = None) -> EmlReader:
        return open_reader(path, self, context=context)

    def close(self) -> None:
        self._keys.clear()
        self._by_name.clear()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(kms={self.kms_name!r}, keys={self.key_names()})"


_current: Session | None = None


def session() -> Session:
    """The keys ``enclaveml run`` released to this process (read once, then cached)."""
    global _current
    if _current is not None and _current.key_names():
        return _current
    fd_text = os.environ.get(SESSION_FD_ENV)
    if not fd_text or not fd_text.isdigit():
        raise ConfigError(
            "this process was not started by `enclaveml run`, so no keys were released to it",
            "start it with `enclaveml run --broker URL --keys NAME -- python job.py`",
        )
    chunks = []
    size = 0
    with os.fdopen(int(fd_text), "rb") as pipe:
        while chunk := pipe.read(65536):
            size += len(chunk)
            if size > _MAX_BUNDLE:
                raise ConfigError("the session key bundle is too large", "start the job with `enclaveml run`")
            chunks.append(chunk)
    os.environ.pop(SESSION_FD_ENV, None)
    _current = Session.from_bundle(b"".join(chunks))
    return _current
