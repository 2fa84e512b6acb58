"""Releasing keys to an attested workload: HPKE (RFC 9180) sealing bound to evidence.

The workload makes an ephemeral X25519 key pair and asks its TEE for evidence whose report
data is ``release_binding(public_key, nonce)``::

    report_data = SHA-256("enclaveml key release v1" ‖ 0x00 ‖ public_key(32) ‖ nonce) ‖ 0x00 * 32

The broker verifies the evidence, recomputes the binding from the public key and nonce the
request names, and seals the released key material to that public key with HPKE base mode,
suite DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, ``info = label ‖ 0x00 ‖
nonce``. Only the process holding the ephemeral private key (inside the TEE) can open it,
and a sealed answer cannot be replayed under another nonce. HPKE comes from
``cryptography``; only the binding and the framing are ours.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from enclaveml.errors import IntegrityError

__all__ = ["RELEASE_LABEL", "EphemeralRecipient", "release_binding", "seal_for_recipient"]

RELEASE_LABEL = b"enclaveml key release v1"
_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
_PUBLIC_KEY_SIZE = 32


def release_binding(public_key: bytes, nonce: bytes) -> bytes:
    """The 64-byte report data that binds evidence to ``public_key`` and the broker's nonce."""
    if len(public_key) != _PUBLIC_KEY_SIZE:
        raise ValueError("the release public key is a raw 32-byte X25519 key")
    return hashlib.sha256(RELEASE_LABEL + b"\x00" + public_key + nonce).digest() + bytes(32)


def _info(nonce: bytes) -> bytes:
    return RELEASE_LABEL + b"\x00" + nonce


def seal_for_recipient(plaintext: bytes, public_key: bytes, nonce: bytes) -> bytes:
    """HPKE-seal ``plaintext`` to the raw X25519 ``public_key`` for this ``nonce``."""
    if len(public_key) != _PUBLIC_KEY_SIZE:
        raise ValueError("the release public key is a raw 32-byte X25519 key")
    return _SUITE.encrypt(plaintext, X25519PublicKey.from_public_bytes(public_key), info=_info(nonce))


class EphemeralRecipient:
    """The workload's side: an ephemeral key pair that lives only in this process's memory."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public_key = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def binding(self, nonce: bytes) -> bytes:
        return release_binding(self.public_key, nonce)

    def open(self, sealed: bytes, nonce: bytes) -> bytes:
        try:
            return _SUITE.decrypt(sealed, self._private, info=_info(nonce))
        except (InvalidTag, ValueError):
            raise IntegrityError(
                "released key does not open: it was sealed for another key or nonce, or modified",
                "request the release again",
            ) from None

    def __repr__(self) -> str:
        return f"EphemeralRecipient(public_key={self.public_key.hex()})"
