"""Nonces: attestation nonces are used once, even by racing consumers; replayed requests are refused."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from broker_testdata import ROOT_KEY

from enclaveml.broker.store import BrokerStore
from enclaveml.errors import AttestationError

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=5)


def test_a_nonce_is_used_once(store: BrokerStore) -> None:
    nonce = store.issue_nonce("attest", TTL, now=T0)
    assert (nonce.purpose, nonce.expires_at, len(nonce.value)) == ("attest", T0 + TTL, 43)
    store.consume_nonce(nonce.value, "attest", T0 + timedelta(seconds=1))
    with pytest.raises(AttestationError, match="already used") as refused:
        store.consume_nonce(nonce.value, "attest", T0 + timedelta(seconds=2), actor="a-workload")
    assert refused.value.reason == "reused_nonce"
    (entry,) = store.iter_audit()
    assert (entry.event, entry.actor, entry.detail) == ("nonce.refused", "a-workload", {"reason": "reused_nonce"})


@pytest.mark.parametrize(
    ("value", "purpose", "at", "reason"),
    [
        (None, "attest", T0 + TTL, "stale_nonce"),  # expires_at is exclusive
        (None, "release", T0, "unknown_nonce"),  # issued for another purpose
        ("never-issued", "attest", T0, "unknown_nonce"),
    ],
)
def test_stale_foreign_and_unknown_nonces_are_refused(
    store: BrokerStore, value: str | None, purpose: str, at: datetime, reason: str
) -> None:
    nonce = store.issue_nonce("attest", TTL, now=T0)
    with pytest.raises(AttestationError) as refused:
        store.consume_nonce(value or nonce.value, purpose, at)
    assert refused.value.reason == reason
    store.consume_nonce(nonce.value, "attest", T0)  # a refused attempt does not burn the nonce


def _consume(store: BrokerStore, value: str, start: threading.Barrier, outcomes: list[str]) -> None:
    start.wait()
    try:
        store.consume_nonce(value, "attest")
        outcomes.append("won")
    except AttestationError as exc:
        outcomes.append(exc.reason)


def test_exactly_one_of_many_racing_consumers_wins(store_url: str) -> None:
    stores = [BrokerStore(store_url, ROOT_KEY) for _ in range(2)]  # two broker workers, separate pools
    try:
        for _round in range(3):
            nonce = stores[0].issue_nonce("attest", TTL)
            barrier = threading.Barrier(8)
            outcomes: list[str] = []

            threads = [
                threading.Thread(target=_consume, args=(stores[i % 2], nonce.value, barrier, outcomes))
                for i in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sorted(outcomes) == ["reused_nonce"] * 7 + ["won"]
    finally:
        for opened in stores:
            opened.close()


def test_a_replayed_request_nonce_is_refused(store: BrokerStore) -> None:
    expires = int((T0 + timedelta(minutes=5)).timestamp())
    assert store.remember_request_nonce("a-one", "0123456789abcdef", expires)
    assert not store.remember_request_nonce("a-one", "0123456789abcdef", expires)
    assert store.remember_request_nonce("a-two", "0123456789abcdef", T0 + TTL)  # nonces are per app
    with pytest.raises(AttestationError) as refused:  # and never usable as attestation nonces
        store.consume_nonce("0123456789abcdef", "request", T0)
    assert refused.value.reason == "unknown_nonce"


def test_issuing_writes_nothing_and_used_nonces_are_purged_after_expiry(store: BrokerStore) -> None:
    short = store.issue_nonce("attest", timedelta(seconds=10), now=T0)
    long = store.issue_nonce("attest", TTL, now=T0)
    assert store.purge_expired_nonces(T0 + timedelta(days=1)) == 0  # issued nonces are not stored
    store.consume_nonce(short.value, "attest", T0)
    store.consume_nonce(long.value, "attest", T0)
    store.remember_request_nonce("a-one", "0123456789abcdef", T0 + timedelta(seconds=10))
    assert store.purge_expired_nonces(T0 + timedelta(minutes=1)) == 2  # the short nonce and the request nonce
    with pytest.raises(AttestationError, match="expired"):  # purged: its expiry still refuses it
        store.consume_nonce(short.value, "attest", T0 + timedelta(minutes=1))
    with pytest.raises(AttestationError, match="already used"):
        store.consume_nonce(long.value, "attest", T0 + timedelta(minutes=1))


@pytest.mark.parametrize("flip", [0, 8, 16, 31])
def test_a_forged_or_altered_nonce_is_unknown(store: BrokerStore, flip: int) -> None:
    import base64

    raw = bytearray(base64.urlsafe_b64decode(store.issue_nonce("attest", TTL, now=T0).value + "="))
    raw[flip] ^= 0x01  # e.g. a later expiry, or another random part, without the broker's MAC
    with pytest.raises(AttestationError) as refused:
        store.consume_nonce(base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="), "attest", T0)
    assert refused.value.reason == "unknown_nonce"


def test_nonces_from_a_store_with_another_root_key_are_unknown(store: BrokerStore, tmp_path: Path) -> None:
    with BrokerStore(f"sqlite:///{tmp_path}/other.db", bytes(32)) as other:
        foreign = other.issue_nonce("attest", TTL, now=T0)
    with pytest.raises(AttestationError, match="never issued"):
        store.consume_nonce(foreign.value, "attest", T0)


def test_nonce_purposes_and_lifetimes_are_checked(store: BrokerStore) -> None:
    with pytest.raises(ValueError, match="purpose"):
        store.issue_nonce("request", TTL)  # reserved for signed requests
    with pytest.raises(ValueError, match="purpose"):
        store.issue_nonce("Attest!", TTL)
    with pytest.raises(ValueError, match="positive"):
        store.issue_nonce("attest", timedelta(0))
    with pytest.raises(ValueError, match="timezone-aware"):
        store.issue_nonce("attest", TTL, now=datetime(2026, 1, 1))
