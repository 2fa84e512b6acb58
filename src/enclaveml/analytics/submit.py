"""``enclaveml submit``: run an analytics app in one of four modes, and record each run.

The modes are the seeds' four ways to submit a BigDL PPML job (``bigdl-ppml-submit.sh``):

=============== ============================ ================================================
mode            seeds' name                  what runs
=============== ============================ ================================================
``local``       local mode                   ``python app.py ARGS`` here, no TEE; the app
                                             reads keys from the local KMS itself
``sim``         local SGX mode (simulated)   ``enclaveml run --tee sim --broker URL --keys K
                                             -- python app.py ARGS``: attestation first, keys
                                             through ``enclaveml.session()``
``k8s-client``  client SGX mode              ``spark-submit --deploy-mode client`` against a
                                             Kubernetes master; executors in TEE pods
``k8s-cluster`` cluster SGX mode             ``spark-submit --deploy-mode cluster``; driver
                                             and executors in TEE pods
=============== ============================ ================================================

Everything that decides *what* runs is pure: ``plan_submit(options)`` returns a
``SubmitPlan`` (the exact argv, the rendered pod templates as YAML text); ``--dry-run``
prints it. ``execute(plan, ...)`` is the one function that starts a process.

Pod templates never hold a secret: the workload's api key (and the broker's CA) come from
the Kubernetes Secret named by ``credentials_secret`` (keys ``app_id``, ``api_key``,
``ca.pem``). Spark's own channels are locked down by ``SPARK_SECURITY_CONFS``.

Job records (``local`` and ``sim``): one JSON file per run in the records directory, written
atomically (mode 0600). A record holds metadata only — mode, app, argv, times, exit code,
the attestation outcome (policy ids, released key names and versions, measurement) — and
never data values or the job's output, so it is stored as plaintext JSON. The job's
arguments are recorded as given: do not pass secrets on the command line.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

from enclaveml._atomic import atomic_output
from enclaveml.errors import ConfigError

__all__ = [
    "MODES",
    "RECORD_VERSION",
    "SGX_RESOURCES",
    "SPARK_SECURITY_CONFS",
    "TEES",
    "SubmitOptions",
    "SubmitPlan",
    "execute",
    "job_record",
    "plan_submit",
    "render_pod_template",
    "spark_submit_argv",
    "write_job_record",
]

Mode = Literal["local", "sim", "k8s-client", "k8s-cluster"]
Tee = Literal["sgx", "tdx", "sim"]
MODES: tuple[Mode, ...] = ("local", "sim", "k8s-client", "k8s-cluster")
TEES: tuple[Tee, ...] = ("sgx", "tdx", "sim")
RECORD_VERSION = 1
EXIT_REFUSED = 3  # enclaveml run's refusal (runtime.run.EXIT_REFUSED)

#: Intel SGX device plugin resources a pod needs to create an enclave (epc: EPC bytes).
SGX_RESOURCES = ("sgx.intel.com/epc", "sgx.intel.com/enclave", "sgx.intel.com/provision")
#: Confidential Containers runtime class for TDX pods (a TD per pod; no device resources).
TDX_RUNTIME_CLASS = "kata-qemu-tdx"

#: Spark's channels: authenticated RPC, AES-encrypted RPC, encrypted shuffle / spill / cache
#: blocks on local disk, and no unauthenticated web UI (docs/submit.md, "Spark security").
SPARK_SECURITY_CONFS: dict[str, str] = {
    "spark.authenticate": "true",
    "spark.network.crypto.enabled": "true",
    "spark.io.encryption.enabled": "true",
    "spark.ui.enabled": "false",
}

# Pod environment (read by the workload's bootstrap inside the pod).
ENV_BROKER_URL = "ENCLAVEML_BROKER_URL"
ENV_POLICY_ID = "ENCLAVEML_POLICY_ID"
ENV_KEYS = "ENCLAVEML_KEYS"
ENV_ATTESTATION = "ENCLAVEML_ATTESTATION"
ENV_TEE = "ENCLAVEML_TEE"
ENV_APP_ID = "ENCLAVEML_APP_ID"
ENV_API_KEY = "ENCLAVEML_API_KEY"
ENV_BROKER_CA = "ENCLAVEML_BROKER_CA"
CA_MOUNT = "/etc/enclaveml/broker-ca"


@dataclass(frozen=True)
class SubmitOptions:
    """What ``enclaveml submit`` was asked to do.

    mode: one of ``MODES``. app: the app file (``local://`` path inside the image for
    ``k8s-cluster``). args: its arguments. broker_url, keys, ca: the key broker (``sim`` and
    attested k8s modes). python: the interpreter named in local/sim argv (default
    ``python``: it is part of the simulated measurement). master: ``k8s://https://HOST:PORT``.
    image: the signed workload image. tee: TEE of the k8s pods (default ``sgx``).
    policy_id: the broker policy the pods attest under. attestation: off only with
    ``--unsafe-no-attestation``. credentials_secret: the Kubernetes Secret with ``app_id``,
    ``api_key`` (and ``ca.pem`` when ``ca`` is given). executors, executor_cores,
    executor_memory, driver_cores, driver_memory: Spark sizing (1, 1, ``2g``, 1, ``2g``).
    sgx_epc: EPC per pod (``1Gi``). namespace, service_account: where the driver runs
    (``default``, ``enclaveml-spark``, the Helm chart's RBAC). name: Spark app name (the
    app's stem). event_log_dir: Spark event logs (none: disabled). driver_host: this host's
    address reachable from executors (``k8s-client``). templates_dir: where pod templates are
    written (``<home>/pod-templates``). conf: extra ``--conf`` pairs.
    """

    mode: Mode
    app: str
    args: tuple[str, ...] = ()
    broker_url: str | None = None
    keys: tuple[str, ...] = ()
    ca: str | None = None
    python: str = "python"
    master: str | None = None
    image: str | None = None
    tee: Tee = "sgx"
    policy_id: str | None = None
    attestation: bool = True
    credentials_secret: str = "enclaveml-workload"  # noqa: S105 - the Secret's name, not a secret
    executors: int = 1
    executor_cores: int = 1
    executor_memory: str = "2g"
    driver_cores: int = 1
    driver_memory: str = "2g"
    sgx_epc: str = "1Gi"
    namespace: str = "default"
    service_account: str = "enclaveml-spark"
    name: str | None = None
    event_log_dir: str | None = None
    driver_host: str | None = None
    templates_dir: Path = Path("pod-templates")
    conf: tuple[tuple[str, str], ...] = ()

    @property
    def app_name(self) -> str:
        stem = Path(self.app.removeprefix("local://")).stem or "app"
        return self.name or re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-") or "app"


@dataclass(frozen=True)
class SubmitPlan:
    """What will run: ``argv``, and for k8s modes the pod templates (path -> YAML text)."""

    mode: Mode
    argv: tuple[str, ...]
    job_command: tuple[str, ...]
    templates: dict[Path, str] = field(default_factory=dict)

    def describe(self) -> str:
        """The dry-run text: each template under a ``# path`` line, then the command."""
        parts = [f"# {path}\n{text}" for path, text in self.templates.items()]
        parts.append(" ".join(_shell_quote(a) for a in self.argv) + "\n")
        return "---\n".join(parts) if len(parts) > 1 else parts[0]


def _shell_quote(arg: str) -> str:
    return shlex.quote(arg)


# -- planning (pure) ---------------------------------------------------------------------------


def plan_submit(options: SubmitOptions) -> SubmitPlan:
    """Check ``options`` for ``options.mode`` and return the plan; raises ``ConfigError``."""
    _check(options)
    job = (options.python, options.app, *options.args)
    if options.mode == "local":
        return SubmitPlan("local", job, job)
    if options.mode == "sim":
        argv = ["enclaveml", "run", "--tee", "sim", "--broker", str(options.broker_url)]
        argv += ["--keys", ",".join(options.keys)]
        if options.ca:
            argv += ["--ca", options.ca]
        return SubmitPlan("sim", (*argv, "--", *job), job)
    name = options.app_name
    paths = {
        "executor": options.templates_dir / f"{name}-executor.yaml",
        "driver": options.templates_dir / f"{name}-driver.yaml",
    }
    # Client mode: the driver is this process's spark-submit, so only executors get a template.
    roles: tuple[Literal["driver", "executor"], ...] = (
        ("driver", "executor") if options.mode == "k8s-cluster" else ("executor",)
    )
    templates = {paths[role]: _to_yaml(render_pod_template(options, role)) for role in roles}
    argv = spark_submit_argv(options, driver_template=paths["driver"], executor_template=paths["executor"])
    return SubmitPlan(options.mode, tuple(argv), (options.app, *options.args), templates)


def _check(options: SubmitOptions) -> None:
    if options.mode not in MODES:
        raise ConfigError(f"unknown mode {options.mode!r}", f"use one of {', '.join(MODES)}")
    if options.mode in ("local", "sim") and not options.app.endswith(".py"):
        raise ConfigError(f"{options.app}: not a Python file", "submit an app.py")
    if options.mode == "sim":
        if not options.broker_url:
            raise ConfigError("--mode sim needs a key broker", "pass --broker https://HOST:8443")
        if not options.keys:
            raise ConfigError("--mode sim needs the keys to receive", "pass --keys NAME[,NAME]")
    if options.mode.startswith("k8s"):
        _check_k8s(options)


def _check_k8s(options: SubmitOptions) -> None:
    if not options.master or not options.master.startswith("k8s://"):
        raise ConfigError(f"--mode {options.mode} needs a Kubernetes master", "pass --master k8s://https://HOST:6443")
    if not options.image:
        raise ConfigError(f"--mode {options.mode} needs the signed workload image", "pass --image REGISTRY/IMAGE:TAG")
    if options.tee not in TEES:
        raise ConfigError(f"unknown TEE {options.tee!r}", f"use one of {', '.join(TEES)}")
    if options.mode == "k8s-cluster" and not options.app.startswith("local://"):
        # The driver runs in a pod: the app must be part of the measured image, not uploaded.
        raise ConfigError(
            "in k8s-cluster mode the app must be inside the signed image",
            f"pass it as local:///path/in/image/{Path(options.app).name}",
        )
    if options.attestation:
        if not options.broker_url:
            raise ConfigError("attested pods need the key broker", "pass --broker https://HOST:8443")
        if not options.policy_id:
            raise ConfigError("attested pods need the policy they attest under", "pass --policy-id p-...")
        if not options.keys:
            raise ConfigError("attested pods need the keys to receive", "pass --keys NAME[,NAME]")
    if min(options.executors, options.executor_cores, options.driver_cores) < 1:
        raise ConfigError("executor and core counts must be at least 1")


def render_pod_template(options: SubmitOptions, role: Literal["driver", "executor"]) -> dict[str, Any]:
    """The Spark pod template for ``role``: image, TEE resources, attestation env, CA volume.

    Spark merges it with what it generates (command, ports, cpu/memory from its confs);
    device resources, env, volumes and the runtime class are kept as written here.
    """
    memory = options.driver_memory if role == "driver" else options.executor_memory
    cores = options.driver_cores if role == "driver" else options.executor_cores
    quantity = _k8s_memory(memory)
    resources: dict[str, dict[str, str | int]] = {
        "requests": {"cpu": str(cores), "memory": quantity},
        "limits": {"cpu": str(cores), "memory": quantity},
    }
    if options.tee == "sgx":
        sgx: dict[str, str | int] = {SGX_RESOURCES[0]: options.sgx_epc, SGX_RESOURCES[1]: 1, SGX_RESOURCES[2]: 1}
        resources["requests"].update(sgx)
        resources["limits"].update(sgx)
    env: list[dict[str, Any]] = [
        {"name": ENV_ATTESTATION, "value": "true" if options.attestation else "false"},
        {"name": ENV_TEE, "value": options.tee},
    ]
    if options.attestation:
        env += [
            {"name": ENV_BROKER_URL, "value": str(options.broker_url)},
            {"name": ENV_POLICY_ID, "value": str(options.policy_id)},
            {"name": ENV_KEYS, "value": ",".join(options.keys)},
            _secret_env(ENV_APP_ID, options.credentials_secret, "app_id"),
            _secret_env(ENV_API_KEY, options.credentials_secret, "api_key"),
        ]
    container: dict[str, Any] = {
        "name": f"spark-{role}",
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    spec: dict[str, Any] = {"containers": [container]}
    if options.attestation and options.ca:
        env.append({"name": ENV_BROKER_CA, "value": f"{CA_MOUNT}/ca.pem"})
        container["volumeMounts"] = [{"name": "broker-ca", "mountPath": CA_MOUNT, "readOnly": True}]
        spec["volumes"] = [
            {
                "name": "broker-ca",
                "secret": {"secretName": options.credentials_secret, "items": [{"key": "ca.pem", "path": "ca.pem"}]},
            }
        ]
    if options.tee == "tdx":
        spec["runtimeClassName"] = TDX_RUNTIME_CLASS
    if role == "driver":
        spec["serviceAccountName"] = options.service_account
    labels = {"app.kubernetes.io/name": options.app_name, "app.kubernetes.io/part-of": "enclaveml", "role": role}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"labels": labels}, "spec": spec}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


_K8S_UNITS = {"": "", "k": "Ki", "m": "Mi", "g": "Gi", "t": "Ti"}


def _k8s_memory(spark_memory: str) -> str:
    """Spark's ``2g`` / ``512m`` -> Kubernetes' ``2Gi`` / ``512Mi``."""
    match = re.fullmatch(r"(\d+)([kmgt]?)b?", spark_memory.strip().lower())
    if not match:
        raise ConfigError(f"memory {spark_memory!r} is not like 2g or 512m", "write a number and k, m, g or t")
    number, unit = match.groups()
    return number + _K8S_UNITS[unit]


def spark_submit_argv(options: SubmitOptions, *, driver_template: Path, executor_template: Path) -> list[str]:
    """The ``spark-submit`` command for a k8s mode, security confs first."""
    deploy_mode = "cluster" if options.mode == "k8s-cluster" else "client"
    confs: dict[str, str] = {
        **SPARK_SECURITY_CONFS,
        "spark.kubernetes.container.image": str(options.image),
        "spark.kubernetes.namespace": options.namespace,
        "spark.kubernetes.authenticate.driver.serviceAccountName": options.service_account,
        "spark.kubernetes.executor.podTemplateFile": str(executor_template),
        "spark.executor.instances": str(options.executors),
        "spark.executor.cores": str(options.executor_cores),
        "spark.executor.memory": options.executor_memory,
        "spark.driver.cores": str(options.driver_cores),
        "spark.driver.memory": options.driver_memory,
    }
    if deploy_mode == "cluster":
        confs["spark.kubernetes.driver.podTemplateFile"] = str(driver_template)
    elif options.driver_host:
        confs["spark.driver.host"] = options.driver_host
    if options.event_log_dir:
        confs["spark.eventLog.enabled"] = "true"
        confs["spark.eventLog.dir"] = options.event_log_dir
    for key, value in options.conf:
        if key in SPARK_SECURITY_CONFS and value != SPARK_SECURITY_CONFS[key]:
            raise ConfigError(f"--conf {key}={value} would weaken Spark's security", "leave it at its default")
        confs[key] = value
    argv = ["spark-submit", "--master", str(options.master), "--deploy-mode", deploy_mode]
    argv += ["--name", options.app_name]
    for key, value in confs.items():
        argv += ["--conf", f"{key}={value}"]
    return [*argv, options.app, *options.args]


def _to_yaml(doc: Mapping[str, Any]) -> str:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - pyyaml comes with the analytics extra
        raise ConfigError("rendering pod templates needs PyYAML", "pip install 'enclaveml[analytics]'") from None
    return str(yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False))


# -- job records -------------------------------------------------------------------------------

# `enclaveml run` reports its outcome on stderr (cli/run_cmds.py); these are its lines.
_RELEASED = re.compile(r"^Attestation succeeded( \(INSECURE[^)]*\))?: released (?P<keys>.*) under policy (?P<p>.*)$")
_REFUSED = re.compile(r"^Attestation failed: (?P<reason>.*)$")
_MEASURED = re.compile(r"^measurement (?P<m>[0-9a-f]+) ")


def job_record(
    plan: SubmitPlan,
    *,
    job_id: str,
    started: datetime,
    ended: datetime,
    exit_code: int,
    attestation: Mapping[str, Any],
) -> dict[str, Any]:
    """The record of one run: metadata only (see the module docstring)."""
    refused = attestation.get("result") == "refused"
    status = "refused" if refused else ("succeeded" if exit_code == 0 else "failed")
    return {
        "version": RECORD_VERSION,
        "job_id": job_id,
        "mode": plan.mode,
        "app": plan.job_command[1] if plan.mode in ("local", "sim") else plan.job_command[0],
        "args": list(plan.job_command[2:]),
        "command": list(plan.argv),
        "started_at": started.isoformat(),
        "ended_at": ended.isoformat(),
        "duration_s": round((ended - started).total_seconds(), 3),
        "exit_code": exit_code,
        "status": status,
        "job_started": not refused,
        "attestation": dict(attestation),
    }


def write_job_record(directory: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as ``<started>-<job_id>.json`` in ``directory``, atomically (0600)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = str(record["started_at"]).replace(":", "").replace("-", "").split(".")[0].split("+")[0]
    path = directory / f"{stamp}-{record['job_id']}.json"
    with atomic_output(path, durable=True) as out:
        out.write(json.dumps(record, indent=2).encode() + b"\n")
    return path


def _attestation_from_stderr(lines: Sequence[str]) -> dict[str, Any]:
    outcome: dict[str, Any] = {"result": "none"}
    for line in lines:
        if m := _MEASURED.match(line):
            outcome["measurement"] = m["m"]
        elif m := _RELEASED.match(line):
            outcome.update(result="released", insecure=bool(m.group(1)), tee="sim")
            outcome["keys"] = [k.strip() for k in m["keys"].split(",")]
            outcome["policy_ids"] = [p.strip() for p in m["p"].split(",")]
        elif m := _REFUSED.match(line):
            outcome.update(result="refused", reason=m["reason"])
    return outcome


# -- execution -----------------------------------------------------------------------------------


def _resolve(program: str) -> str:
    if program == "enclaveml":  # this installation's command, not another one on PATH
        sibling = Path(sys.executable).with_name("enclaveml")
        if sibling.exists():
            return str(sibling)
    found = shutil.which(program)
    if found is None:
        if program == "spark-submit":
            raise ConfigError("spark-submit not found", "install the spark extra or use --dry-run")
        raise ConfigError(f"{program} not found", "check PATH")
    return found


def execute(
    plan: SubmitPlan,
    *,
    records_dir: Path | None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stderr: TextIO | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> tuple[int, Path | None]:
    """Write the plan's pod templates, run its argv, record the run -> (exit code, record path).

    ``local`` / ``sim`` runs are recorded in ``records_dir`` (when given); a ``sim`` run's
    attestation outcome is read from ``enclaveml run``'s stderr, which is passed through.
    """
    err = stderr if stderr is not None else sys.stderr
    argv = [_resolve(plan.argv[0]), *plan.argv[1:]]
    for path, text in plan.templates.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, mode=0o644) as out:
            out.write(text.encode())
    started, t0 = clock(), time.monotonic()
    try:
        child = subprocess.Popen(
            argv, env=env, cwd=cwd, stderr=subprocess.PIPE if plan.mode == "sim" else None, text=True
        )
    except OSError as exc:
        raise ConfigError(f"cannot start {plan.argv[0]}: {exc.strerror or exc}", "check the app and PATH") from None
    seen: list[str] = []
    if child.stderr is not None:
        for line in child.stderr:
            err.write(line)
            err.flush()
            seen.append(line.rstrip("\n"))
    code = child.wait()
    code = 128 - code if code < 0 else code
    ended = started + timedelta(seconds=time.monotonic() - t0)
    if plan.mode not in ("local", "sim") or records_dir is None:
        return code, None
    attestation = _attestation_from_stderr(seen) if plan.mode == "sim" else {"result": "off", "tee": "none"}
    if plan.mode == "sim" and code == EXIT_REFUSED and attestation["result"] != "released":
        attestation["result"] = "refused"
    job_id = "j-" + secrets.token_hex(8)
    record = job_record(plan, job_id=job_id, started=started, ended=ended, exit_code=code, attestation=attestation)
    return code, write_job_record(records_dir, record)
