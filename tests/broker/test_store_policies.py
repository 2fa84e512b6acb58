"""Policies, their key bindings, and releasing key material only through a live binding."""

from __future__ import annotations

import os

import pytest
from broker_testdata import POLICY_TOML

from enclaveml.attestation.policy import Policy
from enclaveml.broker.store import BrokerStore, ReleaseRefused
from enclaveml.crypto._keywrap import unwrap_key
from enclaveml.errors import KeyNotFound, PolicyError


def test_a_registered_policy_keeps_its_text_and_keys(store: BrokerStore) -> None:
    customers = store.create_key("customers")
    models = store.create_key("models")
    record = store.register_policy("training", POLICY_TOML, ["customers", models.key_id], actor="a-owner")
    assert record.policy_id.startswith("p-")
    assert record.document == POLICY_TOML
    assert Policy.from_text(record.document).name == "training-job"
    assert record.key_ids == tuple(sorted([customers.key_id, models.key_id]))
    assert store.get_policy(record.policy_id) == record
    assert store.list_policies() == [record]
    assert store.policies_for_key("customers") == [record]
    last = list(store.iter_audit())[-1]
    assert (last.event, last.actor, last.subject) == ("policy.registered", "a-owner", record.policy_id)
    assert last.detail["keys"] == list(record.key_ids)


def test_an_invalid_policy_or_an_unknown_key_registers_nothing(store: BrokerStore) -> None:
    store.create_key("customers")
    with pytest.raises(PolicyError, match="unknown policy field `mr_enclve`"):
        store.register_policy("typo", POLICY_TOML.replace("mr_enclave", "mr_enclve"), ["customers"])
    with pytest.raises(KeyNotFound, match="absent"):
        store.register_policy("training", POLICY_TOML, ["customers", "absent"])
    assert store.list_policies() == []
    assert [e.event for e in store.iter_audit()] == ["key.created"]


def test_a_revoked_policy_is_listed_apart_and_releases_nothing(store: BrokerStore) -> None:
    store.create_key("customers")
    record = store.register_policy("training", POLICY_TOML, ["customers"])
    revoked = store.revoke_policy(record.policy_id, actor="a-owner")
    assert revoked.revoked
    assert store.revoke_policy(record.policy_id).revoked  # idempotent, audited once
    assert store.list_policies(include_revoked=False) == []
    assert store.policies_for_key("customers") == []
    assert store.policies_for_key("customers", include_revoked=True) == [revoked]
    with pytest.raises(ReleaseRefused, match="was revoked") as refused:
        store.release_key_material(record.policy_id, "customers", actor="a-workload")
    assert refused.value.reason == "policy_revoked"
    events = [e.event for e in store.iter_audit()]
    assert events == ["key.created", "policy.registered", "policy.revoked", "release.refused"]


def test_a_release_hands_out_every_enabled_version(store: BrokerStore) -> None:
    store.create_key("customers")
    record = store.register_policy("training", POLICY_TOML, ["customers"])
    data_key = os.urandom(32)
    old = store.wrap_data_key("customers", data_key, b"header")
    store.rotate_key("customers")
    released = store.release_key_material(record.policy_id, "customers", actor="a-workload")
    assert [(k.name, k.version) for k in released] == [("customers", 1), ("customers", 2)]
    assert "material" not in repr(released[0])
    assert unwrap_key(released[0].material, old.key_id, 1, old.ciphertext, b"header") == data_key
    last = list(store.iter_audit())[-1]
    assert (last.event, last.actor, last.subject) == ("key.released", "a-workload", old.key_id)
    assert last.detail == {"policy_id": record.policy_id, "versions": [1, 2]}


@pytest.mark.parametrize(
    ("policy", "key", "reason"),
    [
        ("bound", "models", "key_not_bound"),
        ("bound", "absent", "unknown_key"),
        ("p-0000000000000000", "customers", "unknown_policy"),
    ],
)
def test_a_release_outside_the_binding_is_refused_and_audited(
    store: BrokerStore, policy: str, key: str, reason: str
) -> None:
    store.create_key("customers")
    store.create_key("models")
    record = store.register_policy("training", POLICY_TOML, ["customers"])
    policy_id = record.policy_id if policy == "bound" else policy
    with pytest.raises(ReleaseRefused) as refused:
        store.release_key_material(policy_id, key, actor="a-workload")
    assert refused.value.reason == reason
    last = list(store.iter_audit())[-1]
    assert (last.event, last.actor, last.subject) == ("release.refused", "a-workload", key)
    assert last.detail == {"policy_id": policy_id, "reason": reason}


def test_refusals_from_the_api_layer_are_audited(store: BrokerStore) -> None:
    store.record_refusal(
        "attest", actor="a-workload", subject="customers", reason="mr_enclave", detail={"policy_id": "p-1"}
    )
    (entry,) = store.iter_audit()
    assert (entry.event, entry.detail) == ("attest.refused", {"policy_id": "p-1", "reason": "mr_enclave"})
    with pytest.raises(TypeError):
        store.record_refusal("attest", actor="a", subject="s", reason="r", detail={"key": b"\x00" * 32})
