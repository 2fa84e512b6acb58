"""``enclaveml policy ...``: attestation policies written from build artefacts, and checked.

A broken policy document is a usage error (exit 2); a SIGSTRUCT whose signature fails is
exit 3, as in ``enclaveml enclave sig-info``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from enclaveml._atomic import atomic_output
from enclaveml.attestation.claims import TcbStatus, TeeType
from enclaveml.attestation.policy import GRAMINE_OPT_INS, NEVER_ALLOWED, SECURE_STATUSES, Policy
from enclaveml.attestation.sigstruct import verify_sigstruct
from enclaveml.cli._app import App, err_console, out_console, pass_app
from enclaveml.cli.attest_cmds import load_policy_file, warn
from enclaveml.errors import AttestationError

__all__ = ["policy"]

_MEASUREMENTS = {
    TeeType.SGX: ("mr_enclave", "mr_signer"),
    TeeType.TDX: ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id"),
}


@click.group()
def policy() -> None:
    """Attestation policies: which workloads (measurements, TCB statuses) a verifier accepts.

    \b
    Example:
      enclaveml policy from-sig app.sig -o policy.toml
      enclaveml policy check policy.toml
      enclaveml attest verify quote.bin --collateral collateral.json --policy policy.toml
    """


@policy.command("from-sig")
@click.argument("sig_file", metavar="APP.sig", type=click.Path(dir_okay=False))
@click.option("-o", "--output", metavar="FILE", help="Write the policy here [default: standard output].")
@click.option("--name", help="Policy name, shown in every refusal [default: the file's stem].")
@click.option("--allow-debug", is_flag=True, help="Also accept the enclave in DEBUG mode (insecure).")
def from_sig(sig_file: str, output: str | None, name: str | None, allow_debug: bool) -> None:
    """Write a policy pinning the enclave a SIGSTRUCT (.sig) signs, after checking its signature.

    The policy pins mr_enclave, mr_signer, isv_prod_id and min_isv_svn (= the ISVSVN signed)
    and accepts only UpToDate platforms; edit it to allow more.

    \b
    Example:
      enclaveml policy from-sig app.sig -o policy.toml --name training-job
    """
    try:
        sigstruct = verify_sigstruct(Path(sig_file).read_bytes())
    except AttestationError as exc:
        raise exc.about(sig_file) from None
    written = Policy(
        name=name or Path(sig_file).stem,
        tee=(TeeType.SGX,),
        mr_enclave=(sigstruct.mr_enclave,),
        mr_signer=(sigstruct.mr_signer,),
        isv_prod_id=sigstruct.isv_prod_id,
        min_isv_svn=sigstruct.isv_svn,
        allow_debug=allow_debug,
    )
    text = written.to_toml()
    if output is None:
        out_console.file.write(text)
    else:
        with atomic_output(output, mode=0o644) as out:
            out.write(text.encode("utf-8"))
    where = f"wrote {output}: " if output else ""
    err_console.print(
        f"{where}policy {written.name} pins mr_enclave {sigstruct.mr_enclave.hex()}, "
        f"mr_signer {sigstruct.mr_signer.hex()}, isv_prod_id {sigstruct.isv_prod_id}, "
        f"min_isv_svn {sigstruct.isv_svn}",
        markup=False,
    )
    if sigstruct.debug and not allow_debug:
        warn("the SIGSTRUCT allows DEBUG: this policy refuses the enclave when it runs in debug mode")
    if allow_debug:
        warn("the policy accepts DEBUG enclaves: the host can read their memory (insecure)")


@policy.command("check")
@click.argument("policy_file", metavar="POLICY.toml", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check(policy_file: str, as_json: bool) -> None:
    """Validate a policy file and print what it accepts: TCB statuses, debug, simulation.

    Exit 0 when valid, 2 when not (the line names the field and the fix).

    \b
    Example:
      enclaveml policy check policy.toml
    """
    loaded = load_policy_file(policy_file)
    statuses = sorted(loaded.tcb_statuses, key=lambda s: s.severity)
    effective = [
        {"status": str(s), "via": _via(loaded, s), "insecure": s not in SECURE_STATUSES} for s in statuses
    ]  # fmt: skip
    unpinned = [str(t) for t in loaded.tee if all(getattr(loaded, k) is None for k in _MEASUREMENTS.get(t, ()))]
    if loaded.allow_simulation and loaded.mr_enclave is None:
        unpinned.append("sim")
    if as_json:
        document = {
            "file": policy_file,
            "valid": True,
            "name": loaded.name,
            "tcb_statuses": effective,
            "never_accepted": [str(s) for s in NEVER_ALLOWED if s is not TcbStatus.SIMULATED],
            "allow_debug": loaded.allow_debug,
            "allow_simulation": loaded.allow_simulation,
            "unpinned_tees": unpinned,
        }
        out_console.print_json(json.dumps(document))
    else:
        out_console.print(f"valid: policy {loaded.name} ({policy_file})", markup=False)
        for line in loaded.to_toml().splitlines()[2:]:
            key, _, value = line.partition(" = ")
            out_console.print(f"  {key:<28} {value}", markup=False)
        out_console.print("accepted TCB statuses:", markup=False)
        for item in effective:
            flag = "  INSECURE" if item["insecure"] else ""
            out_console.print(f"  {item['status']:<38} via {item['via']}{flag}", markup=False)
        out_console.print("never accepted: Revoked, TcbNotSupported", markup=False)
    for tee in unpinned:
        warn(f"the policy accepts {tee} but pins no measurement for it: such evidence is always refused")
    if loaded.allow_debug:
        warn("allow_debug = true: debug enclaves / TDs are accepted (the host can read their memory)")
    if loaded.allow_simulation:
        warn("allow_simulation = true: simulated evidence is accepted (it proves nothing; development only)")


def _via(loaded: Policy, status: TcbStatus) -> str:
    if status in loaded.allowed_tcb_statuses:
        return "allowed_tcb_statuses"
    return " + ".join(GRAMINE_OPT_INS.get(status, ()))


@policy.command("register")
@click.argument("policy_file", metavar="POLICY.toml", type=click.Path(dir_okay=False))
@click.option("--key", "keys", multiple=True, required=True, help="A key this policy may receive (repeatable).")
@click.option("--name", help="Policy name in the broker [default: the policy's `name`].")
@click.option(
    "--broker", "url", metavar="URL", help="Broker URL [default: $ENCLAVEML_BROKER_URL or https://127.0.0.1:8443]."
)
@pass_app
def register(app: App, policy_file: str, keys: tuple[str, ...], name: str | None, url: str | None) -> None:
    """Register a policy with the key broker: workloads it accepts may receive these keys.

    Needs an owner app's credentials in ENCLAVEML_APP_ID / ENCLAVEML_API_KEY
    (ENCLAVEML_BROKER_CA verifies the broker's certificate). Prints the policy id.

    \b
    Example:
      enclaveml policy register policy.toml --key customers --broker https://127.0.0.1:8443
    """
    loaded = load_policy_file(policy_file)
    document = Path(policy_file).read_text(encoding="utf-8")
    with app.broker_client(url) as client:
        answer = client.register_policy(name or loaded.name, document, list(keys))
    out_console.print(str(answer["policy_id"]), markup=False)
    err_console.print(
        f"registered policy {answer['name']} ({answer['policy_id']}) for key(s) {', '.join(answer['keys'])}",
        markup=False,
    )
    if loaded.allow_simulation:
        warn("allow_simulation = true: simulated evidence receives these keys (development only)")
