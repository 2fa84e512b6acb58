"""Key release sealing: only the ephemeral key, only for its nonce, only untampered."""

from __future__ import annotations

import hashlib

import pytest

from enclaveml.crypto.key_release import RELEASE_LABEL, EphemeralRecipient, release_binding, seal_for_recipient
from enclaveml.errors import IntegrityError

NONCE = bytes.fromhex("00112233445566778899aabbccddeeff")


def test_binding_is_the_documented_formula() -> None:
    public = bytes(range(32))
    expected = hashlib.sha256(b"enclaveml key release v1\x00" + public + NONCE).digest() + bytes(32)
    assert release_binding(public, NONCE) == expected
    assert RELEASE_LABEL == b"enclaveml key release v1"


def test_round_trip() -> None:
    recipient = EphemeralRecipient()
    sealed = seal_for_recipient(b"k" * 32, recipient.public_key, NONCE)
    assert recipient.open(sealed, NONCE) == b"k" * 32
    assert b"k" * 32 not in sealed


def test_another_recipient_cannot_open() -> None:
    sealed = seal_for_recipient(b"k" * 32, EphemeralRecipient().public_key, NONCE)
    with pytest.raises(IntegrityError, match="does not open"):
        EphemeralRecipient().open(sealed, NONCE)


def test_replay_under_another_nonce_fails() -> None:
    recipient = EphemeralRecipient()
    sealed = seal_for_recipient(b"k" * 32, recipient.public_key, NONCE)
    with pytest.raises(IntegrityError):
        recipient.open(sealed, b"another nonce")


@pytest.mark.parametrize("position", [0, 31, 32, 40, -1])
def test_tampered_or_truncated_fails(position: int) -> None:
    recipient = EphemeralRecipient()
    sealed = bytearray(seal_for_recipient(b"k" * 32, recipient.public_key, NONCE))
    sealed[position] ^= 1
    with pytest.raises(IntegrityError):
        recipient.open(bytes(sealed), NONCE)
    with pytest.raises(IntegrityError):
        recipient.open(bytes(sealed[:20]), NONCE)


def test_bad_public_key_is_misuse() -> None:
    with pytest.raises(ValueError, match="32-byte"):
        seal_for_recipient(b"x", b"short", NONCE)
