"""``enclaveml run``: attest to the key broker, receive the keys, then start the job.

For each key named: ``GET /v1/nonce``; a fresh ephemeral X25519 key pair
(``EphemeralRecipient``); evidence from the TEE whose report data is
``release_binding(public_key, nonce)``; ``POST /v1/keys/{name}/release``; open the HPKE-sealed
answer. Only when *every* key was released is the job started, with the read end of a pipe
left open (its number in ``ENCLAVEML_SESSION_FD``, never a secret); the key bundle
(``runtime/session.py``) is written into the pipe and ``enclaveml.session()`` reads it in the
job. Keys never touch the disk or the environment.

A refusal (the broker's 403 / 422: evidence failed verification, no policy allows it)
prints ``Attestation failed: <the broker's reason>`` on stderr and returns ``EXIT_REFUSED``
(3) without starting the job. Credential and connection problems raise their own errors
(exit 5 / 2 in the CLI); the job is not started either.

Simulation (``--tee sim``) is used only when asked for: the measurement is
``attestation.sim.measure_workload`` over the workload's files and its argv, signed by a
per-host simulation key. It proves nothing about the host.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from enclaveml.attestation.sim import SimulationKey, measure_workload
from enclaveml.attestation.tee import SimulatedTee, Tee
from enclaveml.crypto.key_release import EphemeralRecipient
from enclaveml.errors import AttestationError, ConfigError, IntegrityError, PolicyError
from enclaveml.runtime.session import SESSION_FD_ENV, ReleasedKey, encode_bundle

__all__ = [
    "EXIT_REFUSED",
    "SECRET_ENV_VARS",
    "BrokerLike",
    "ReleaseOutcome",
    "broker_sim_measurement",
    "default_measured_files",
    "load_or_create_sim_key",
    "refusal_line",
    "release_keys",
    "run_job",
    "sim_measurement",
]

EXIT_REFUSED = 3
#: Credentials of ``enclaveml run`` itself: removed from the job's environment.
SECRET_ENV_VARS = ("ENCLAVEML_API_KEY", "ENCLAVEML_PASSPHRASE")


class BrokerLike(Protocol):
    """What the runtime needs of ``broker.client.BrokerClient``: one signed JSON request."""

    def request(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]: ...


class ReleaseOutcome:
    """The keys released to this workload and the claims the broker verified (first release)."""

    def __init__(self, keys: list[ReleasedKey], claims: dict[str, Any], policy_ids: list[str], insecure: bool) -> None:
        self.keys, self.claims, self.policy_ids, self.insecure = keys, claims, policy_ids, insecure

    def __repr__(self) -> str:
        return f"ReleaseOutcome(keys={self.keys!r}, policy_ids={self.policy_ids!r}, insecure={self.insecure})"


# -- simulation helpers --------------------------------------------------------------------


def default_measured_files(command: Sequence[str], root: Path) -> list[Path]:
    """The files the command names that exist under ``root`` (e.g. ``job.py``).

    Encrypted inputs (``*.eml``) are left out: they are data, authenticated by their own
    encryption, and measuring them would tie the policy to one data file.
    """
    found: list[Path] = []
    resolved_root = root.resolve()
    for arg in command:
        if not arg or arg.startswith("-") or arg.endswith(".eml"):
            continue
        path = Path(arg) if Path(arg).is_absolute() else root / arg
        try:
            if not path.is_file() or not path.resolve().is_relative_to(resolved_root):
                continue
        except OSError:
            continue
        found.append(path.resolve().relative_to(resolved_root))
    return found


def sim_measurement(command: Sequence[str], *, measure: Sequence[str | Path] = (), root: Path | None = None) -> bytes:
    """The simulated measurement of ``command``: its files (``default_measured_files``) plus
    ``measure`` extras, and its argv, relative to ``root`` (default: the current directory)."""
    base = Path.cwd() if root is None else root
    files = [*default_measured_files(command, base), *(Path(m) for m in measure)]
    if not files:
        raise ConfigError(
            "nothing to measure: the command names no file under the current directory",
            "name the workload's files with --measure PATH (e.g. --measure job.py)",
        )
    return measure_workload(files, list(command), root=base)


def broker_sim_measurement() -> bytes:
    """The simulated measurement of a self-attesting broker (``broker serve --attest-self sim``):
    the installed ``enclaveml`` package's files, so a changed broker has another measurement."""
    package = Path(__file__).resolve().parent.parent
    return sim_measurement(["enclaveml", "broker", "serve"], measure=[package], root=package.parent)


def load_or_create_sim_key(path: Path) -> tuple[SimulationKey, bool]:
    """The per-host simulation key at ``path``; created (mode 0600) when absent. -> (key, created)."""
    try:
        return SimulationKey.from_pem(path.read_bytes()), False
    except FileNotFoundError:
        pass
    key = SimulationKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use that one
        return SimulationKey.from_pem(path.read_bytes()), False
    with os.fdopen(fd, "wb") as out:
        out.write(key.to_pem())
    public = path.with_name(path.name.removesuffix(".pem") + ".pub.pem")
    public.write_bytes(key.public_pem())
    return key, True


# -- release ---------------------------------------------------------------------------------


def _b64(answer: Mapping[str, Any], field: str) -> bytes:
    try:
        return base64.b64decode(str(answer[field]), validate=True)
    except (KeyError, binascii.Error, ValueError):
        hint = "is the URL an enclaveml key broker?"
        raise ConfigError(f"the broker's answer has no valid {field!r}", hint) from None


def _tee_for_nonce(tee: Tee, nonce: bytes) -> Tee:
    # Simulated evidence carries the verifier's nonce itself; real TEEs bind it through report data.
    if isinstance(tee, SimulatedTee):
        return SimulatedTee(tee.key, tee.measurement, nonce, clock=tee.clock)
    return tee


def _release_one(broker: BrokerLike, tee: Tee, name: str) -> tuple[list[ReleasedKey], dict[str, Any]]:
    challenge = broker.request("GET", "/v1/nonce")
    nonce_hex = str(challenge.get("nonce", ""))
    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError:
        raise ConfigError("the broker's nonce is not hex", "is the URL an enclaveml key broker?") from None
    recipient = EphemeralRecipient()
    evidence = _tee_for_nonce(tee, nonce).evidence(recipient.binding(nonce))
    answer = broker.request(
        "POST",
        f"/v1/keys/{name}/release",
        {
            "evidence": base64.b64encode(evidence).decode(),
            "nonce": nonce_hex,
            "public_key": base64.b64encode(recipient.public_key).decode(),
        },
    )
    bundle = recipient.open(_b64(answer, "sealed"), nonce)
    try:
        doc = json.loads(bundle)
        keys = [ReleasedKey.from_json(k) for k in doc["keys"]]
    except (ValueError, KeyError, TypeError):
        raise IntegrityError("the released key bundle is malformed", "check the broker's version") from None
    if not keys or any(k.name != name and k.key_id != name for k in keys):
        raise IntegrityError(f"the broker released other keys than {name!r}", "check the broker")
    return keys, answer


def release_keys(broker: BrokerLike, tee: Tee, keys: Sequence[str]) -> ReleaseOutcome:
    """Attest once per key and collect every released key; raises on the first refusal."""
    if not keys:
        raise ConfigError("no keys to release", "name them with --keys customers[,more]")
    released: list[ReleasedKey] = []
    claims: dict[str, Any] = {}
    policy_ids: list[str] = []
    insecure = False
    for name in dict.fromkeys(keys):  # each once, in order
        got, answer = _release_one(broker, tee, name)
        released.extend(got)
        if not claims and isinstance(answer.get("claims"), dict):
            claims = dict(answer["claims"])
        policy_ids.append(str(answer.get("policy_id", "")))
        insecure = insecure or bool(answer.get("insecure", False))
    return ReleaseOutcome(released, claims, policy_ids, insecure)


# -- the job ---------------------------------------------------------------------------------


def _feed(write_end: int, bundle: bytes) -> None:
    try:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(bundle)
    except BrokenPipeError:  # the job exited without reading its keys
        pass


def _job_env(base: Mapping[str, str], read_end: int) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in SECRET_ENV_VARS}
    env[SESSION_FD_ENV] = str(read_end)
    return env


def refusal_line(exc: AttestationError | PolicyError) -> str:
    """``Attestation failed: <what> (<hint>)`` on one line."""
    return "Attestation failed: " + " ".join(exc.diagnostics().split())


def run_job(
    command: Sequence[str],
    *,
    broker: BrokerLike,
    keys: Sequence[str],
    tee: Tee,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stderr: TextIO | None = None,
    on_released: Callable[[ReleaseOutcome], None] | None = None,
) -> int:
    """Release ``keys`` to this workload, then run ``command`` with them; returns its exit code.

    A refusal prints ``Attestation failed: ...`` to ``stderr`` and returns 3 without
    starting the job. A job killed by a signal returns 128 + the signal number.
    """
    if not command:
        raise ConfigError("no command to run", "put the job after --, e.g. -- python job.py")
    err = stderr if stderr is not None else sys.stderr
    try:
        outcome = release_keys(broker, tee, keys)
    except (AttestationError, PolicyError) as exc:
        print(refusal_line(exc), file=err, flush=True)
        return EXIT_REFUSED
    if on_released is not None:
        on_released(outcome)
    bundle = encode_bundle("broker", outcome.keys, outcome.claims)
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen(
            list(command),
            pass_fds=(read_end,),
            env=_job_env(os.environ if env is None else env, read_end),
            cwd=cwd,
        )
    except OSError as exc:
        os.close(write_end)
        raise ConfigError(f"cannot start {command[0]}: {exc.strerror or exc}", "check the command after --") from None
    finally:
        os.close(read_end)
    feeder = threading.Thread(target=_feed, args=(write_end, bundle), daemon=True)
    feeder.start()
    del bundle
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:  # the job got the terminal's SIGINT too; let it decide
            continue
    feeder.join(timeout=1)
    return 128 - code if code < 0 else code
