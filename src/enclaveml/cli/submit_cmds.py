"""``enclaveml submit``: run an analytics app locally, attested (sim), or on Kubernetes.

Exit codes: the app's own once it ran; 3 attestation refused (``sim``: the app was not
started); 2 usage errors (missing flags, ``spark-submit`` not found).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from enclaveml.cli._app import App, err_console, out_console, pass_app
from enclaveml.cli.attest_cmds import warn
from enclaveml.errors import ConfigError

if TYPE_CHECKING:
    from enclaveml.analytics.submit import Mode, Tee

__all__ = ["submit"]

RECORDS_DIR = "jobs"
TEMPLATES_DIR = "pod-templates"
# The same as analytics.submit.MODES / TEES (a test pins it): named here so that `enclaveml`
# starts without importing the analytics package.
MODES = ("local", "sim", "k8s-client", "k8s-cluster")
TEES = ("sgx", "tdx", "sim")


def _keys(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip() for item in value for n in item.split(",") if n.strip()))


def _confs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in value:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx, param)
        pairs.append((key, val))
    return tuple(pairs)


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--mode", type=click.Choice(MODES), default="local", show_default=True,
              help="local: no TEE; sim: attested via `enclaveml run --tee sim`; k8s-client / k8s-cluster: "
              "spark-submit to Kubernetes with TEE pod templates.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Print the pod templates and the exact command; run nothing.")
@click.option("--broker", "broker_url", metavar="URL", help="The key broker, e.g. https://broker:8443.")
@click.option("--keys", multiple=True, callback=_keys, metavar="NAME[,NAME]", help="Keys the app receives.")
@click.option("--ca", metavar="PEM", help="CA of the broker's TLS certificate.")
@click.option("--python", "python", default="python", show_default=True, metavar="EXE",
              help="Interpreter for local/sim (part of the simulated measurement).")  # fmt: skip
@click.option("--records", "records_dir", metavar="DIR", help="Job records [default: <home>/jobs].")
@click.option("--master", metavar="k8s://URL", help="Kubernetes API server, e.g. k8s://https://10.0.0.1:6443.")
@click.option("--image", metavar="IMG", help="The signed workload image.")
@click.option("--tee", type=click.Choice(TEES), default="sgx", show_default=True, help="TEE of the k8s pods.")
@click.option("--policy-id", metavar="ID", help="Broker policy the pods attest under.")
@click.option("--unsafe-no-attestation", is_flag=True, help="k8s: pods get no broker settings (ATTESTATION=false).")
@click.option("--secret", "credentials_secret", default="enclaveml-workload", show_default=True, metavar="NAME",
              help="Kubernetes Secret with app_id, api_key (and ca.pem with --ca).")  # fmt: skip
@click.option("--executors", default=1, show_default=True, type=click.IntRange(min=1), help="Executor pods.")
@click.option("--executor-cores", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--executor-memory", default="2g", show_default=True, metavar="SIZE")
@click.option("--driver-cores", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--driver-memory", default="2g", show_default=True, metavar="SIZE")
@click.option("--sgx-epc", default="1Gi", show_default=True, metavar="QTY", help="sgx.intel.com/epc per pod.")
@click.option("--namespace", default="default", show_default=True)
@click.option("--service-account", default="enclaveml-spark", show_default=True, help="The driver's (Helm chart RBAC).")
@click.option("--name", metavar="NAME", help="Spark app name [default: the app's file name].")
@click.option("--event-log-dir", metavar="URI", help="Enable Spark event logs into URI (e.g. s3a://..., file:///...).")
@click.option("--driver-host", metavar="ADDR", help="k8s-client: this host's address, reachable from executors.")
@click.option("--templates", "templates_dir", metavar="DIR", help="Pod templates dir [default: <home>/pod-templates].")
@click.option("--conf", multiple=True, callback=_confs, metavar="KEY=VALUE", help="Extra Spark conf (repeatable).")
@click.argument("app_file", metavar="APP")
@click.argument("args", nargs=-1)
@pass_app
def submit(
    app: App,
    /,
    mode: str,
    dry_run: bool,
    records_dir: str | None,
    templates_dir: str | None,
    unsafe_no_attestation: bool,
    app_file: str,
    args: tuple[str, ...],
    tee: str,
    **settings: object,
) -> None:
    """Run APP (a Python file) with ARGS in one of four modes, and record local/sim runs.

    \b
      local        python APP ARGS here, no TEE; APP opens the local key store
      sim          enclaveml run --tee sim: attest to the broker first, then APP gets its
                   keys from enclaveml.session(); a changed APP is refused (exit 3)
      k8s-client   spark-submit --deploy-mode client: driver here, executors in TEE pods
      k8s-cluster  spark-submit --deploy-mode cluster: driver and executors in TEE pods
                   (APP must be in the signed image: local:///path/app.py)

    The k8s modes render driver/executor pod templates (image, cpu/memory, the
    sgx.intel.com/epc|enclave|provision resources for --tee sgx, broker URL, policy id,
    keys and the credentials from the Secret --secret as env) and run spark-submit with
    authentication, RPC and shuffle/spill encryption on and the UI off.

    Each local/sim run writes a JSON record (metadata only: no data values) to --records.

    \b
    Example:
      enclaveml submit --mode local job.py people.csv.eml
      enclaveml submit --mode sim --broker https://broker:8443 --ca ca.pem --keys customers \\
          job.py people.csv.eml
      enclaveml submit --mode k8s-cluster --dry-run --master k8s://https://10.0.0.1:6443 \\
          --image registry/job:1 --broker https://broker:8443 --policy-id p-1 --keys customers \\
          local:///app/job.py
    """
    from enclaveml.analytics.submit import SubmitOptions, execute, plan_submit

    if unsafe_no_attestation and mode in ("local", "sim"):
        raise ConfigError("--unsafe-no-attestation is for the k8s modes", "drop it, or use --mode local")
    options = SubmitOptions(
        mode=cast("Mode", mode),
        app=app_file,
        args=args,
        tee=cast("Tee", tee),
        attestation=not unsafe_no_attestation,
        templates_dir=Path(templates_dir) if templates_dir else app.home / TEMPLATES_DIR,
        **settings,  # type: ignore[arg-type]  # click passes each option under its field name
    )
    plan = plan_submit(options)
    if unsafe_no_attestation:
        warn("--unsafe-no-attestation: the pods run without attestation and receive no keys from the broker")
    if dry_run:
        out_console.print(plan.describe(), markup=False, end="")
        return
    if mode == "local" and options.keys:
        kms = app.open_kms()  # fail before starting when a key is missing
        for name in options.keys:
            kms.describe_key(name)
    env = {**os.environ, "ENCLAVEML_HOME": str(app.home)}
    records = Path(records_dir) if records_dir else app.home / RECORDS_DIR
    code, record = execute(plan, records_dir=records, env=env)
    if record is not None:
        err_console.print(f"job record: {record}", markup=False)
    if code:
        raise SystemExit(code)
