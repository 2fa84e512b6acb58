"""The broker's root key: key files, passphrases, and what opening a store with the wrong one does."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from broker_testdata import ROOT_KEY

from enclaveml.broker.root_key import RootKey, create_root_key_file, derive_root_key, read_root_key_file
from enclaveml.broker.store import BrokerStore
from enclaveml.errors import AuthError, ConfigError, IntegrityError
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS


def test_a_created_key_file_is_hex_mode_0600_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    key = create_root_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.hex() + "\n"
    assert read_root_key_file(path) == key


def test_a_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    create_root_key_file(path)
    with pytest.raises(ConfigError, match="already exists"):
        create_root_key_file(path)


def test_a_key_file_may_hold_32_raw_bytes(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(b"\n" * 32)  # raw bytes win, even when they look like whitespace
    assert read_root_key_file(path) == b"\n" * 32


@pytest.mark.parametrize("content", [b"", b"00" * 31, b"zz" * 32, b"\x01" * 33])
def test_a_key_file_of_the_wrong_shape_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="neither 32 raw bytes nor 64 hex digits"):
        read_root_key_file(path)


def test_a_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read root key file"):
        read_root_key_file(tmp_path / "absent.key")


def test_the_passphrase_derivation_is_scrypt_with_the_given_salt() -> None:
    salt = bytes(16)
    first = derive_root_key("correct horse", salt, SCRYPT_FAST_FOR_TESTS)
    assert first == derive_root_key("correct horse", salt, SCRYPT_FAST_FOR_TESTS)
    assert first != derive_root_key("correct horse", bytes([1]) * 16, SCRYPT_FAST_FOR_TESTS)
    assert len(first) == 32
    with pytest.raises(ConfigError, match="must not be empty"):
        derive_root_key("", salt, SCRYPT_FAST_FOR_TESTS)


def test_sealed_material_is_bound_to_its_row() -> None:
    root = RootKey(ROOT_KEY)
    sealed = root.seal(b"k" * 32, table="key_versions", row_id="k-0123456789abcdef", version=1)
    assert root.open(sealed, table="key_versions", row_id="k-0123456789abcdef", version=1) == b"k" * 32
    for other in (
        {"table": "apps", "row_id": "k-0123456789abcdef", "version": 1},
        {"table": "key_versions", "row_id": "k-fedcba9876543210", "version": 1},
        {"table": "key_versions", "row_id": "k-0123456789abcdef", "version": 2},
    ):
        with pytest.raises(IntegrityError, match="does not open"):
            root.open(sealed, **other)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        RootKey(bytes(32)).open(sealed, table="key_versions", row_id="k-0123456789abcdef", version=1)


def test_the_root_key_never_prints() -> None:
    assert repr(RootKey(ROOT_KEY)) == "RootKey(<secret>)"
    with pytest.raises(ValueError, match="32 bytes"):
        RootKey(b"short")


def test_a_store_refuses_another_root_key(store_url: str) -> None:
    BrokerStore(store_url, ROOT_KEY).close()
    with pytest.raises(AuthError, match="wrong root key") as refused:
        BrokerStore(store_url, bytes(32))
    assert "root key file" in refused.value.hint


def test_a_passphrase_store_reopens_with_its_passphrase_only(store_url: str) -> None:
    with BrokerStore.from_passphrase(store_url, "correct horse", kdf=SCRYPT_FAST_FOR_TESTS) as store:
        key_id = store.create_key("customers").key_id
    with BrokerStore.from_passphrase(store_url, "correct horse", kdf=SCRYPT_FAST_FOR_TESTS) as store:
        assert store.describe_key("customers").key_id == key_id
    with pytest.raises(AuthError, match="wrong root key") as refused:
        BrokerStore.from_passphrase(store_url, "battery staple", kdf=SCRYPT_FAST_FOR_TESTS)
    assert "passphrase" in refused.value.hint


def test_a_key_file_store_cannot_be_opened_with_a_passphrase(store_url: str) -> None:
    BrokerStore(store_url, ROOT_KEY).close()
    with pytest.raises(ConfigError, match="uses a root key file, not a passphrase"):
        BrokerStore.from_passphrase(store_url, "correct horse", kdf=SCRYPT_FAST_FOR_TESTS)
