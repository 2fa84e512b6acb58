"""The one interface every key management backend implements.

A *primary key* (key encryption key, KEK) lives in the KMS and never leaves it. It has a
stable ``key_id``, a human ``name`` and numbered versions (1, 2, ...); the newest enabled
version is the *primary version*, used for new wraps. Old versions keep unwrapping until
they are destroyed. Data keys (random 256-bit, one per file) are wrapped by the primary
version and stored beside the data (envelope encryption, see ``docs/format.md``).

``associated_data`` binds a wrapped key to its context (for EML files: the file's bound
header), so a wrapped key copied into another file does not unwrap.

Backends: ``local`` (embedded file store sealed by a passphrase); later ``broker``,
``vault``, ``azure``. Errors: ``KeyNotFound`` for unknown names, ids and destroyed
versions; ``IntegrityError`` when a wrapped key does not authenticate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from enclaveml.crypto import WrappedKey

__all__ = ["KeyInfo", "KeyManagementService", "KeyVersionInfo", "WrappedKey"]


@dataclass(frozen=True)
class KeyVersionInfo:
    version: int
    created: datetime
    state: str  # "enabled" or "destroyed"


@dataclass(frozen=True)
class KeyInfo:
    """Public description of a primary key: never holds key material."""

    kms: str
    key_id: str
    name: str
    created: datetime
    primary_version: int
    versions: tuple[KeyVersionInfo, ...]


@runtime_checkable
class KeyManagementService(Protocol):
    """Create, rotate and describe primary keys; wrap and unwrap data keys with them."""

    @property
    def kms_name(self) -> str:
        """The name recorded in key references (``local``, ``broker``, ...)."""
        ...

    def create_key(self, name: str) -> KeyInfo: ...

    def list_keys(self) -> list[KeyInfo]: ...

    def describe_key(self, name_or_id: str) -> KeyInfo: ...

    def rotate_key(self, name_or_id: str) -> KeyInfo: ...

    def wrap_data_key(self, name_or_id: str, data_key: bytes, associated_data: bytes) -> WrappedKey:
        """Wrap ``data_key`` with the key's primary version."""
        ...

    def unwrap_data_key(self, wrapped: WrappedKey, associated_data: bytes) -> bytes: ...
