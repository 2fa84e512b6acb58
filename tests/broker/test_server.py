"""A real broker over TLS on 127.0.0.1 (self-signed certificate), driven by the CLI and BrokerClient."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enclaveml.attestation.sim import SimulationKey, create_sim_evidence
from enclaveml.broker.audit import verify_audit_chain
from enclaveml.broker.client import BrokerClient, BrokerRefused, error_reason
from enclaveml.broker.root_key import read_root_key_file
from enclaveml.broker.server import BrokerServer, make_self_signed
from enclaveml.broker.store import BrokerStore
from enclaveml.crypto.key_release import EphemeralRecipient
from enclaveml.errors import ConfigError

ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
MEASUREMENT = bytes(range(48))
POLICY = f'name = "sim-job"\ntee = ["sgx"]\nallow_simulation = true\nmr_enclave = ["{MEASUREMENT.hex()}"]\n'


def run(env: dict[str, str], *args: str, expect: int = 0) -> str:
    done = subprocess.run([ENCLAVEML, *args], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == expect, (args, done.returncode, done.stderr)
    return done.stdout


def _credentials(stdout: str) -> tuple[str, str]:
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in stdout.strip().splitlines())}
    app_id = next(v for k, v in fields.items() if k.endswith("app id"))
    api_key = next(v for k, v in fields.items() if k.endswith("api key"))
    return app_id, api_key


class Running:
    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.root_key = tmp_path / "root.key"
        self.db = f"sqlite:///{tmp_path / 'broker.db'}"
        self.env = {**os.environ, "ENCLAVEML_HOME": str(self.home), "COLUMNS": "200"}
        for name in ("ENCLAVEML_APP_ID", "ENCLAVEML_API_KEY", "ENCLAVEML_KMS", "ENCLAVEML_BROKER_URL"):
            self.env.pop(name, None)
        out = run(self.env, "broker", "init", "--db", self.db, "--root-key-file", str(self.root_key))
        self.admin = _credentials(out)
        self.cert, self.key = make_self_signed(tmp_path / "tls")
        self.store = BrokerStore(self.db, read_root_key_file(self.root_key))
        self.server = BrokerServer(self.store, "127.0.0.1", 0, self.cert, self.key).start()
        self.env |= {"ENCLAVEML_BROKER_URL": self.server.url, "ENCLAVEML_BROKER_CA": str(self.cert)}

    def as_app(self, app_id: str, api_key: str) -> dict[str, str]:
        return {**self.env, "ENCLAVEML_APP_ID": app_id, "ENCLAVEML_API_KEY": api_key}

    def client(self, app_id: str, api_key: str) -> BrokerClient:
        return BrokerClient(self.server.url, app_id, api_key, ca=str(self.cert))

    def close(self) -> None:
        self.server.stop()
        self.store.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Running]:
    running = Running(tmp_path)
    yield running
    running.close()


def test_cli_flow_over_tls_then_attested_release(broker: Running, tmp_path: Path) -> None:
    owner = _credentials(run(broker.env, "broker", "enroll", "--name", "owner", "--role", "owner"))
    workload = _credentials(run(broker.env, "broker", "enroll", "--name", "job", "--role", "workload"))
    as_owner = broker.as_app(*owner)
    run(as_owner, "kms", "--backend", "broker", "create-key", "customers")
    assert "customers" in run(as_owner, "kms", "--backend", "broker", "list")
    plain = tmp_path / "people.csv"
    plain.write_bytes(b"name,age\nada,36\n" * 1000)
    run(as_owner, "encrypt", "--kms", "broker", str(plain), str(tmp_path / "people.eml"), "--key", "customers")
    run(as_owner, "decrypt", "--kms", "broker", str(tmp_path / "people.eml"), str(tmp_path / "back.csv"))
    assert (tmp_path / "back.csv").read_bytes() == plain.read_bytes()
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(POLICY)
    policy_id = run(as_owner, "policy", "register", str(policy_file), "--key", "customers").strip()
    assert policy_id.startswith("p-")

    with broker.client(*workload) as client:
        recipient = EphemeralRecipient()
        nonce = client.nonce()["nonce"]
        raw_nonce = bytes.fromhex(nonce)
        evidence = create_sim_evidence(
            SimulationKey.generate(), MEASUREMENT, recipient.binding(raw_nonce), raw_nonce, datetime.now(UTC)
        )
        answer = client.release("customers", evidence, nonce, recipient.public_key)
        bundle = json.loads(recipient.open(base64.b64decode(answer["sealed"]), raw_nonce))
        assert bundle["keys"][0]["name"] == "customers"
        assert len(base64.b64decode(bundle["keys"][0]["material"])) == 32
        with pytest.raises(BrokerRefused) as caught:
            client.create_key("stolen")
        assert error_reason(caught.value) == "forbidden_role"
    # a workload's credentials cannot use the KMS either
    run(broker.as_app(*workload), "kms", "--backend", "broker", "list", expect=3)
    # wrong api key: 401 -> exit 5
    run(broker.as_app(owner[0], base64.b64encode(b"x" * 32).decode()), "kms", "--backend", "broker", "list", expect=5)
    assert verify_audit_chain(broker.store).ok
    run(broker.env, "broker", "audit", "verify", "--db", broker.db, "--root-key-file", str(broker.root_key))


def test_audit_verify_names_a_tampered_row(broker: Running) -> None:
    path = broker.db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.execute('UPDATE audit_log SET detail = \'{"name":"mallory","role":"admin"}\' WHERE seq = 1')
    done = subprocess.run(
        [ENCLAVEML, "broker", "audit", "verify", "--db", broker.db, "--root-key-file", str(broker.root_key)],
        env=broker.env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 4
    assert "entry 1" in done.stderr


def test_unreachable_broker_is_a_config_error_naming_the_url() -> None:
    with (
        BrokerClient("https://127.0.0.1:9", "a-0000000000000000", base64.b64encode(b"k" * 32).decode()) as client,
        pytest.raises(ConfigError, match=r"127\.0\.0\.1:9"),
    ):
        client.list_keys()
