"""The store as a KMS: key lifecycle, data-key wraps, and key material sealed at rest."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from enclaveml.broker.store import BrokerStore
from enclaveml.crypto import WrappedKey, decrypt_bytes, encrypt_bytes
from enclaveml.errors import ConfigError, IntegrityError, KeyNotFound
from enclaveml.kms import KeyManagementService

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_the_store_is_a_key_management_service(store: BrokerStore) -> None:
    assert isinstance(store, KeyManagementService)
    assert store.kms_name == "broker"


def test_a_key_is_created_rotated_listed_and_described(store: BrokerStore) -> None:
    created = store.create_key("customers", actor="a-owner", now=T0)
    assert (created.kms, created.name, created.primary_version, created.created) == ("broker", "customers", 1, T0)
    assert re.fullmatch("k-[0-9a-f]{16}", created.key_id)
    rotated = store.rotate_key(created.key_id, actor="a-owner")
    assert rotated.primary_version == 2
    assert [(v.version, v.state) for v in rotated.versions] == [(1, "enabled"), (2, "enabled")]
    assert store.describe_key("customers") == store.describe_key(created.key_id) == rotated
    store.create_key("models")
    assert [k.name for k in store.list_keys()] == ["customers", "models"]
    events = [(e.event, e.actor, e.subject, e.detail) for e in store.iter_audit()]
    assert events[:2] == [
        ("key.created", "a-owner", created.key_id, {"name": "customers", "version": 1}),
        ("key.rotated", "a-owner", created.key_id, {"name": "customers", "version": 2}),
    ]


def test_bad_names_duplicates_and_unknown_keys_are_refused(store: BrokerStore) -> None:
    store.create_key("customers")
    with pytest.raises(ConfigError, match="already exists"):
        store.create_key("customers")
    with pytest.raises(ConfigError, match="invalid key name"):
        store.create_key("k-0123456789abcdef")
    with pytest.raises(KeyNotFound, match="no key 'absent'"):
        store.describe_key("absent")
    with pytest.raises(KeyNotFound):
        store.rotate_key("absent")
    assert len(list(store.iter_audit())) == 1


def test_data_keys_wrap_with_the_primary_version_and_unwrap_after_rotation(store: BrokerStore) -> None:
    store.create_key("customers")
    data_key = os.urandom(32)
    old = store.wrap_data_key("customers", data_key, b"header")
    store.rotate_key("customers")
    new = store.wrap_data_key("customers", data_key, b"header")
    assert (old.kms, old.key_version, new.key_version) == ("broker", 1, 2)
    assert store.unwrap_data_key(old, b"header") == store.unwrap_data_key(new, b"header") == data_key
    with pytest.raises(IntegrityError):
        store.unwrap_data_key(new, b"another header")
    with pytest.raises(KeyNotFound, match="no version 3"):
        store.unwrap_data_key(WrappedKey("broker", new.key_id, 3, new.ciphertext), b"header")
    with pytest.raises(KeyNotFound, match="'local' KMS"):
        store.unwrap_data_key(WrappedKey("local", new.key_id, 2, new.ciphertext), b"header")


def test_files_encrypted_with_the_broker_kms_decrypt(store: BrokerStore) -> None:
    store.create_key("customers")
    blob = encrypt_bytes(b"name,age\nann,41\n", store, "customers")
    store.rotate_key("customers")
    assert decrypt_bytes(blob, store) == b"name,age\nann,41\n"


def test_key_material_is_sealed_at_rest_and_bound_to_its_row(store: BrokerStore) -> None:
    first = store.create_key("customers")
    second = store.create_key("models")
    data_key = os.urandom(32)
    wrapped = store.wrap_data_key("customers", data_key, b"")
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT key_id, sealed_material FROM key_versions"))
        sealed = {key_id: bytes(blob) for key_id, blob in rows}
    assert all(len(blob) == 12 + 32 + 16 for blob in sealed.values())
    with store.engine.begin() as connection:  # an attacker swaps the two keys' sealed material
        for key_id, other in ((first.key_id, second.key_id), (second.key_id, first.key_id)):
            swap = text("UPDATE key_versions SET sealed_material = :m WHERE key_id = :k")
            connection.execute(swap, {"m": sealed[other], "k": key_id})
    with pytest.raises(IntegrityError, match="does not open"):
        store.unwrap_data_key(wrapped, b"")
