"""The audit chain: verifies when intact, names the first bad entry when not, and never holds keys."""

from __future__ import annotations

import base64
import threading
from typing import Any

import pytest
from broker_testdata import POLICY_TOML, ROOT_KEY
from sqlalchemy import text

from enclaveml.broker import store as store_module
from enclaveml.broker.audit import GENESIS_HASH, entry_hash, verify_audit_chain
from enclaveml.broker.auth import derive_signing_key
from enclaveml.broker.store import BrokerStore


def _five_entries(store: BrokerStore) -> None:
    store.enroll_app("owner", "owner")
    store.create_key("customers")
    store.rotate_key("customers")
    policy = store.register_policy("training", POLICY_TOML, ["customers"])
    store.release_key_material(policy.policy_id, "customers", actor="a-workload")


def _sql(store: BrokerStore, *statements: str, **params: Any) -> None:
    with store.engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement), params)


def test_an_untouched_chain_verifies(store: BrokerStore) -> None:
    empty = verify_audit_chain(store)
    assert (empty.ok, empty.entries, empty.head_seq) == (True, 0, 0)
    _five_entries(store)
    report = verify_audit_chain(store)
    entries = list(store.iter_audit())
    assert (report.ok, report.entries, report.head_seq, report.head_hash) == (True, 5, 5, entries[-1].hash)
    assert entries[0].prev_hash == GENESIS_HASH.hex()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    first = entries[0]
    recomputed = entry_hash(GENESIS_HASH, 1, first.at, first.event, first.actor, first.subject, first.detail)
    assert recomputed.hex() == first.hash


@pytest.mark.parametrize(
    ("tampering", "first_bad", "problem"),
    [
        (["UPDATE audit_log SET detail = replace(detail, 'customers', 'other') WHERE seq = 2"], 2, "was modified"),
        (["UPDATE audit_log SET actor = 'someone-else' WHERE seq = 4"], 4, "was modified"),
        (["DELETE FROM audit_log WHERE seq = 3"], 3, "entry 3 is missing"),
        (
            [  # two rows swap places
                "UPDATE audit_log SET seq = -1 WHERE seq = 2",
                "UPDATE audit_log SET seq = 2 WHERE seq = 3",
                "UPDATE audit_log SET seq = 3 WHERE seq = -1",
            ],
            2,
            "does not follow entry 1",
        ),
        (
            [  # a copy of entry 2 inserted after it, later entries renumbered
                "UPDATE audit_log SET seq = -(seq + 1) WHERE seq >= 3",
                "UPDATE audit_log SET seq = -seq WHERE seq < 0",
                "INSERT INTO audit_log SELECT 3, at, event, actor, subject, detail, prev_hash, hash, seal "
                "FROM audit_log WHERE seq = 2",
            ],
            3,
            "does not follow entry 2",
        ),
        (
            [
                "INSERT INTO audit_log SELECT 0, at, event, actor, subject, detail, prev_hash, hash, seal "
                "FROM audit_log WHERE seq = 1"
            ],
            0,
            "out of sequence",
        ),
    ],
    ids=["edited-detail", "edited-actor", "deleted", "swapped", "inserted", "inserted-before-first"],
)
def test_tampering_is_found_at_the_first_bad_entry(
    store: BrokerStore, tampering: list[str], first_bad: int, problem: str
) -> None:
    _five_entries(store)
    _sql(store, *tampering)
    report = verify_audit_chain(store)
    assert not report.ok
    assert report.first_bad_seq == first_bad
    assert problem in str(report.problem)


def test_a_recomputed_chain_fails_on_its_seal(store: BrokerStore) -> None:
    _five_entries(store)
    entries = list(store.iter_audit())
    prev = bytes.fromhex(entries[1].prev_hash)
    for entry in entries[1:]:  # edit entry 2, then recompute every hash after it like an attacker would
        subject = "forged" if entry.seq == 2 else entry.subject
        digest = entry_hash(prev, entry.seq, entry.at, entry.event, entry.actor, subject, entry.detail)
        _sql(
            store,
            "UPDATE audit_log SET subject = :s, prev_hash = :p, hash = :h WHERE seq = :q",
            s=subject,
            p=prev.hex(),
            h=digest.hex(),
            q=entry.seq,
        )
        prev = digest
    report = verify_audit_chain(store)
    assert (report.first_bad_seq, report.head_seq) == (2, 1)
    assert "bad seal" in str(report.problem)


def test_the_audit_log_never_contains_key_material(store: BrokerStore) -> None:
    enrolled = store.enroll_app("workload", "workload")
    _five_entries(store)
    store.rotate_key("customers")
    policy = store.register_policy("again", POLICY_TOML, ["customers"])
    released = store.release_key_material(policy.policy_id, "customers")
    secrets_ = [k.material for k in released] + [enrolled.api_key, derive_signing_key(enrolled.api_key)]
    encodings = [
        form
        for secret in secrets_
        for form in (
            secret,
            secret.hex().encode(),
            base64.b64encode(secret),
            base64.urlsafe_b64encode(secret).rstrip(b"="),
            base64.b64encode(secret).rstrip(b"="),
        )
    ]
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM audit_log")).all()
    assert len(rows) == 9
    dump = b"\n".join(v if isinstance(v, bytes) else str(v).encode() for row in rows for v in row)
    assert [form for form in encodings if form in dump] == []


def test_concurrent_writers_never_fork_the_chain(store_url: str) -> None:
    stores = [BrokerStore(store_url, ROOT_KEY) for _ in range(2)]
    try:

        def create(worker: int) -> None:
            for i in range(8):
                stores[worker % 2].create_key(f"w{worker}-{i}", actor=f"worker-{worker}")

        threads = [threading.Thread(target=create, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        report = verify_audit_chain(stores[0])
        assert (report.ok, report.head_seq) == (True, 32)
        assert len(stores[1].list_keys()) == 32
    finally:
        for opened in stores:
            opened.close()


def test_an_entry_commits_or_rolls_back_with_its_change(store: BrokerStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real_append = store_module.append_audit

    def append_then_fail(*args: Any, **kwargs: Any) -> Any:
        real_append(*args, **kwargs)
        raise RuntimeError("crash after the audit append")

    monkeypatch.setattr(store_module, "append_audit", append_then_fail)
    with pytest.raises(RuntimeError):
        store.create_key("customers")
    monkeypatch.undo()
    assert store.list_keys() == []
    assert list(store.iter_audit()) == []
