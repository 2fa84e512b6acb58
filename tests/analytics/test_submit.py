"""``enclaveml submit``: four modes, rendered pod templates, the spark-submit command, job records.

The k8s modes are tested structurally (no cluster here): the YAML parses, the fields a pod
needs are present and carry the options through, the api key is only a Secret reference,
and the spark-submit argv has the security confs and the template paths. ``local`` and
``sim`` run end to end: real subprocesses, and for ``sim`` the real key broker over TLS on
127.0.0.1 (``BrokerServer``, SQLite, self-signed certificate).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from enclaveml.analytics.submit import (
    MODES,
    SGX_RESOURCES,
    SPARK_SECURITY_CONFS,
    TEES,
    SubmitOptions,
    execute,
    plan_submit,
    render_pod_template,
)
from enclaveml.broker.server import BrokerServer, make_self_signed
from enclaveml.broker.store import BrokerStore
from enclaveml.cli import submit_cmds
from enclaveml.crypto import encrypt_file
from enclaveml.errors import ConfigError
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.kms.broker import BrokerKms
from enclaveml.runtime.run import EXIT_REFUSED, sim_measurement

PASSPHRASE = "submit test passphrase 51c0"
ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
K8S = SubmitOptions(
    mode="k8s-cluster",
    app="local:///app/query.py",
    args=("--input", "people.csv.eml"),
    master="k8s://https://10.0.0.1:6443",
    image="registry.example/enclaveml-job:1.0",
    broker_url="https://broker.example:8443",
    policy_id="p-0123",
    keys=("customers", "models"),
    ca="ca.pem",
    executors=3,
    executor_memory="4g",
    sgx_epc="2Gi",
    event_log_dir="file:///var/spark-events",
    templates_dir=Path("/tmp/tpl"),
)


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _confs(argv: tuple[str, ...]) -> dict[str, str]:
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--conf"]
    return dict(p.split("=", 1) for p in pairs)


# -- k8s modes: rendered, not run --------------------------------------------------------------


def test_cluster_mode_renders_sgx_pod_templates_that_carry_the_options() -> None:
    plan = plan_submit(K8S)
    assert list(plan.templates) == [Path("/tmp/tpl/query-driver.yaml"), Path("/tmp/tpl/query-executor.yaml")]
    driver, executor = (yaml.safe_load(text) for text in plan.templates.values())
    for pod, role in ((driver, "driver"), (executor, "executor")):
        assert pod["apiVersion"] == "v1"
        assert pod["kind"] == "Pod"
        (container,) = pod["spec"]["containers"]
        assert container["name"] == f"spark-{role}"
        assert container["image"] == "registry.example/enclaveml-job:1.0"
        for bound in ("requests", "limits"):
            resources = container["resources"][bound]
            assert resources["sgx.intel.com/epc"] == "2Gi"
            assert resources["sgx.intel.com/enclave"] == 1
            assert resources["sgx.intel.com/provision"] == 1
        env = _env(pod)
        assert env["ENCLAVEML_ATTESTATION"] == "true"
        assert env["ENCLAVEML_TEE"] == "sgx"
        assert env["ENCLAVEML_BROKER_URL"] == "https://broker.example:8443"
        assert env["ENCLAVEML_POLICY_ID"] == "p-0123"
        assert env["ENCLAVEML_KEYS"] == "customers,models"
        assert env["ENCLAVEML_API_KEY"] == {"secretKeyRef": {"name": "enclaveml-workload", "key": "api_key"}}
        assert env["ENCLAVEML_APP_ID"] == {"secretKeyRef": {"name": "enclaveml-workload", "key": "app_id"}}
        assert pod["spec"]["volumes"][0]["secret"]["secretName"] == "enclaveml-workload"
    assert executor["spec"]["containers"][0]["resources"]["limits"]["memory"] == "4Gi"
    assert driver["spec"]["serviceAccountName"] == "enclaveml-spark"


def test_sim_and_tdx_pods_get_no_sgx_devices_and_tdx_gets_its_runtime_class() -> None:
    sim = render_pod_template(replace(K8S, tee="sim"), "executor")
    tdx = render_pod_template(replace(K8S, tee="tdx"), "executor")
    for pod in (sim, tdx):
        resources = pod["spec"]["containers"][0]["resources"]
        assert not [r for bound in resources.values() for r in bound if r.startswith("sgx.intel.com/")]
    assert _env(sim)["ENCLAVEML_TEE"] == "sim"
    assert "runtimeClassName" not in sim["spec"]
    assert tdx["spec"]["runtimeClassName"] == "kata-qemu-tdx"


def test_no_secret_value_is_ever_written_into_a_template() -> None:
    plan = plan_submit(K8S)
    for text in plan.templates.values():
        pod = yaml.safe_load(text)
        api_key = _env(pod)["ENCLAVEML_API_KEY"]
        assert set(api_key) == {"secretKeyRef"}  # a reference, never a value
        assert "api_key" not in [e["name"] for e in pod["spec"]["containers"][0]["env"] if "value" in e]


def test_spark_submit_argv_has_the_security_confs_and_the_template_paths() -> None:
    plan = plan_submit(K8S)
    argv = plan.argv
    assert argv[:5] == ("spark-submit", "--master", "k8s://https://10.0.0.1:6443", "--deploy-mode", "cluster")
    assert argv[-3:] == ("local:///app/query.py", "--input", "people.csv.eml")
    confs = _confs(argv)
    assert SPARK_SECURITY_CONFS.items() <= confs.items()
    assert confs["spark.authenticate"] == "true"
    assert confs["spark.network.crypto.enabled"] == "true"
    assert confs["spark.io.encryption.enabled"] == "true"
    assert confs["spark.ui.enabled"] == "false"
    assert confs["spark.kubernetes.driver.podTemplateFile"] == "/tmp/tpl/query-driver.yaml"
    assert confs["spark.kubernetes.executor.podTemplateFile"] == "/tmp/tpl/query-executor.yaml"
    assert confs["spark.kubernetes.container.image"] == "registry.example/enclaveml-job:1.0"
    assert confs["spark.executor.instances"] == "3"
    assert confs["spark.eventLog.enabled"] == "true"
    assert confs["spark.eventLog.dir"] == "file:///var/spark-events"


def test_client_mode_runs_the_driver_here_with_only_an_executor_template() -> None:
    plan = plan_submit(replace(K8S, mode="k8s-client", app="query.py", driver_host="10.0.0.9"))
    assert plan.argv[3:5] == ("--deploy-mode", "client")
    confs = _confs(plan.argv)
    assert "spark.kubernetes.driver.podTemplateFile" not in confs
    assert confs["spark.driver.host"] == "10.0.0.9"
    assert list(plan.templates) == [Path("/tmp/tpl/query-executor.yaml")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"master": "https://10.0.0.1:6443"}, "needs a Kubernetes master"),
        ({"image": None}, "needs the signed workload image"),
        ({"app": "query.py"}, "must be inside the signed image"),
        ({"policy_id": None}, "policy they attest under"),
        ({"broker_url": None}, "need the key broker"),
        ({"conf": (("spark.authenticate", "false"),)}, "would weaken Spark's security"),
        ({"executor_memory": "lots"}, "is not like 2g"),
    ],
)
def test_bad_k8s_options_are_one_clear_error(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_submit(replace(K8S, **change))


def test_unsafe_no_attestation_pods_carry_no_broker_settings() -> None:
    plan = plan_submit(replace(K8S, attestation=False, broker_url=None, policy_id=None))
    for text in plan.templates.values():
        env = _env(yaml.safe_load(text))
        assert env == {"ENCLAVEML_ATTESTATION": "false", "ENCLAVEML_TEE": "sgx"}


def test_cli_choices_match_the_module() -> None:
    assert submit_cmds.MODES == MODES
    assert submit_cmds.TEES == TEES
    assert SGX_RESOURCES == ("sgx.intel.com/epc", "sgx.intel.com/enclave", "sgx.intel.com/provision")


def _enclaveml(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ENCLAVEML, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("ENCLAVEML_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python`: this venv
        "ENCLAVEML_HOME": str(tmp_path / "home"),
        "COLUMNS": "200",
    }


def test_dry_run_prints_templates_and_command_and_writes_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    args = ["submit", "--mode", "k8s-cluster", "--dry-run", "--master", "k8s://https://10.0.0.1:6443"]
    args += ["--image", "reg/job:1", "--broker", "https://b:8443", "--policy-id", "p-1", "--keys", "customers"]
    done = _enclaveml([*args, "local:///app/job.py", "x"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    documents = done.stdout.split("---\n")
    assert len(documents) == 3
    driver, executor = (yaml.safe_load(d) for d in documents[:2])
    assert documents[0].startswith(f"# {tmp_path / 'home' / 'pod-templates' / 'job-driver.yaml'}\n")
    assert driver["spec"]["containers"][0]["name"] == "spark-driver"
    assert executor["spec"]["containers"][0]["name"] == "spark-executor"
    assert documents[2].startswith("spark-submit --master k8s://https://10.0.0.1:6443 --deploy-mode cluster ")
    assert documents[2].rstrip().endswith(" local:///app/job.py x")
    assert not (tmp_path / "home").exists()


def test_k8s_without_spark_submit_is_a_usage_error(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "no-spark").mkdir()
    env["PATH"] = str(tmp_path / "no-spark")  # pyspark puts spark-submit beside sys.executable: not on this PATH
    args = ["submit", "--mode", "k8s-client", "--master", "k8s://https://10.0.0.1:6443", "--image", "reg/job:1"]
    done = _enclaveml([*args, "--unsafe-no-attestation", "job.py"], env, tmp_path)
    assert done.returncode == 2
    assert "spark-submit not found (install the spark extra or use --dry-run)" in done.stderr
    assert "WARNING" in done.stderr
    help_text = _enclaveml(["submit", "--help"], env, tmp_path)
    assert "Example:" in help_text.stdout
    missing = _enclaveml(["submit", "--mode", "sim", "job.py"], env, tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1
    assert "--broker" in missing.stderr


# -- local and sim: end to end ---------------------------------------------------------------------

LOCAL_APP = """\
import sys, os, pathlib
from enclaveml.crypto import decrypt_file
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
kms = LocalKms(pathlib.Path(os.environ["ENCLAVEML_HOME"]) / "keystore.json", os.environ["ENCLAVEML_PASSPHRASE"])
decrypt_file(sys.argv[1], sys.argv[2], kms)
sys.exit(int(sys.argv[3]))
"""


def _record(directory: Path) -> dict[str, Any]:
    (path,) = directory.glob("*.json")
    assert path.stat().st_mode & 0o777 == 0o600
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_local_mode_runs_the_app_with_the_local_kms_and_records_it(tmp_path: Path, env: dict[str, str]) -> None:
    store = tmp_path / "home" / "keystore.json"
    kms = LocalKms.init(store, PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    kms.create_key("customers")
    (tmp_path / "app.py").write_text(LOCAL_APP)
    (tmp_path / "data.csv").write_text("name,salary\nann,100\n")
    encrypt_file(tmp_path / "data.csv", tmp_path / "data.csv.eml", kms, "customers")
    env["ENCLAVEML_PASSPHRASE"] = PASSPHRASE
    records = tmp_path / "records"
    args = ["submit", "--mode", "local", "--keys", "customers", "--records", str(records), "app.py"]
    done = _enclaveml([*args, "data.csv.eml", "out.csv", "0"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.csv").read_text() == "name,salary\nann,100\n"
    record = _record(records)
    assert f"job record: {records}" in done.stderr
    assert record["mode"] == "local"
    assert record["app"] == "app.py"
    assert record["args"] == ["data.csv.eml", "out.csv", "0"]
    assert record["exit_code"] == 0
    assert record["status"] == "succeeded"
    assert record["attestation"] == {"result": "off", "tee": "none"}
    assert record["started_at"] <= record["ended_at"]
    assert "ann" not in json.dumps(record)  # metadata only

    failed = _enclaveml([*args, "data.csv.eml", "out2.csv", "6"], env, tmp_path)
    assert failed.returncode == 6  # the app's own exit code
    statuses = sorted(json.loads(p.read_text())["status"] for p in records.glob("*.json"))
    assert statuses == ["failed", "succeeded"]

    unknown = _enclaveml(["submit", "--mode", "local", "--keys", "nope", "app.py", "a", "b", "0"], env, tmp_path)
    assert unknown.returncode == 5
    assert "nope" in unknown.stderr


SIM_APP = """\
import sys, pathlib, enclaveml
pathlib.Path("ran.marker").write_text("ran")
with enclaveml.session() as s:
    s.decrypt_file(sys.argv[1], "plain.csv")
    print("keys:", s.key_names())
"""


@dataclass
class LiveBroker:
    url: str
    ca: Path
    owner: BrokerKms
    workload_env: dict[str, str]


@pytest.fixture
def live_broker(tmp_path: Path, env: dict[str, str]) -> Iterator[LiveBroker]:
    cert, key = make_self_signed(tmp_path / "tls")
    with BrokerStore(f"sqlite:///{tmp_path / 'broker.db'}", os.urandom(32)) as store:
        owner = store.enroll_app("analytics", "owner")
        workload = store.enroll_app("job-runner", "workload")
        with BrokerServer(store, port=0, tls_cert=cert, tls_key=key) as server:
            workload_env = {
                **env,
                "ENCLAVEML_APP_ID": workload.app.app_id,
                "ENCLAVEML_API_KEY": base64.b64encode(workload.api_key).decode(),
            }
            kms = BrokerKms(server.url, owner.app.app_id, owner.api_key, ca=str(cert))
            yield LiveBroker(server.url, cert, kms, workload_env)
            kms.close()


def test_sim_mode_attests_through_the_real_broker_and_refuses_a_modified_app(
    tmp_path: Path, live_broker: LiveBroker
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "app.py").write_text(SIM_APP)
    (work / "data.csv").write_text("name,salary\nann,100\n")
    live_broker.owner.create_key("customers")
    encrypt_file(work / "data.csv", work / "data.csv.eml", live_broker.owner, "customers")
    (work / "data.csv").unlink()
    measurement = sim_measurement(["python", "app.py", "data.csv.eml"], root=work).hex()
    policy = f'name = "job"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement}"]\n'
    policy_id = live_broker.owner.client.register_policy("job", policy, ["customers"])["policy_id"]
    records = tmp_path / "records"
    args = ["submit", "--mode", "sim", "--broker", live_broker.url, "--ca", str(live_broker.ca)]
    args += ["--keys", "customers", "--records", str(records), "app.py", "data.csv.eml"]

    done = _enclaveml(args, live_broker.workload_env, work)
    assert done.returncode == 0, done.stderr
    assert "keys: ['customers']" in done.stdout
    assert (work / "plain.csv").read_text() == "name,salary\nann,100\n"
    assert "Attestation succeeded (INSECURE: simulated evidence): released customers v1" in done.stderr
    record = _record(records)
    assert record["status"] == "succeeded"
    assert record["command"][:4] == ["enclaveml", "run", "--tee", "sim"]
    assert record["command"][-3:] == ["python", "app.py", "data.csv.eml"]
    assert record["attestation"] == {
        "result": "released",
        "measurement": measurement,
        "insecure": True,
        "tee": "sim",
        "keys": ["customers v1"],
        "policy_ids": [policy_id],
    }

    # A modified app: refused before it starts; the record says so.
    for path in records.glob("*.json"):
        path.unlink()
    (work / "ran.marker").unlink()
    (work / "plain.csv").unlink()
    (work / "app.py").write_text(SIM_APP + "print('exfiltrate')\n")
    refused = _enclaveml(args, live_broker.workload_env, work)
    assert refused.returncode == EXIT_REFUSED, refused.stderr
    assert refused.stdout == ""
    assert not (work / "ran.marker").exists()
    assert not (work / "plain.csv").exists()
    record = _record(records)
    assert record["status"] == "refused"
    assert record["job_started"] is False
    assert record["exit_code"] == EXIT_REFUSED
    assert record["attestation"]["result"] == "refused"
    assert "mr_enclave" in record["attestation"]["reason"]


def test_execute_without_a_records_dir_records_nothing(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import pathlib; pathlib.Path('done').write_text('1')\n")
    plan = plan_submit(SubmitOptions(mode="local", app=str(tmp_path / "app.py"), python=sys.executable))
    code, record = execute(plan, records_dir=None, env={**os.environ}, cwd=tmp_path)
    assert (code, record) == (0, None)
    assert (tmp_path / "done").read_text() == "1"


# -- the Helm chart (deploy/helm/enclaveml): parsed, and templates checked structurally ----------

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "enclaveml"
_CONTROL = re.compile(r"^\s*\{\{-?\s*(if|else|end|fail|range|with|define|/\*)\b.*\}\}\s*$")
_EXPRESSION = re.compile(r"\{\{-?.*?-?\}\}")
_ENTRY = re.compile(r"^(\s*)x$")


def _skeleton(template: str) -> str:
    """The template with control lines dropped, an expression alone on its line (``include``,
    ``toYaml``: mapping entries) replaced by one entry and every other expression by a scalar.
    Both branches of each `if` stay, so their indentation must be valid YAML together."""
    lines = [line for line in template.splitlines() if not _CONTROL.match(line)]
    return "\n".join(_ENTRY.sub(r"\1rendered: x", _EXPRESSION.sub("x", line)) for line in lines) + "\n"


def _values_paths(doc: Any, prefix: str = "") -> set[str]:
    if not isinstance(doc, dict):
        return {prefix}
    paths = {prefix} if prefix else set()
    for key, value in doc.items():
        paths |= _values_paths(value, f"{prefix}.{key}" if prefix else key)
    return paths


def test_chart_and_values_parse() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "enclaveml"
    assert chart["version"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["spark"]["serviceAccount"] == SubmitOptions(mode="local", app="a.py").service_account
    assert values["spark"]["credentialsSecret"] == SubmitOptions(mode="local", app="a.py").credentials_secret
    assert values["broker"]["database"]["type"] in ("sqlite", "postgresql")


def test_every_value_a_template_uses_is_defined() -> None:
    defined = _values_paths(yaml.safe_load((CHART / "values.yaml").read_text()))
    used: set[str] = set()
    for path in (CHART / "templates").iterdir():
        text = path.read_text()
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text))
        used |= {f"spark.{name}" for name in re.findall(r"\$v\.([A-Za-z0-9_]+)", text)}
    assert used
    assert used - defined == set()


@pytest.mark.parametrize(
    "name",
    ["broker-deployment.yaml", "broker-service.yaml", "broker-pvc.yaml", "spark-pod-templates.yaml", "spark-rbac.yaml"],
)
def test_templates_are_structurally_valid_yaml(name: str) -> None:
    documents = [d for d in yaml.safe_load_all(_skeleton((CHART / "templates" / name).read_text())) if d]
    assert documents
    for doc in documents:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()


def test_chart_pod_template_matches_what_submit_renders() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    body = helpers.split('{{- define "enclaveml.sparkPodTemplate" -}}')[1].split("{{- end -}}")[-2]
    pod = yaml.safe_load(_skeleton(body))
    (container,) = pod["spec"]["containers"]
    rendered = render_pod_template(K8S, "driver")["spec"]["containers"][0]
    assert [e["name"] for e in container["env"]] == [e["name"] for e in rendered["env"]]
    assert _env(pod)["ENCLAVEML_API_KEY"] == {"secretKeyRef": {"name": "x", "key": "api_key"}}
    assert set(SGX_RESOURCES) <= container["resources"]["limits"].keys()
    assert pod["spec"]["volumes"][0]["secret"]["items"] == [{"key": "ca.pem", "path": "ca.pem"}]
