"""Wrapping a data key with a primary key version (the local KMS's wire format).

``wrapped = nonce(12) ‖ AES-256-GCM(kek, nonce, data_key, aad)`` where
``aad = "enclaveml/keywrap/v1" ‖ 0x00 ‖ key_id (UTF-8) ‖ 0x00 ‖ u32be(version) ‖ associated_data``.

Binding ``key_id`` and ``version`` into the AAD means a wrapped key presented under another
key reference fails to authenticate instead of unwrapping to garbage. Specified in
``docs/format.md`` (section "Local key wrap") so the known-answer vectors cover it.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclaveml.errors import IntegrityError

__all__ = ["WRAPPED_KEY_SIZE", "unwrap_key", "wrap_key"]

_LABEL = b"enclaveml/keywrap/v1\x00"
_NONCE_SIZE = 12
DATA_KEY_SIZE = 32
WRAPPED_KEY_SIZE = _NONCE_SIZE + DATA_KEY_SIZE + 16


def _aad(key_id: str, version: int, associated_data: bytes) -> bytes:
    return _LABEL + key_id.encode() + b"\x00" + struct.pack(">I", version) + associated_data


def wrap_key(
    kek: bytes,
    key_id: str,
    version: int,
    data_key: bytes,
    associated_data: bytes,
    *,
    _nonce: bytes | None = None,
) -> bytes:
    """Encrypt ``data_key`` under ``kek``. ``_nonce`` exists only for known-answer vectors."""
    if len(kek) != 32 or len(data_key) != DATA_KEY_SIZE:
        raise ValueError("kek and data key must be 32 bytes")
    nonce = _nonce if _nonce is not None else os.urandom(_NONCE_SIZE)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, _aad(key_id, version, associated_data))


def unwrap_key(kek: bytes, key_id: str, version: int, wrapped: bytes, associated_data: bytes) -> bytes:
    """Decrypt a wrapped data key; any mismatch is one opaque ``IntegrityError``."""
    if len(wrapped) != WRAPPED_KEY_SIZE:
        raise IntegrityError("wrapped data key has the wrong length")
    nonce, body = wrapped[:_NONCE_SIZE], wrapped[_NONCE_SIZE:]
    try:
        return AESGCM(kek).decrypt(nonce, body, _aad(key_id, version, associated_data))
    except InvalidTag:
        raise IntegrityError("data key does not unwrap: the header was modified or the key is wrong") from None
