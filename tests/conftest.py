"""Shared fixtures: a real embedded key store (fast scrypt) in a temporary directory."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms

PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def kms(tmp_path: Path) -> LocalKms:
    store = LocalKms.init(
        tmp_path / "home" / "keystore.json", PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC)
    )
    store.create_key("customers")
    return store
