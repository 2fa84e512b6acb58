"""Enrolling apps and checking their credentials, without telling unknown apps from wrong keys."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, text

from enclaveml.broker.auth import derive_signing_key
from enclaveml.broker.models import Role
from enclaveml.broker.store import BrokerStore
from enclaveml.errors import AuthError, ConfigError


def test_an_enrolled_app_verifies_with_its_api_key(store: BrokerStore) -> None:
    enrolled = store.enroll_app("analytics", "owner", actor="admin-cli")
    app = store.verify_api_key(enrolled.app.app_id, enrolled.api_key)
    assert (app.name, app.role, app.disabled) == ("analytics", Role.OWNER, False)
    assert len(enrolled.api_key) == 32
    assert "api_key=<secret>" in repr(enrolled)
    assert store.find_app(app.app_id) == app
    assert store.list_apps() == [app]


def test_the_caller_can_compare_the_stored_hash_itself(store: BrokerStore) -> None:
    enrolled = store.enroll_app("analytics", Role.WORKLOAD)
    stored = store.api_key_hash_for(enrolled.app.app_id)
    assert stored is not None
    assert hmac.compare_digest(store.hash_api_key(enrolled.app.app_id, enrolled.api_key), stored)
    assert not hmac.compare_digest(store.hash_api_key(enrolled.app.app_id, bytes(32)), stored)
    assert store.api_key_hash_for("a-ffffffffffffffff") is None


def test_a_wrong_key_and_an_unknown_app_fail_the_same_way(store: BrokerStore) -> None:
    enrolled = store.enroll_app("analytics", "owner")
    with pytest.raises(AuthError) as wrong:
        store.verify_api_key(enrolled.app.app_id, bytes(32))
    with pytest.raises(AuthError) as unknown:
        store.verify_api_key("a-ffffffffffffffff", enrolled.api_key)
    assert wrong.value.what == unknown.value.what == "invalid app id or api key"
    refusals = [(e.event, e.detail["reason"]) for e in store.iter_audit() if e.event.endswith(".refused")]
    assert refusals == [("auth.refused", "invalid_credentials")] * 2


@contextmanager
def _statements(store: BrokerStore) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def test_unknown_app_and_wrong_key_run_the_same_statements_and_comparisons(
    store: BrokerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    enrolled = store.enroll_app("analytics", "owner")
    comparisons: list[int] = []
    real_compare = hmac.compare_digest

    def counting_compare(a: Any, b: Any) -> bool:
        comparisons.append(len(a))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting_compare)
    paths = []
    for app_id, api_key in ((enrolled.app.app_id, bytes(32)), ("a-ffffffffffffffff", enrolled.api_key)):
        comparisons.clear()
        with _statements(store) as statements, pytest.raises(AuthError):
            store.verify_api_key(app_id, api_key)
        paths.append((statements, list(comparisons)))
    assert paths[0] == paths[1]
    assert paths[0][1] == [32]  # exactly one 32-byte constant-time comparison each


def test_the_signing_key_is_derived_from_the_api_key_and_stored_sealed(store: BrokerStore) -> None:
    enrolled = store.enroll_app("analytics", "workload")
    signing_key = derive_signing_key(enrolled.api_key)
    assert store.signing_key_for(enrolled.app.app_id) == signing_key
    assert store.signing_key_for("a-ffffffffffffffff") is None
    with store.engine.connect() as connection:
        row = connection.execute(text("SELECT * FROM apps")).one()
    stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
    forms = [form for secret in (signing_key, enrolled.api_key) for form in (secret, secret.hex().encode())]
    assert [form for form in forms if form in stored] == []


def test_a_disabled_app_is_refused_even_with_the_right_key(store: BrokerStore) -> None:
    enrolled = store.enroll_app("analytics", "owner")
    store.disable_app(enrolled.app.app_id, actor="admin-cli")
    with pytest.raises(AuthError, match="is disabled"):
        store.verify_api_key(enrolled.app.app_id, enrolled.api_key)
    assert store.signing_key_for(enrolled.app.app_id) is None
    assert store.api_key_hash_for(enrolled.app.app_id) is None
    events = [e.event for e in store.iter_audit()]
    assert events == ["app.enrolled", "app.disabled", "auth.refused"]


def test_names_are_unique_and_roles_known(store: BrokerStore) -> None:
    store.enroll_app("analytics", "owner")
    with pytest.raises(ConfigError, match="already enrolled"):
        store.enroll_app("analytics", "workload")
    with pytest.raises(ConfigError, match="unknown role"):
        store.enroll_app("other", "root")
    with pytest.raises(ConfigError, match="invalid app name"):
        store.enroll_app("../etc", "owner")
    assert [e.event for e in store.iter_audit()] == ["app.enrolled"]  # refusals to enroll change nothing
