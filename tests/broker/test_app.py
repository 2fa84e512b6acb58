"""The broker's HTTP API in-process (Starlette TestClient; SQLite and PostgreSQL): routes, auth, release, attacks."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from broker_testdata import ROOT_KEY
from starlette.testclient import TestClient

from enclaveml.attestation.sim import SimulationKey, create_sim_evidence
from enclaveml.broker.app import create_app
from enclaveml.broker.audit import verify_audit_chain
from enclaveml.broker.auth import derive_signing_key, sign_request
from enclaveml.broker.client import BrokerAuthError, BrokerClient, BrokerRefused, error_reason
from enclaveml.broker.store import BrokerStore
from enclaveml.crypto._keywrap import unwrap_key
from enclaveml.crypto.key_release import EphemeralRecipient
from enclaveml.errors import AttestationError, ConfigError, KeyNotFound
from enclaveml.kms.broker import BrokerKms

MEASUREMENT = bytes(range(48))
OTHER_MEASUREMENT = bytes(48)
SIM_POLICY = f'name = "sim-job"\ntee = ["sgx"]\nallow_simulation = true\nmr_enclave = ["{MEASUREMENT.hex()}"]\n'
OTHER_POLICY = f'name = "other-job"\ntee = ["sgx"]\nallow_simulation = true\nmr_enclave = ["{"ab" * 48}"]\n'
NO_SIM_POLICY = f'name = "hw-only"\ntee = ["sgx"]\nmr_enclave = ["{MEASUREMENT.hex()}"]\n'


@dataclass
class Broker:
    store: BrokerStore
    http: TestClient
    admin: BrokerClient
    owner: BrokerClient
    workload: BrokerClient
    owner_key: str
    workload_key: str

    def client(self, app_id: str, api_key: str) -> BrokerClient:
        return BrokerClient("http://testserver", app_id, api_key, http_client=self.http)


@pytest.fixture
def broker(store_url: str) -> Iterator[Broker]:
    """The whole API suite runs on SQLite and on a real PostgreSQL server (``store_url``)."""
    store = BrokerStore(store_url, ROOT_KEY)
    admin = store.enroll_app("admin", "admin")
    app = create_app(store, now_fn=lambda: datetime.now(UTC))
    with TestClient(app) as http:
        admin_client = BrokerClient("http://testserver", admin.app.app_id, admin.api_key, http_client=http)
        owner = admin_client.enroll("owner", "owner")
        workload = admin_client.enroll("job", "workload")
        yield Broker(
            store,
            http,
            admin_client,
            BrokerClient("http://testserver", owner["app_id"], owner["api_key"], http_client=http),
            BrokerClient("http://testserver", workload["app_id"], workload["api_key"], http_client=http),
            owner["api_key"],
            workload["api_key"],
        )
    store.close()


def _evidence(recipient: EphemeralRecipient, nonce_hex: str, measurement: bytes = MEASUREMENT) -> bytes:
    nonce = bytes.fromhex(nonce_hex)
    return create_sim_evidence(
        SimulationKey.generate(), measurement, recipient.binding(nonce), nonce, datetime.now(UTC)
    )


def _last_event(store: BrokerStore) -> dict[str, object]:
    entry = list(store.iter_audit())[-1]
    return {"event": entry.event, **entry.detail}


def _setup_key(b: Broker, policy: str = SIM_POLICY, key: str = "customers") -> str:
    b.owner.create_key(key)
    return str(b.owner.register_policy("p", policy, [key])["policy_id"])


def test_health_metrics_openapi_jwks(broker: Broker) -> None:
    assert broker.http.get("/v1/health").json()["status"] == "ok"
    assert "/v1/keys/{name}/release" in broker.http.get("/openapi.json").json()["paths"]
    jwks = broker.http.get("/.well-known/jwks.json").json()
    assert jwks["keys"][0]["kty"] == "EC"
    assert jwks["keys"][0]["crv"] == "P-256"
    text = broker.http.get("/metrics").text
    assert "enclaveml_broker_requests_total" in text
    assert 'enclaveml_broker_request_duration_seconds_bucket{route="/v1/apps",le="+Inf"}' in text
    missing = broker.http.get("/v1/nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


def test_owner_kms_round_trip_through_broker_kms(broker: Broker) -> None:
    kms = BrokerKms("http://testserver", broker.owner.app_id, broker.owner_key, http_client=broker.http)
    info = kms.create_key("customers")
    assert info.kms == "broker"
    assert info.primary_version == 1
    wrapped = kms.wrap_data_key("customers", b"k" * 32, b"header")
    assert kms.unwrap_data_key(wrapped, b"header") == b"k" * 32
    assert kms.rotate_key("customers").primary_version == 2
    assert [k.name for k in kms.list_keys()] == ["customers"]
    with pytest.raises(KeyNotFound):
        kms.describe_key("nope")
    with pytest.raises(ConfigError, match="already exists"):
        kms.create_key("customers")


def test_release_with_sim_evidence_opens_with_ephemeral_recipient(broker: Broker) -> None:
    policy_id = _setup_key(broker)
    broker.owner.rotate_key("customers")
    recipient = EphemeralRecipient()
    nonce = broker.workload.nonce()["nonce"]
    answer = broker.workload.release("customers", _evidence(recipient, nonce), nonce, recipient.public_key)
    assert answer["policy_id"] == policy_id
    assert answer["insecure"] is True
    bundle = json.loads(recipient.open(base64.b64decode(answer["sealed"]), bytes.fromhex(nonce)))
    assert [k["version"] for k in bundle["keys"]] == [1, 2]
    # the released material wraps/unwraps like the broker's own key
    kms = BrokerKms("http://testserver", broker.owner.app_id, broker.owner_key, http_client=broker.http)
    wrapped = kms.wrap_data_key("customers", b"d" * 32, b"ad")
    primary = base64.b64decode(bundle["keys"][-1]["material"])
    assert unwrap_key(primary, wrapped.key_id, wrapped.key_version, wrapped.ciphertext, b"ad") == b"d" * 32
    assert _last_event(broker.store)["event"] == "key.released"


def test_attest_answers_a_verifiable_es256_token(broker: Broker) -> None:
    recipient = EphemeralRecipient()
    nonce = broker.workload.nonce()["nonce"]
    answer = broker.workload.attest(_evidence(recipient, nonce), nonce)
    jwks = broker.http.get("/.well-known/jwks.json").json()
    key = jwt.PyJWK(jwks["keys"][0]).key
    claims = jwt.decode(answer["token"], key, algorithms=["ES256"])
    assert claims["claims"]["mr_enclave"] == MEASUREMENT.hex()
    assert claims["insecure"] is True


def _no_key_bytes(response_text: str) -> None:
    assert "sealed" not in response_text
    assert "material" not in response_text


@pytest.mark.parametrize(
    ("headers_fn", "reason"),
    [
        (lambda h: {}, "missing_signature"),
        (lambda h: {**h, "X-Enclaveml-Signature": "00" * 32}, "invalid_signature"),
    ],
)
def test_bad_signatures_are_refused_and_audited(broker: Broker, headers_fn: object, reason: str) -> None:
    signing_key = derive_signing_key(base64.b64decode(broker.owner_key))
    headers = sign_request(broker.owner.app_id, signing_key, "GET", "/v1/keys", b"", now=datetime.now(UTC))
    response = broker.http.get("/v1/keys", headers=headers_fn(headers))  # type: ignore[operator]
    assert response.status_code == 401
    assert response.json()["error"] == reason
    assert set(response.json()) == {"error", "message", "hint"}
    assert _last_event(broker.store) == {"event": "auth.refused", "reason": reason, "method": "GET", "path": "/v1/keys"}


def test_replayed_and_expired_requests_are_refused(broker: Broker) -> None:
    signing_key = derive_signing_key(base64.b64decode(broker.owner_key))
    headers = sign_request(broker.owner.app_id, signing_key, "GET", "/v1/keys", b"", now=datetime.now(UTC))
    assert broker.http.get("/v1/keys", headers=headers).status_code == 200
    replay = broker.http.get("/v1/keys", headers=headers)
    assert replay.status_code == 401
    assert replay.json()["error"] == "replayed_request"
    assert _last_event(broker.store)["reason"] == "replayed_request"
    old = sign_request(
        broker.owner.app_id, signing_key, "GET", "/v1/keys", b"", now=datetime.now(UTC) - timedelta(minutes=10)
    )
    expired = broker.http.get("/v1/keys", headers=old)
    assert expired.status_code == 401
    assert expired.json()["error"] == "expired_timestamp"
    assert _last_event(broker.store)["reason"] == "expired_timestamp"
    with pytest.raises(BrokerAuthError):
        BrokerClient(
            "http://testserver", broker.owner.app_id, base64.b64encode(b"x" * 32).decode(), http_client=broker.http
        ).list_keys()


def test_a_replayed_write_is_refused_before_it_changes_anything(broker: Broker) -> None:
    broker.owner.create_key("customers")
    signing_key = derive_signing_key(base64.b64decode(broker.owner_key))
    path = "/v1/keys/customers/rotate"
    headers = sign_request(broker.owner.app_id, signing_key, "POST", path, b"", now=datetime.now(UTC))
    assert broker.http.post(path, headers=headers).json()["primary_version"] == 2
    replay = broker.http.post(path, headers=headers)
    assert (replay.status_code, replay.json()["error"]) == (401, "replayed_request")
    assert broker.owner.describe_key("customers")["primary_version"] == 2  # the replay rotated nothing
    events = [e.event for e in broker.store.iter_audit()]
    assert events.count("key.rotated") == 1
    assert events[-1] == "auth.refused"


def test_a_failed_request_cannot_be_replayed_either(broker: Broker) -> None:
    broker.owner.create_key("customers")
    signing_key = derive_signing_key(base64.b64decode(broker.owner_key))
    body = json.dumps({"name": "customers"}).encode()
    headers = sign_request(broker.owner.app_id, signing_key, "POST", "/v1/keys", body, now=datetime.now(UTC))
    headers["content-type"] = "application/json"
    assert broker.http.post("/v1/keys", content=body, headers=headers).status_code == 409  # rolled back
    replay = broker.http.post("/v1/keys", content=body, headers=headers)
    assert replay.json()["error"] == "replayed_request"


def test_a_replayed_release_is_refused_as_a_replay(broker: Broker) -> None:
    _setup_key(broker)
    recipient = EphemeralRecipient()
    nonce = broker.workload.nonce()["nonce"]
    body = json.dumps(
        {
            "evidence": base64.b64encode(_evidence(recipient, nonce)).decode(),
            "nonce": nonce,
            "public_key": base64.b64encode(recipient.public_key).decode(),
        }
    ).encode()
    path = "/v1/keys/customers/release"
    signing_key = derive_signing_key(base64.b64decode(broker.workload_key))
    headers = sign_request(broker.workload.app_id, signing_key, "POST", path, body, now=datetime.now(UTC))
    headers["content-type"] = "application/json"
    assert broker.http.post(path, content=body, headers=headers).status_code == 200
    replay = broker.http.post(path, content=body, headers=headers)
    assert (replay.status_code, replay.json()["error"]) == (401, "replayed_request")
    assert "sealed" not in replay.json()
    assert [e.event for e in broker.store.iter_audit()].count("key.released") == 1


def test_a_replayed_nonce_request_is_refused_and_issues_nothing(broker: Broker) -> None:
    signing_key = derive_signing_key(base64.b64decode(broker.workload_key))
    headers = sign_request(broker.workload.app_id, signing_key, "GET", "/v1/nonce", b"", now=datetime.now(UTC))
    first = broker.http.get("/v1/nonce", headers=headers)
    assert first.status_code == 200
    replay = broker.http.get("/v1/nonce", headers=headers)
    assert (replay.status_code, replay.json()["error"]) == (401, "replayed_request")
    assert "nonce" not in replay.json()
    assert _last_event(broker.store) == {
        "event": "auth.refused",
        "reason": "replayed_request",
        "method": "GET",
        "path": "/v1/nonce",
    }


def test_a_refused_release_is_audited_once_and_cannot_be_replayed(broker: Broker) -> None:
    _setup_key(broker, policy=OTHER_POLICY)  # this workload's measurement is not the policy's
    recipient = EphemeralRecipient()
    nonce = broker.workload.nonce()["nonce"]
    body = json.dumps(
        {
            "evidence": base64.b64encode(_evidence(recipient, nonce)).decode(),
            "nonce": nonce,
            "public_key": base64.b64encode(recipient.public_key).decode(),
        }
    ).encode()
    path = "/v1/keys/customers/release"
    signing_key = derive_signing_key(base64.b64decode(broker.workload_key))
    headers = sign_request(broker.workload.app_id, signing_key, "POST", path, body, now=datetime.now(UTC))
    headers["content-type"] = "application/json"
    refused = broker.http.post(path, content=body, headers=headers)
    assert (refused.status_code, refused.json()["error"]) == (403, "policy_refused")
    replay = broker.http.post(path, content=body, headers=headers)
    assert (replay.status_code, replay.json()["error"]) == (401, "replayed_request")
    events = [(e.event, e.detail.get("reason")) for e in broker.store.iter_audit()]
    assert events[-2:] == [("release.refused", "policy_refused"), ("auth.refused", "replayed_request")]
    assert verify_audit_chain(broker.store).ok


def test_every_refusal_is_audited_exactly_once(broker: Broker) -> None:
    _setup_key(broker, policy=OTHER_POLICY)
    with pytest.raises(AttestationError):  # POST /v1/attest runs in a worker thread
        broker.workload.attest(b"not evidence", broker.workload.nonce()["nonce"])
    recipient = EphemeralRecipient()
    nonce = broker.workload.nonce()["nonce"]
    with pytest.raises(BrokerRefused):  # the release runs on the event loop
        broker.workload.release("customers", _evidence(recipient, nonce), nonce, recipient.public_key)
    with pytest.raises(BrokerAuthError):
        broker.client(broker.workload.app_id, base64.b64encode(b"w" * 32).decode()).nonce()
    refusals = [e.event for e in broker.store.iter_audit() if e.event.endswith(".refused")]
    assert sorted(refusals) == ["attest.refused", "auth.refused", "release.refused"]
    assert verify_audit_chain(broker.store).ok


def test_disabling_an_app_takes_effect_at_once(broker: Broker) -> None:
    assert broker.owner.list_keys() == []  # the owner's key is now cached
    broker.store.disable_app(broker.owner.app_id)
    with pytest.raises(BrokerAuthError):
        broker.owner.list_keys()


def test_a_new_policy_is_used_at_once_and_a_revoked_one_never(broker: Broker) -> None:
    first = _setup_key(broker, OTHER_POLICY)
    assert error_reason(_attempt(broker, "customers")) == "policy_refused"  # policy list now cached
    second = broker.owner.register_policy("p2", SIM_POLICY, ["customers"])["policy_id"]
    recipient = EphemeralRecipient()
    nonce = broker.workload.nonce()["nonce"]
    answer = broker.workload.release("customers", _evidence(recipient, nonce), nonce, recipient.public_key)
    assert answer["policy_id"] == second != first
    broker.owner.revoke_policy(second)
    assert error_reason(_attempt(broker, "customers")) == "policy_refused"


def test_workload_cannot_call_owner_routes(broker: Broker) -> None:
    with pytest.raises(BrokerRefused) as caught:
        broker.workload.create_key("stolen")
    assert error_reason(caught.value) == "forbidden_role"
    assert _last_event(broker.store)["event"] == "authz.refused"
    with pytest.raises(BrokerRefused):
        broker.owner.nonce()


def _attempt(
    b: Broker, key: str, *, measurement: bytes = MEASUREMENT, bind_other: bool = False
) -> BrokerRefused | AttestationError:
    recipient, other = EphemeralRecipient(), EphemeralRecipient()
    nonce = b.workload.nonce()["nonce"]
    evidence = _evidence(other if bind_other else recipient, nonce, measurement)
    with pytest.raises((BrokerRefused, AttestationError, KeyNotFound)) as caught:
        b.workload.release(key, evidence, nonce, recipient.public_key)
    return caught.value  # type: ignore[return-value]


def test_release_attacks_are_refused_with_reason_and_audited(broker: Broker) -> None:
    policy_id = _setup_key(broker)
    broker.owner.create_key("payroll")
    broker.owner.register_policy("other", OTHER_POLICY, ["payroll"])
    broker.owner.create_key("unbound")
    # key covered only by a policy for another workload
    refused = _attempt(broker, "payroll")
    assert error_reason(refused) == "policy_refused"
    assert "mr_enclave" in refused.what
    assert _last_event(broker.store)["event"] == "release.refused"
    # evidence for another measurement
    refused = _attempt(broker, "customers", measurement=OTHER_MEASUREMENT)
    assert error_reason(refused) == "policy_refused"
    assert "mr_enclave" in refused.what
    assert _last_event(broker.store)["failed_checks"] == ["mr_enclave"]
    # no policy at all for the key
    assert error_reason(_attempt(broker, "unbound")) == "key_not_bound"
    # evidence not bound to the presented public key
    refused = _attempt(broker, "customers", bind_other=True)
    assert isinstance(refused, AttestationError)
    assert refused.reason == "binding_mismatch"
    assert _last_event(broker.store)["reason"] == "binding_mismatch"
    # revoked policy
    broker.owner.revoke_policy(policy_id)
    assert error_reason(_attempt(broker, "customers")) == "policy_revoked"
    assert verify_audit_chain(broker.store).ok


def test_simulation_refused_by_a_hardware_policy(broker: Broker) -> None:
    _setup_key(broker, NO_SIM_POLICY)
    refused = _attempt(broker, "customers")
    assert "allow_simulation" in refused.what


def test_reused_stale_and_unknown_nonces(broker: Broker) -> None:
    _setup_key(broker)
    recipient = EphemeralRecipient()
    nonce = broker.workload.nonce()["nonce"]
    evidence = _evidence(recipient, nonce)
    broker.workload.release("customers", evidence, nonce, recipient.public_key)
    with pytest.raises(AttestationError) as caught:
        broker.workload.release("customers", evidence, nonce, recipient.public_key)
    assert caught.value.reason == "reused_nonce"
    assert _last_event(broker.store) == {"event": "nonce.refused", "reason": "reused_nonce"}
    with pytest.raises(AttestationError) as caught:
        broker.workload.release("customers", evidence, "00" * 32, recipient.public_key)
    assert caught.value.reason == "unknown_nonce"
    issued = broker.store.issue_nonce("attest", timedelta(seconds=1), now=datetime.now(UTC) - timedelta(minutes=1))
    stale = base64.urlsafe_b64decode(issued.value + "=").hex()
    with pytest.raises(AttestationError) as caught:
        broker.workload.release("customers", _evidence(recipient, stale), stale, recipient.public_key)
    assert caught.value.reason == "stale_nonce"


def test_a_refused_attempt_uses_up_its_nonce(broker: Broker) -> None:
    _setup_key(broker)
    recipient = EphemeralRecipient()
    nonce = broker.workload.nonce()["nonce"]
    with pytest.raises(BrokerRefused) as refused:
        broker.workload.release(
            "customers", _evidence(recipient, nonce, OTHER_MEASUREMENT), nonce, recipient.public_key
        )
    assert error_reason(refused.value) == "policy_refused"
    with pytest.raises(AttestationError) as again:  # right evidence, same nonce: too late
        broker.workload.release("customers", _evidence(recipient, nonce), nonce, recipient.public_key)
    assert again.value.reason == "reused_nonce"
    assert "key.released" not in [e.event for e in broker.store.iter_audit()]


def test_refusals_carry_no_key_bytes(broker: Broker) -> None:
    _setup_key(broker)
    recipient = EphemeralRecipient()
    nonce = broker.workload.nonce()["nonce"]
    evidence = _evidence(recipient, nonce, OTHER_MEASUREMENT)
    body = {
        "evidence": base64.b64encode(evidence).decode(),
        "nonce": nonce,
        "public_key": base64.b64encode(recipient.public_key).decode(),
    }
    unsigned = broker.http.post("/v1/keys/customers/release", content=json.dumps(body).encode())
    assert unsigned.status_code == 401
    _no_key_bytes(unsigned.text)
    with pytest.raises(BrokerRefused) as caught:
        broker.workload.request("POST", "/v1/keys/customers/release", body)
    assert "sealed" not in caught.value.what
    assert error_reason(caught.value) == "policy_refused"
