"""Key sources of the model server, each against its real peer.

``LocalKeys`` / ``WrapKeyFile`` read a real key store and wrap-key file; ``SessionKeys`` takes a
``Session`` built as ``enclaveml run`` builds it; ``BrokerKeys`` attests (simulated TEE) to the
real key broker over TLS on 127.0.0.1; ``SecretProvKeys`` attests over RA-TLS to the broker
package's real Gramine secret provisioning server. Every source then opens a model through
``ModelRepository``, and no key byte may show in a ``repr``, a log line or an error.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from enclaveml.attestation.claims import Claims
from enclaveml.attestation.evidence import verify_evidence
from enclaveml.attestation.policy import Policy
from enclaveml.attestation.ratls import Evidence
from enclaveml.attestation.sim import SimulationKey, measure_workload
from enclaveml.attestation.tee import SimulatedTee
from enclaveml.broker.secret_prov import SecretProvisioningServer
from enclaveml.broker.server import BrokerServer, make_self_signed
from enclaveml.broker.store import BrokerStore
from enclaveml.errors import AttestationError, ConfigError, PolicyError
from enclaveml.kms import LocalKms
from enclaveml.kms.broker import BrokerKms
from enclaveml.runtime.session import SESSION_FD_ENV, ReleasedKey, Session
from enclaveml.serving.keys import (
    BrokerKeys,
    CombinedKeys,
    LocalKeys,
    SecretProvKeys,
    SessionKeys,
    WrapKeyFile,
)
from enclaveml.serving.repository import ModelRepository, publish_eml_model, publish_pf_model

HOST = "127.0.0.1"


def serves(repo: ModelRepository, name: str = "sklearn") -> bool:
    rows = np.zeros((2, 4), np.float32)
    return repo.get(name).runtime.run({"input": rows})["label"].shape == (2,)


# -- local keys and wrap-key files --------------------------------------------------------------


def test_local_keys_hand_out_the_kms_and_an_explicit_wrap_key_file(
    tmp_path: Path, local_kms: LocalKms, pf_wrap_key: bytes
) -> None:
    assert LocalKeys(local_kms).key_wrapper_for_eml() is local_kms
    with pytest.raises(ConfigError, match="need a 16-byte wrap key; this local key source has none"):
        LocalKeys(local_kms).pf_wrap_key()
    (tmp_path / "wrap_key").write_bytes(pf_wrap_key)
    keys = LocalKeys(local_kms, pf_wrap_key_file=tmp_path / "wrap_key")
    assert keys.pf_wrap_key() == pf_wrap_key
    assert pf_wrap_key.hex() not in repr(keys)


def test_wrap_key_file_holds_only_a_pf_key(tmp_path: Path, pf_wrap_key: bytes) -> None:
    path = tmp_path / "wrap_key"
    path.write_bytes(pf_wrap_key)
    assert WrapKeyFile(path).pf_wrap_key() == pf_wrap_key
    with pytest.raises(ConfigError, match=r"EML model files .* need a KMS or released keys") as caught:
        WrapKeyFile(path).key_wrapper_for_eml()
    assert "CombinedKeys" in caught.value.diagnostics()
    path.write_bytes(pf_wrap_key.hex().encode())  # hex text, as Gramine 1.0's /dev/attestation took it
    with pytest.raises(ConfigError, match="holds 32 bytes, not a 16-byte wrap key"):
        WrapKeyFile(path).pf_wrap_key()
    with pytest.raises(ConfigError, match=r"cannot read the wrap key file .*missing"):
        WrapKeyFile(tmp_path / "missing").pf_wrap_key()


def test_combined_keys_take_each_format_from_its_source(
    tmp_path: Path, local_kms: LocalKms, pf_wrap_key: bytes
) -> None:
    (tmp_path / "wrap_key").write_bytes(pf_wrap_key)
    keys = CombinedKeys(LocalKeys(local_kms), WrapKeyFile(tmp_path / "wrap_key"))
    assert keys.key_wrapper_for_eml() is local_kms
    assert keys.pf_wrap_key() == pf_wrap_key


# -- the session of `enclaveml run` ---------------------------------------------------------------


def test_session_keys_open_models_sealed_with_the_released_key(tmp_path: Path, sklearn_model_bytes: bytes) -> None:
    released = ReleasedKey("models", "k-00000000000000ab", 1, os.urandom(32))
    owner = Session("broker", [released], {})  # the same key, as the owner's broker holds it
    publish_eml_model(tmp_path / "sklearn", 1, sklearn_model_bytes, owner, "models")
    keys = SessionKeys(Session("broker", [released], {"tee": "sim"}))
    with ModelRepository({"sklearn": tmp_path / "sklearn"}, keys) as repo:
        assert serves(repo)
    assert released.material.hex() not in repr(keys)


def test_session_keys_derive_the_pf_key_the_owner_derived(tmp_path: Path, sklearn_model_bytes: bytes) -> None:
    released = ReleasedKey("models", "k-00000000000000ab", 1, os.urandom(32))
    owner_wrap_key = Session("broker", [released], {}).gramine_pf_key("models")  # `kms gramine-pf-key`
    publish_pf_model(tmp_path / "sklearn", 1, sklearn_model_bytes, owner_wrap_key)
    keys = SessionKeys(Session("broker", [released], {"tee": "sim"}))
    with ModelRepository({"sklearn": tmp_path / "sklearn"}, keys) as repo:
        assert serves(repo)
        assert repo.get("sklearn").source_format == "gramine-pf"


def test_session_keys_with_several_keys_need_the_pf_key_named() -> None:
    keys = [ReleasedKey(name, f"k-00000000000000a{i}", 1, os.urandom(32)) for i, name in enumerate(("a", "b"))]
    with pytest.raises(ConfigError, match="which released key"):
        SessionKeys(Session("broker", keys, {})).pf_wrap_key()
    assert len(SessionKeys(Session("broker", keys, {}), pf_key="b").pf_wrap_key()) == 16


def test_local_keys_derive_the_pf_key_from_a_kms_key(local_kms: LocalKms) -> None:
    assert LocalKeys(local_kms, pf_key="models").pf_wrap_key() == local_kms.gramine_pf_key("models")
    with pytest.raises(ConfigError, match="this local key source has none") as caught:
        LocalKeys(local_kms).pf_wrap_key()
    assert "pf_key=NAME" in caught.value.hint


def test_session_keys_outside_enclaveml_run_say_how_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import enclaveml.runtime.session as session_module

    monkeypatch.delenv(SESSION_FD_ENV, raising=False)
    monkeypatch.setattr(session_module, "_current", None)
    with pytest.raises(ConfigError, match="not started by `enclaveml run`"):
        SessionKeys().key_wrapper_for_eml()


# -- the key broker: the server attests itself -------------------------------------------------------


@dataclass
class LiveBroker:
    url: str
    ca: Path
    owner: BrokerKms
    app_id: str
    api_key: str
    tee_key: SimulationKey
    measurement: bytes

    def tee(self, measurement: bytes | None = None) -> SimulatedTee:
        return SimulatedTee(self.tee_key, measurement or self.measurement, b"")


@pytest.fixture
def live_broker(tmp_path: Path) -> Iterator[LiveBroker]:
    """The broker over TLS with SQLite; an owner holding key ``models``; a policy for the server's measurement."""
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "serve.py").write_text("# the model server's code\n")
    measurement = measure_workload([Path("serve.py")], ["enclaveml", "serve"], root=tmp_path / "server")
    cert, key = make_self_signed(tmp_path / "tls")
    with BrokerStore(f"sqlite:///{tmp_path / 'broker.db'}", os.urandom(32)) as store:
        owner_app = store.enroll_app("model-owner", "owner")
        server_app = store.enroll_app("model-server", "workload")
        with BrokerServer(store, port=0, tls_cert=cert, tls_key=key) as server:
            owner = BrokerKms(server.url, owner_app.app.app_id, owner_app.api_key, ca=str(cert))
            owner.create_key("models")
            policy = f'name = "server"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement.hex()}"]\n'
            owner.client.register_policy("model-server", policy, ["models"])
            api_key = base64.b64encode(server_app.api_key).decode()
            yield LiveBroker(
                server.url, cert, owner, server_app.app.app_id, api_key, SimulationKey.generate(), measurement
            )
            owner.close()


def test_broker_keys_attest_and_open_the_model(
    tmp_path: Path, live_broker: LiveBroker, sklearn_model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_eml_model(tmp_path / "models" / "sklearn", 1, sklearn_model_bytes, live_broker.owner, "models")
    monkeypatch.setenv("ENCLAVEML_APP_ID", live_broker.app_id)  # credentials from the environment, as `run`
    monkeypatch.setenv("ENCLAVEML_API_KEY", live_broker.api_key)
    keys = BrokerKeys(live_broker.url, ["models"], tee=live_broker.tee(), ca=str(live_broker.ca))
    with ModelRepository({"sklearn": tmp_path / "models" / "sklearn"}, keys) as repo:
        assert serves(repo)
    assert keys.insecure  # the broker accepted simulated evidence, and says so
    session = keys.key_wrapper_for_eml()
    assert isinstance(session, Session)
    assert session.key_names() == ["models"]
    assert keys.key_wrapper_for_eml() is session  # attested once, kept in memory
    text = repr(keys)
    assert "released=True" in text
    assert base64.b64encode(session.key("models")).decode() not in text
    assert session.key("models").hex() not in text
    keys.refresh()
    assert keys.key_wrapper_for_eml() is not session  # attests again


def test_a_modified_server_gets_no_keys_and_stays_not_ready(
    tmp_path: Path, live_broker: LiveBroker, sklearn_model_bytes: bytes
) -> None:
    publish_eml_model(tmp_path / "models" / "sklearn", 1, sklearn_model_bytes, live_broker.owner, "models")
    other = bytes(48)
    keys = BrokerKeys(
        live_broker.url, ["models"], tee=live_broker.tee(other), app_id=live_broker.app_id,
        api_key=live_broker.api_key, ca=str(live_broker.ca),
    )  # fmt: skip
    with pytest.raises((AttestationError, PolicyError), match="mr_enclave"):
        keys.key_wrapper_for_eml()
    with ModelRepository({"sklearn": tmp_path / "models" / "sklearn"}, keys) as repo:
        assert not repo.ready()
        assert "mr_enclave" in repo.not_ready_reasons()["sklearn"]


def test_broker_keys_without_credentials_say_which_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCLAVEML_APP_ID", raising=False)
    monkeypatch.delenv("ENCLAVEML_API_KEY", raising=False)
    keys = BrokerKeys("https://127.0.0.1:1", ["models"], tee=SimulatedTee(SimulationKey.generate(), bytes(48), b""))
    with pytest.raises(ConfigError, match="set ENCLAVEML_APP_ID and ENCLAVEML_API_KEY"):
        keys.key_wrapper_for_eml()
    with pytest.raises(ConfigError, match="set ENCLAVEML_APP_ID and ENCLAVEML_API_KEY"):
        keys.pf_wrap_key()  # derived from a released key: it attests first


# -- Gramine secret provisioning ------------------------------------------------------------------------


@dataclass
class SecretProv:
    port: int
    ca: Path
    tee_key: SimulationKey
    measurement: bytes


def start_secret_prov(tmp_path: Path, secret: bytes) -> tuple[SecretProvisioningServer, SecretProv]:
    cert, key = make_self_signed(tmp_path / "secret-prov-tls")
    tee_key = SimulationKey.generate()
    (tmp_path / "server").mkdir(exist_ok=True)
    (tmp_path / "server" / "serve.py").write_text("# the model server's code\n")
    measurement = measure_workload([Path("serve.py")], [], root=tmp_path / "server")
    policy = Policy(name="model-server", allow_simulation=True, mr_enclave=(measurement,))

    def verifier(evidence: Evidence, now: datetime) -> Claims:
        return verify_evidence(evidence.raw, now=now, collateral=None, sim_trusted_keys=[tee_key.public_key]).claims

    def decide(claims: Claims) -> bytes:
        policy.verify(claims, now=datetime.now(UTC))
        return secret

    server = SecretProvisioningServer(
        HOST, 0, cert_pem=cert.read_bytes(), key_pem=key.read_bytes(), verifier=verifier, decide=decide, timeout=10
    )
    server.start()
    return server, SecretProv(server.port, cert, tee_key, measurement)


@pytest.fixture
def secret_prov(tmp_path: Path, pf_wrap_key: bytes) -> Iterator[SecretProv]:
    server, running = start_secret_prov(tmp_path, pf_wrap_key)
    yield running
    server.shutdown()


def test_secret_provisioning_delivers_the_wrap_key_to_an_attested_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret_prov: SecretProv, local_kms: LocalKms,
    pf_wrap_key: bytes, sklearn_model_bytes: bytes,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    publish_pf_model(Path("models/sklearn"), 1, sklearn_model_bytes, pf_wrap_key)
    tee = SimulatedTee(secret_prov.tee_key, secret_prov.measurement, b"")
    pf = SecretProvKeys(HOST, secret_prov.port, tee=tee, ca=secret_prov.ca, timeout=10)
    keys = CombinedKeys(LocalKeys(local_kms), pf)
    with ModelRepository({"sklearn": Path("models/sklearn")}, keys) as repo:
        assert repo.get("sklearn").source_format == "gramine-pf"
        assert serves(repo)
    assert pf.pf_wrap_key() == pf_wrap_key
    assert pf_wrap_key.hex() not in repr(keys)
    with pytest.raises(ConfigError, match="secret provisioning delivers only a Gramine PF key"):
        pf.key_wrapper_for_eml()


def test_secret_provisioning_refuses_another_workload(secret_prov: SecretProv) -> None:
    tee = SimulatedTee(secret_prov.tee_key, bytes(48), b"")
    pf = SecretProvKeys(HOST, secret_prov.port, tee=tee, ca=secret_prov.ca, timeout=10)
    with pytest.raises(AttestationError, match="refused to provision the secret") as caught:
        pf.pf_wrap_key()
    assert caught.value.reason == "secret_prov_refused"


def test_a_secret_that_is_not_a_16_byte_key_is_refused(tmp_path: Path) -> None:
    server, running = start_secret_prov(tmp_path, os.urandom(32))  # e.g. a broker's AES-256 key
    try:
        tee = SimulatedTee(running.tee_key, running.measurement, b"")
        pf = SecretProvKeys(HOST, running.port, tee=tee, ca=running.ca, timeout=10)
        with pytest.raises(ConfigError, match="provisioned a 32-byte secret, not a 16-byte wrap key"):
            pf.pf_wrap_key()
    finally:
        server.shutdown()


def test_the_brokers_secret_provisioning_sends_the_wrap_key_the_owner_derived(
    tmp_path: Path, sklearn_model_bytes: bytes
) -> None:
    """CCZoo's flow on our broker: the owner derives the PF key of a broker key and seals the model
    with it; the server's enclave receives the same 16 bytes over RA-TLS secret provisioning."""
    (tmp_path / "server").mkdir()
    measurement = measure_workload([], ["gramine", "serve"], root=tmp_path / "server")
    cert, key = make_self_signed(tmp_path / "tls")
    with BrokerStore(f"sqlite:///{tmp_path / 'broker.db'}", os.urandom(32)) as store:
        owner_app = store.enroll_app("model-owner", "owner")
        with BrokerServer(
            store, port=0, tls_cert=cert, tls_key=key, secret_prov_port=0, secret_prov_key="resnet"
        ) as server:
            assert server.secret_prov is not None
            owner = BrokerKms(server.url, owner_app.app.app_id, owner_app.api_key, ca=str(cert))
            owner.create_key("resnet")
            policy = f'name = "server"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement.hex()}"]\n'
            owner.client.register_policy("model-server", policy, ["resnet"])
            wrap_key = owner.gramine_pf_key("resnet")  # `enclaveml kms --backend broker gramine-pf-key`
            owner.close()
            publish_pf_model(tmp_path / "models" / "resnet", 1, sklearn_model_bytes, wrap_key)

            tee = SimulatedTee(SimulationKey.generate(), measurement, b"")
            keys = SecretProvKeys(HOST, server.secret_prov.port, tee=tee, ca=str(cert), timeout=10)
            assert keys.pf_wrap_key() == wrap_key
            with ModelRepository({"resnet": tmp_path / "models" / "resnet"}, keys) as repo:
                assert serves(repo, "resnet")
            stranger = SimulatedTee(SimulationKey.generate(), bytes(48), b"")
            with pytest.raises(AttestationError):
                SecretProvKeys(HOST, server.secret_prov.port, tee=stranger, ca=str(cert), timeout=10).pf_wrap_key()
        events = [entry.event for entry in store.iter_audit()]
    assert "key.gramine_pf_key" in events
