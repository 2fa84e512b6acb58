"""``enclaveml run``: attest to the key broker, receive the keys, then start the job.

Exit codes: the job's own exit code once it ran; 3 the broker refused (``Attestation failed:
...`` on stderr, the job was not started); 5 wrong credentials; 2 usage errors and an
unreachable broker.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click
from cryptography.hazmat.primitives import serialization

from enclaveml.attestation.tee import SimulatedTee, Tee, TeeKind, detect_tee
from enclaveml.cli._app import App, err_console, out_console, pass_app
from enclaveml.cli.attest_cmds import load_policy_file, trusted_sim_public_key, warn
from enclaveml.errors import AttestationError, ConfigError, PolicyError
from enclaveml.runtime.run import (
    EXIT_REFUSED,
    ReleaseOutcome,
    load_or_create_sim_key,
    run_job,
    sim_measurement,
)

if TYPE_CHECKING:  # imported when used: it brings httpx, which `enclaveml --help` does not need
    from enclaveml.broker.client import BrokerClient

__all__ = ["run"]

APP_ID_ENV = "ENCLAVEML_APP_ID"
API_KEY_ENV = "ENCLAVEML_API_KEY"
SIM_KEY_FILE = "sim-key.pem"
_SIM_WARNING = (
    "simulated TEE (--tee sim): the evidence is signed by a key on this host and proves nothing "
    "about the host; for development only"
)


def _keys(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    names = [n.strip() for item in value for n in item.split(",") if n.strip()]
    return list(dict.fromkeys(names))


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--broker", "broker_url", metavar="URL", help="The key broker, e.g. https://broker:8443.")
@click.option("--keys", multiple=True, callback=_keys, metavar="NAME[,NAME]",
              help="Keys to receive (comma-separated or repeated).")  # fmt: skip
@click.option("--tee", type=click.Choice(["auto", "sgx", "tdx", "snp", "sim"]), default="auto", show_default=True,
              help="Evidence source: the TEE this runs in, or `sim` (development only; never automatic).")  # fmt: skip
@click.option("--sim-key", "sim_key_file", metavar="PEM",
              help="Simulation private key [default: <home>/sim-key.pem, created 0600 if absent].")  # fmt: skip
@click.option("--measure", "measured", multiple=True, metavar="PATH",
              help="Also measure this file or directory into simulated evidence (repeatable).")  # fmt: skip
@click.option("--ca", "ca_file", metavar="PEM", help="CA of the broker's TLS certificate [default: the system's CAs].")
@click.option("--verify-broker", "broker_policy", metavar="POLICY",
              help="Send nothing unless the broker's own evidence meets this policy (bi-attestation).")  # fmt: skip
@click.option("--broker-sim-key", multiple=True, metavar="PEM",
              help="With --verify-broker: trust simulated broker evidence only from this key.")  # fmt: skip
@click.option("--print-measurement", is_flag=True,
              help="With --tee sim: print the job's measurement (for the policy's mr_enclave) and exit.")  # fmt: skip
@click.argument("command", nargs=-1, required=True, metavar="-- COMMAND [ARGS]...")
@pass_app
def run(
    app: App,
    broker_url: str | None,
    keys: list[str],
    tee: str,
    sim_key_file: str | None,
    measured: tuple[str, ...],
    ca_file: str | None,
    broker_policy: str | None,
    broker_sim_key: tuple[str, ...],
    print_measurement: bool,
    command: tuple[str, ...],
) -> None:
    """Attest to the key broker, receive keys, then run COMMAND with them.

    For each key: a fresh broker nonce, evidence from the TEE bound to an ephemeral public key,
    the release; only when every key was released does COMMAND start. It reads its keys with
    `enclaveml.session()` from an inherited pipe: nothing is written to disk or to the
    environment. A refusal prints `Attestation failed: <reason>` and exits 3 without starting
    COMMAND; otherwise the exit code is COMMAND's.

    Credentials (a `workload` app: `enclaveml broker enroll --role workload`) come from the
    environment: ENCLAVEML_APP_ID and ENCLAVEML_API_KEY. The api key is removed from
    COMMAND's environment.

    With --tee sim the measurement covers the files COMMAND names under the current
    directory (not `*.eml` inputs), the --measure extras and COMMAND's arguments.

    With --verify-broker POLICY the broker must first prove itself (it runs with
    `broker serve --attest-self`): its evidence, bound to the TLS certificate this connection
    reached and a fresh challenge, must meet POLICY, or nothing is sent: `Broker attestation
    failed: <reason>`, exit 3.

    \b
    Example:
      enclaveml run --tee sim --print-measurement -- python job.py
      export ENCLAVEML_APP_ID=a-... ENCLAVEML_API_KEY=...
      enclaveml run --broker https://broker:8443 --ca ca.pem --keys customers --tee sim \\
          -- python job.py people.csv.eml
    """
    if tee != "sim" and (sim_key_file or measured or print_measurement):
        raise ConfigError("--sim-key, --measure and --print-measurement go with --tee sim", "add --tee sim")
    if print_measurement:
        measurement = sim_measurement(command, measure=measured)
        out_console.print(measurement.hex(), markup=False)
        err_console.print(f'policy: mr_enclave = ["{measurement.hex()}"], allow_simulation = true', markup=False)
        return
    if not broker_url:
        raise ConfigError("no broker given", "pass --broker https://HOST:8443")
    if not keys:
        raise ConfigError("no keys to receive", "pass --keys NAME[,NAME]")
    chosen = _sim_tee(app, sim_key_file, command, measured) if tee == "sim" else detect_tee(want=cast(TeeKind, tee))
    if tee != "sim":
        err_console.print(f"TEE: {chosen.kind} ({chosen.name})", markup=False)
    client = _client(app, broker_url, ca_file)
    if broker_policy is not None:
        _verify_broker(client, broker_policy, broker_sim_key)

    def released(outcome: ReleaseOutcome) -> None:
        names = ", ".join(f"{k.name} v{k.version}" for k in outcome.keys)
        policies = ", ".join(dict.fromkeys(outcome.policy_ids))
        insecure = " (INSECURE: simulated evidence)" if outcome.insecure else ""
        err_console.print(f"Attestation succeeded{insecure}: released {names} under policy {policies}", markup=False)

    code = run_job(command, broker=client, keys=keys, tee=chosen, on_released=released)
    if code:
        raise SystemExit(code)


def _sim_tee(app: App, sim_key_file: str | None, command: tuple[str, ...], measured: tuple[str, ...]) -> Tee:
    warn(_SIM_WARNING)
    path = Path(sim_key_file) if sim_key_file is not None else app.home / SIM_KEY_FILE
    key_obj, created = load_or_create_sim_key(path)
    if created:
        err_console.print(f"created the simulation key {path} (mode 0600)", markup=False)
    raw = key_obj.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    measurement = sim_measurement(command, measure=measured)
    err_console.print(
        f"measurement {measurement.hex()} (simulation key sha256:{hashlib.sha256(raw).hexdigest()[:16]})",
        markup=False,
    )
    return SimulatedTee(key_obj, measurement, b"")


def _verify_broker(client: BrokerClient, policy_file: str, sim_keys: tuple[str, ...]) -> None:
    policy = load_policy_file(policy_file)
    trusted = [trusted_sim_public_key(k) for k in sim_keys] or None
    try:
        verified = client.verify_broker(policy, now=datetime.now(UTC), sim_trusted_keys=trusted)
    except (AttestationError, PolicyError) as exc:
        err_console.print("Broker attestation failed: " + " ".join(exc.diagnostics().split()), markup=False)
        raise SystemExit(EXIT_REFUSED) from None
    insecure = " (INSECURE: simulated evidence)" if verified.claims.insecure else ""
    measured = verified.claims.mr_enclave or verified.claims.mr_td or b""
    err_console.print(
        f"Broker attestation succeeded{insecure}: {verified.description}, measurement {measured.hex()}", markup=False
    )


def _client(app: App, url: str, ca_file: str | None) -> BrokerClient:
    app_id = os.environ.get(APP_ID_ENV, "")
    api_key = os.environ.get(API_KEY_ENV, "")
    if not app_id or not api_key:
        raise ConfigError(
            f"no broker credentials: set {APP_ID_ENV} and {API_KEY_ENV}",
            "enroll the workload with `enclaveml broker enroll --name NAME --role workload`",
        )
    from enclaveml.broker.client import BrokerClient

    return BrokerClient(url, app_id=app_id, api_key=api_key, ca=ca_file, client_cert=app.client_cert())
