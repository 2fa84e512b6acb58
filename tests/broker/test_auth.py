"""Signed broker requests: the signature, the clock window and replay protection as attacks."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from enclaveml.broker.auth import (
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    derive_signing_key,
    sign_request,
    verify_request,
)
from enclaveml.errors import AuthError

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
API_KEY = bytes(range(32))
KEYS = {"app-1": derive_signing_key(API_KEY)}


class Nonces:
    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def remember(self, app_id: str, nonce: str, expires: int) -> bool:
        if (app_id, nonce) in self.seen:
            return False
        self.seen.add((app_id, nonce))
        return True


def verify(headers: dict[str, str], nonces: Nonces | None = None, *, body: bytes = b"{}", at: datetime = NOW) -> str:
    store = nonces or Nonces()
    return verify_request(
        headers, "POST", "/v1/keys/k/release", body, now=at, lookup_key=KEYS.get, remember_nonce=store.remember
    ).app_id


def signed(**kwargs: object) -> dict[str, str]:
    args: dict[str, object] = {"app_id": "app-1", "signing_key": KEYS["app-1"], "body": b"{}", "now": NOW} | kwargs
    return sign_request(
        args["app_id"],  # type: ignore[arg-type]
        args["signing_key"],  # type: ignore[arg-type]
        "POST",
        "/v1/keys/k/release",
        args["body"],  # type: ignore[arg-type]
        now=args["now"],  # type: ignore[arg-type]
    )


def test_a_signed_request_verifies() -> None:
    assert verify(signed()) == "app-1"


def test_header_names_are_case_insensitive() -> None:
    assert verify({k.lower(): v for k, v in signed().items()}) == "app-1"


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        (lambda h: h | {HEADER_SIGNATURE: "0" * 64}, "invalid app id or request signature"),
        (lambda h: h | {"X-Enclaveml-App": "app-2"}, "invalid app id or request signature"),
        (lambda h: {k: v for k, v in h.items() if k != HEADER_SIGNATURE}, "not signed"),
        (lambda h: {}, "not signed"),
        (lambda h: h | {HEADER_NONCE: "zz" * 16}, "malformed"),
        (lambda h: h | {HEADER_TIMESTAMP: "-5"}, "malformed"),
    ],
)
def test_bad_or_missing_credentials_are_refused(attack, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AuthError, match=message):
        verify(attack(signed()))


def test_wrong_api_key() -> None:
    with pytest.raises(AuthError, match="invalid app id or request signature"):
        verify(signed(signing_key=derive_signing_key(b"x" * 32)))


def test_body_method_and_path_are_covered() -> None:
    headers = signed()
    with pytest.raises(AuthError, match="signature"):
        verify(headers, body=b'{"key": "other"}')
    store = Nonces()
    with pytest.raises(AuthError, match="signature"):
        verify_request(
            headers,
            "POST",
            "/v1/keys/other/release",
            b"{}",
            now=NOW,
            lookup_key=KEYS.get,
            remember_nonce=store.remember,
        )


def test_replayed_request_is_refused() -> None:
    nonces = Nonces()
    headers = signed()
    assert verify(headers, nonces) == "app-1"
    with pytest.raises(AuthError, match="replayed"):
        verify(headers, nonces)


@pytest.mark.parametrize("offset_s", [-301, 301, -86400])
def test_timestamp_outside_the_window_is_refused(offset_s: int) -> None:
    with pytest.raises(AuthError, match="clock"):
        verify(signed(now=NOW + timedelta(seconds=offset_s)))


def test_timestamp_at_the_edge_of_the_window_is_accepted() -> None:
    assert verify(signed(now=NOW - timedelta(seconds=300))) == "app-1"


def test_unknown_app_and_wrong_key_take_the_same_time() -> None:
    def cost(headers: dict[str, str]) -> float:
        best = float("inf")
        for _ in range(300):
            started = time.perf_counter()
            with pytest.raises(AuthError):
                verify(headers)
            best = min(best, time.perf_counter() - started)
        return best

    unknown = cost(signed() | {"X-Enclaveml-App": "nobody"})
    wrong = cost(signed(signing_key=b"k" * 32))
    assert 0.4 < unknown / wrong < 2.5
