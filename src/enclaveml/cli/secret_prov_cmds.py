"""``enclaveml secret-prov ...``: Gramine-compatible secret provisioning, the enclave's side.

Exit codes of ``secret-prov fetch``: 0 the secret was written; 3 the server refused (or its
certificate failed verification), with no output file; 2 usage errors and an unreachable
server.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import click

from enclaveml._atomic import atomic_output
from enclaveml.attestation.ratls import EvidenceKind
from enclaveml.attestation.sim import SimulationKey, measure_workload
from enclaveml.attestation.tee import SimulatedTee, TeeKind, detect_tee
from enclaveml.broker.secret_prov import DEFAULT_PORT
from enclaveml.broker.secret_prov_client import DEFAULT_MAX_SECRET_SIZE, fetch_secret
from enclaveml.cli._app import err_console
from enclaveml.errors import ConfigError

__all__ = ["secret_prov"]

_EVIDENCE_KIND: dict[TeeKind, EvidenceKind] = {"sgx": "sgx-quote", "tdx": "tdx-quote", "sim": "sim"}


@click.group("secret-prov")
def secret_prov() -> None:
    """Gramine secret provisioning over RA-TLS (libsecret_prov_attest's protocol, port 4433).

    \b
    Example:
      enclaveml secret-prov fetch --host keys.example.com --ca ca.pem \\
          --tee sim --sim-key sim-key.pem --measure job.py -o secret.bin -- python job.py
    """


@secret_prov.command("fetch")
@click.option("--host", required=True, help="The secret provisioning server (its certificate must name it).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True, help="Server port.")
@click.option("--ca", "ca_file", metavar="PEM", help="CA of the server's certificate [default: the system's CAs].")
@click.option("--tee", type=click.Choice(["auto", "sgx", "tdx", "sim"]), default="auto", show_default=True,
              help="Evidence source: the TEE this runs in (Gramine SGX, TDX guest), or simulation.")  # fmt: skip
@click.option("--sim-key", "sim_key_file", metavar="PEM", help="Simulation private key (`attest sim-keygen`).")
@click.option("--measure", "measured", multiple=True, metavar="PATH",
              help="A workload file or directory measured into the simulated evidence (repeatable).")  # fmt: skip
@click.option("--root", default=".", show_default=True, metavar="DIR", help="Workload root (--measure is relative).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds for the whole exchange.")  # fmt: skip
@click.option("--max-size", type=click.IntRange(1), default=DEFAULT_MAX_SECRET_SIZE, show_default=True,
              help="Largest secret accepted, in bytes.")  # fmt: skip
@click.option("-o", "--output", required=True, metavar="FILE", help="Write the secret here (mode 0600).")
@click.argument("command", nargs=-1)
def fetch(
    host: str, port: int, ca_file: str | None, tee: str, sim_key_file: str | None, measured: tuple[str, ...],
    root: str, timeout: float, max_size: int, output: str, command: tuple[str, ...],
) -> None:  # fmt: skip
    """Attest to a secret provisioning server and write the secret it releases to FILE.

    Speaks the protocol of Gramine's libsecret_prov_attest: an RA-TLS client certificate
    carries the evidence, the server is verified by --ca and --host. The file is written
    atomically with mode 0600, and only when the whole secret arrived; nothing is printed
    from it. A refusal exits 3 and writes nothing.

    The evidence comes from the TEE this command runs in (--tee auto: a Gramine enclave's
    /dev/attestation, or a TDX guest's configfs-tsm; `enclaveml doctor` shows what is
    found). It never falls back to simulation on its own.

    With --tee sim the evidence is simulated (INSECURE: development only): it measures the
    --measure files and the optional COMMAND exactly as `attest sim-evidence --file ... --
    COMMAND` does, so pin that measurement in the server's policy.

    \b
    Example:
      enclaveml secret-prov fetch --host keys.example.com --ca ca.pem \\
          --tee sim --sim-key sim-key.pem --measure job.py -o secret.bin -- python job.py
      enclaveml secret-prov fetch --host 10.0.0.5 --port 4433 --ca ca.pem \\
          --tee sim --sim-key sim-key.pem --measure model/ -o wrap-key.bin
    """
    ca_pem = Path(ca_file).read_bytes() if ca_file is not None else None
    evidence_for, kind = _tee_evidence(tee, sim_key_file, measured, root, command)
    secret = fetch_secret(
        host, port, tee_evidence_for=evidence_for, kind=kind, ca_pem=ca_pem, now=datetime.now(UTC),
        timeout=timeout, max_secret_size=max_size,
    )  # fmt: skip
    with atomic_output(output, mode=0o600) as out:
        out.write(secret)
    err_console.print(f"wrote {output} ({len(secret)} bytes, mode 0600)", markup=False)


def _tee_evidence(
    tee: str, sim_key_file: str | None, measured: tuple[str, ...], root: str, command: tuple[str, ...]
) -> tuple[Callable[[bytes], bytes], EvidenceKind]:
    if tee != "sim":
        if sim_key_file is not None or measured or command:
            raise ConfigError("--sim-key, --measure and COMMAND go with --tee sim", "drop them, or pass --tee sim")
        found = detect_tee(want="auto" if tee == "auto" else cast(TeeKind, tee))
        if found.kind not in _EVIDENCE_KIND:
            raise ConfigError(
                f"{found.kind.upper()} evidence ({found.name}) cannot be carried in an RA-TLS certificate yet",
                "run the workload in an SGX enclave (Gramine) or a TDX guest",
            )
        return found.evidence, _EVIDENCE_KIND[found.kind]
    if sim_key_file is None:
        raise ConfigError("--tee sim needs --sim-key PEM", "create one with `enclaveml attest sim-keygen`")
    if not measured and not command:
        raise ConfigError(
            "nothing to measure: the simulated evidence would name no workload",
            "name the workload with --measure PATH (and the COMMAND after --)",
        )
    key = SimulationKey.from_pem(Path(sim_key_file).read_bytes())
    measurement = measure_workload([Path(m) for m in measured], list(command), root=Path(root))
    return SimulatedTee(key, measurement, b"").evidence, "sim"
