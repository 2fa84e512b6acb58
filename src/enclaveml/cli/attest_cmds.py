"""``enclaveml attest ...``: inspect and verify TEE evidence; simulated evidence for development.

Exit codes of ``attest verify`` (a contract scripts rely on): 0 verified and the policy
holds; 3 verification or the policy failed (the reason on one line, all of them in
``--json``); 2 usage errors and malformed evidence (``EvidenceParseError`` is 3 elsewhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from enclaveml._atomic import atomic_output
from enclaveml.attestation.collateral import Collateral, load_collateral
from enclaveml.attestation.collateral_source import CollateralSource, PcsCollateralSource, resolve_collateral
from enclaveml.attestation.evidence import (
    DEFAULT_SIM_MAX_AGE_S,
    VerifiedEvidence,
    inspect_evidence,
    refusal_without_policy,
    verify_evidence,
    verify_maa_evidence,
)
from enclaveml.attestation.policy import Decision, Policy, PolicyViolation
from enclaveml.attestation.sim import SimulationKey, create_sim_evidence, load_sim_public_key, measure_workload
from enclaveml.cli._app import err_console, instant_option, out_console
from enclaveml.errors import AttestationError, ConfigError, EvidenceParseError, PolicyError

__all__ = ["attest", "collateral_source", "load_policy_file", "trusted_sim_public_key", "warn"]

_MALFORMED_HINT = "expected a DCAP quote, simulated evidence or an RA-TLS certificate; is the file complete?"


def warn(message: str) -> None:
    err_console.print(f"WARNING: {message}", markup=False)


def _hex(limit: int) -> Callable[[click.Context, click.Parameter, str | None], bytes | None]:
    """A click callback: at most ``limit`` bytes written as hex (an optional ``0x`` is allowed)."""

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes | None:
        if value is None:
            return None
        try:
            decoded = bytes.fromhex(value.strip().lower().removeprefix("0x"))
        except ValueError:
            raise click.BadParameter(f"{value!r} is not hex", ctx, param) from None
        if len(decoded) > limit:
            raise click.BadParameter(f"at most {limit} bytes ({2 * limit} hex digits), got {len(decoded)}", ctx, param)
        return decoded

    return convert


def load_policy_file(path: str) -> Policy:
    """A policy file; a broken document is a usage error (exit 2), not a refusal."""
    try:
        return Policy.load(Path(path))
    except PolicyError as exc:
        raise ConfigError(exc.what, exc.hint) from None


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value) if value != "" else "-"


def _malformed(path: str, exc: EvidenceParseError) -> ConfigError:
    hint = exc.hint if exc.hint != EvidenceParseError.default_hint else _MALFORMED_HINT
    return ConfigError(f"{path}: malformed evidence: {exc.what}", hint)


@contextlib.contextmanager
def _attestation_log() -> Iterator[list[str]]:
    """Collect the insecure-acceptance warnings the core logs; the command prints them itself."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = Collect(logging.WARNING), logging.getLogger("enclaveml.attestation")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@click.group()
def attest() -> None:
    """Inspect and verify TEE evidence: DCAP quotes, RA-TLS certificates, MAA tokens, simulation.

    \b
    Example:
      enclaveml attest inspect quote.bin
      enclaveml attest verify quote.bin --collateral collateral.json --policy policy.toml
      enclaveml attest verify server-cert.pem --pccs https://pccs:8081 --collateral-cache ~/.cache/dcap
    """


@attest.command("inspect")
@click.argument("evidence_file", metavar="EVIDENCE", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(evidence_file: str, as_json: bool) -> None:
    """Show every field of a quote, simulated evidence or RA-TLS certificate. Verifies nothing.

    For an RA-TLS certificate (PEM or DER) it also shows whether the evidence is bound to
    the certificate key. Trailing bytes after a quote's signature data are a warning.

    \b
    Example:
      enclaveml attest inspect quote.bin
      enclaveml attest inspect server-cert.pem --json
    """
    try:
        report = inspect_evidence(Path(evidence_file).read_bytes())
    except EvidenceParseError as exc:
        raise _malformed(evidence_file, exc) from None
    if as_json:
        document = {"file": evidence_file, "kind": report.kind, "inner_kind": report.inner_kind}
        out_console.print_json(json.dumps({**document, "fields": report.fields, "warnings": list(report.warnings)}))
    else:
        heading = f"{report.fields['format']}  (not verified: `enclaveml attest verify` checks it)"
        out_console.print(heading, markup=False)
        for name, value in report.fields.items():
            if name != "format":
                out_console.print(f"{name:<24} {_shown(value)}", markup=False)
    for line in report.warnings:
        warn(line)


@attest.command("verify")
@click.argument("evidence_file", metavar="[EVIDENCE]", required=False, type=click.Path(dir_okay=False))
@click.option("--collateral", metavar="FILE|DIR", help="DCAP collateral JSON (offline), or a directory holding it.")
@click.option("--pccs", metavar="URL", help="Fetch DCAP collateral from this PCCS or Intel PCS.")
@click.option("--pccs-ca", metavar="FILE", help="CA bundle for the PCCS's TLS certificate.")
@click.option("--collateral-cache", metavar="DIR", help="Cache fetched collateral here until it expires.")
@click.option(
    "--at", callback=instant_option, metavar="ISO8601", help="Verify as of this time [default: now; no zone = UTC]."
)
@click.option("--policy", "policy_file", metavar="FILE", help="Policy (TOML, or JSON by extension) to apply.")
@click.option("--trusted-sim-key", multiple=True, metavar="PEM", help="Trusted simulation public key (repeatable).")
@click.option("--nonce", callback=_hex(64), help="Expected nonce of simulated evidence (hex).")
@click.option("--sim-max-age", type=click.IntRange(1), default=DEFAULT_SIM_MAX_AGE_S, show_default=True,
              help="Oldest simulated evidence accepted, in seconds.")  # fmt: skip
@click.option("--maa-token", metavar="FILE", help="Verify this Azure Attestation token instead of EVIDENCE.")
@click.option("--jwks", metavar="FILE", help="The MAA provider's signing keys (<provider>/certs).")
@click.option("--issuer", metavar="URL", help="The MAA provider URL the token must name as `iss`.")
@click.option("--json", "as_json", is_flag=True, help="Print status, advisories, claims and failures as JSON.")
def verify(
    evidence_file: str | None,
    collateral: str | None,
    pccs: str | None,
    pccs_ca: str | None,
    collateral_cache: str | None,
    at: datetime | None,
    policy_file: str | None,
    trusted_sim_key: tuple[str, ...],
    nonce: bytes | None,
    sim_max_age: int,
    maa_token: str | None,
    jwks: str | None,
    issuer: str | None,
    as_json: bool,
) -> None:
    """Verify evidence, then apply a policy. Exit 0 accepted, 3 refused, 2 usage or malformed input.

    EVIDENCE is a DCAP quote (needs --collateral or --pccs), simulated evidence, or an
    RA-TLS certificate (PEM or DER) carrying either. Without --policy only the evidence is
    verified, not which workload made it; simulated evidence and the TCB statuses Revoked
    and TcbNotSupported are then refused.

    \b
    Example:
      enclaveml attest verify quote.bin --collateral collateral.json --policy policy.toml
      enclaveml attest verify quote.bin --collateral dcap/ --at 2025-07-01T00:00:00Z --json
      enclaveml attest verify cert.pem --policy dev.toml --trusted-sim-key sim-key.pub.pem
      enclaveml attest verify --maa-token token.jwt --jwks certs.json --issuer https://x.attest.azure.net
    """
    if (evidence_file is None) == (maa_token is None):
        raise click.UsageError("give EVIDENCE or --maa-token FILE (exactly one)")
    if maa_token is None and (jwks or issuer):
        raise click.UsageError("--jwks and --issuer go with --maa-token")
    if maa_token is not None and not (jwks and issuer):
        raise click.UsageError("--maa-token needs --jwks FILE and --issuer URL")
    if collateral and pccs:
        raise click.UsageError("give --collateral or --pccs, not both")
    now = at or datetime.now(UTC)
    policy = load_policy_file(policy_file) if policy_file else None
    source = evidence_file or maa_token or ""
    with _attestation_log() as logged:
        try:
            if maa_token is not None and jwks is not None and issuer is not None:
                token = Path(maa_token).read_text(encoding="utf-8", errors="replace")
                verified = verify_maa_evidence(token, Path(jwks).read_text(encoding="utf-8"), issuer=issuer, now=now)
            else:
                data = Path(source).read_bytes()
                keys = [trusted_sim_public_key(k) for k in trusted_sim_key]
                found = _collateral_for(data, collateral, pccs, pccs_ca, collateral_cache, now)
                verified = verify_evidence(
                    data, now=now, collateral=found, sim_trusted_keys=keys or None,
                    expected_nonce=nonce, sim_max_age_s=sim_max_age,
                )  # fmt: skip
        except EvidenceParseError as exc:
            usage = _malformed(source, exc)
            _print_failure(as_json, "malformed", AttestationError(exc.reason, exc.what, usage.hint), now)
            raise usage from None
        except AttestationError as exc:
            _print_failure(as_json, "failed", exc, now)
            raise exc.about(source) from None
        decision = policy.evaluate(verified.claims, now=now) if policy is not None else None
    refusal = refusal_without_policy(verified) if decision is None else None
    accepted = refusal is None and (decision is None or decision.allowed)
    warnings = list(verified.warnings) + (logged if accepted else [])
    if as_json:
        out_console.print_json(json.dumps(_document(verified, decision, refusal, warnings, now)))
    else:
        _print_verified(verified, decision, accepted)
    for line in warnings:
        warn(line)
    if decision is None and accepted:
        err_console.print(
            "note: no --policy: only the evidence was verified, not which workload produced it "
            "(`enclaveml policy from-sig app.sig` writes a policy)",
            markup=False,
        )
    if refusal is not None:
        raise refusal.about(source)
    if decision is not None and not decision.allowed:
        raise PolicyViolation(decision).about(source)


def trusted_sim_public_key(path: str) -> Ed25519PublicKey:
    """The simulation public key in PEM file ``path`` (what ``attest sim-keygen`` wrote as FILE.pub.pem)."""
    try:
        return load_sim_public_key(Path(path).read_bytes())
    except ConfigError as exc:
        hint = "pass the FILE.pub.pem that `enclaveml attest sim-keygen` wrote"
        raise ConfigError(f"{path}: {exc.what}", hint) from None


def collateral_source(path: str | None, pccs: str | None, ca: str | None, cache: str | None) -> CollateralSource:
    """``--collateral FILE|DIR`` (offline) or ``--pccs URL`` (per quote, cached) as a collateral source."""
    if path is not None:
        return load_collateral(path)
    if pccs is None:
        return None
    from enclaveml.attestation.pcs import PcsClient  # imports httpx: only when a PCCS is used

    verify_tls: bool | str = ca if ca is not None else True
    return PcsCollateralSource(PcsClient(pccs, cache_dir=Path(cache) if cache else None, verify=verify_tls))


def _collateral_for(
    data: bytes, path: str | None, pccs: str | None, ca: str | None, cache: str | None, now: datetime
) -> Collateral | None:
    source = collateral_source(path, pccs, ca, cache)
    try:
        return resolve_collateral(source, data, now)
    finally:
        if isinstance(source, PcsCollateralSource):
            source.close()


def _document(
    verified: VerifiedEvidence,
    decision: Decision | None,
    refusal: AttestationError | None,
    warnings: list[str],
    now: datetime,
) -> dict[str, object]:
    failures: list[dict[str, str]] = []
    if refusal is not None:
        failures.append({"step": "acceptance", "reason": refusal.reason, "what": refusal.what, "hint": refusal.hint})
    for f in decision.failures if decision else []:
        failures.append(
            {"step": "policy", "reason": f.check, "what": f.what, "expected": f.expected, "actual": f.actual,
             "hint": f.hint}
        )  # fmt: skip
    result = "refused" if failures else ("accepted" if decision else "verified")
    document = {"result": result, "verified_at": now.isoformat(), **verified.to_json(), "warnings": warnings}
    if decision is not None:
        document["insecure"] = decision.insecure or verified.claims.insecure
        document["policy"] = {"name": decision.policy, "allowed": decision.allowed,
                              "insecure_reasons": decision.insecure_reasons}  # fmt: skip
    else:
        document["policy"] = None
    return {**document, "failures": failures}


def _print_failure(as_json: bool, result: str, exc: AttestationError, now: datetime) -> None:
    if as_json:
        failure = {"step": "verification", "reason": exc.reason, "what": exc.what, "hint": exc.hint}
        document: dict[str, object] = {"result": result, "verified_at": now.isoformat(), "status": None}
        document |= {"advisories": [], "claims": None}
        out_console.print_json(json.dumps({**document, "failures": [failure]}))


def _print_verified(verified: VerifiedEvidence, decision: Decision | None, accepted: bool) -> None:
    status = f"TCB {verified.status}"
    if verified.advisories:
        status += f" ({', '.join(verified.advisories)})"
    if verified.claims.insecure:
        status += " - INSECURE: simulation proves nothing about the host"
    binding = " (key binding holds)" if verified.ratls_key_binding_ok else ""
    label = "verified" if accepted else "refused"
    out_console.print(f"{label}: {verified.description}{binding}, {status}", markup=False)
    if decision is None:
        out_console.print("policy: none (only the evidence was verified)", markup=False)
    elif decision.allowed:
        weakened = f" with weakened trust: {'; '.join(decision.insecure_reasons)}" if decision.insecure else ""
        out_console.print(f"policy: {decision.policy} allows it{weakened}", markup=False)
    else:
        checks = ", ".join(f.check for f in decision.failures)
        out_console.print(f"policy: {decision.policy} refuses it ({checks})", markup=False)
    for name, value in verified.claims.to_json().items():
        out_console.print(f"  {name:<20} {_shown(value)}", markup=False)


@attest.command("sim-keygen")
@click.option("-o", "--output", default="sim-key.pem", show_default=True, metavar="FILE", help="Private key file.")
def sim_keygen(output: str) -> None:
    """Create this host's simulation key (Ed25519, mode 0600) and its public key FILE.pub.pem.

    Verifiers pass the public key with `attest verify --trusted-sim-key`. Simulation proves
    nothing about the host: for development only.

    \b
    Example:
      enclaveml attest sim-keygen -o sim-key.pem
    """
    key = SimulationKey.generate()
    public_path = Path(output).with_suffix(".pub.pem")
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{output} already exists; not overwriting a key", "choose another -o path") from None
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(key.to_pem())
    with atomic_output(public_path, mode=0o644) as out:
        out.write(key.public_pem())
    fingerprint = hashlib.sha256(key.public_key.public_bytes_raw()).hexdigest()
    out_console.print(f"sim_key_sha256  {fingerprint}", markup=False)
    err_console.print(f"wrote {output} (Ed25519, mode 0600) and {public_path}; INSECURE: development only")


@attest.command("sim-evidence")
@click.option("--key", "key_file", required=True, metavar="PEM", help="Simulation private key (`sim-keygen`).")
@click.option("--file", "files", multiple=True, metavar="PATH", help="A workload file or directory (repeatable).")
@click.option("--root", default=".", show_default=True, metavar="DIR", help="Workload root; paths are relative to it.")
@click.option("--report-data", callback=_hex(64), default="", help="Up to 64 bytes of hex, zero-padded.")
@click.option("--nonce", callback=_hex(64), default="", help="The verifier's challenge (hex).")
@click.option("-o", "--output", required=True, metavar="FILE", help="Where to write the evidence.")
@click.argument("command", nargs=-1, required=True)
def sim_evidence(
    key_file: str, files: tuple[str, ...], root: str, report_data: bytes, nonce: bytes, output: str,
    command: tuple[str, ...],
) -> None:  # fmt: skip
    """Measure a workload (files + command) and sign simulated evidence. INSECURE: development only.

    Prints the measurement: pin it as `mr_enclave` in a policy with `allow_simulation = true`.

    \b
    Example:
      enclaveml attest sim-evidence --key sim-key.pem --file job.py --report-data 00ff -o evidence.bin -- python job.py
    """
    key = SimulationKey.from_pem(Path(key_file).read_bytes())
    measurement = measure_workload([Path(f) for f in files], list(command), root=Path(root))
    evidence = create_sim_evidence(key, measurement, report_data.ljust(64, b"\0"), nonce, datetime.now(UTC))
    with atomic_output(output, mode=0o644) as out:
        out.write(evidence)
    out_console.print(f"measurement  {measurement.hex()}", markup=False)
    err_console.print(f"wrote {output} (simulated evidence, {len(evidence)} bytes; INSECURE: development only)")
