"""``enclaveml doctor``: is this machine ready to attest? One row per check, each with its fix.

Checks, in order: each kind of TEE (SGX through Gramine, TDX and SEV-SNP through
configfs-tsm, and their device nodes), the TEE that would be used, quote generation with
64 zero bytes of report data, PCCS reachability (``--pccs``), collateral freshness
(``--collateral``) and the simulated TEE. Statuses: ``OK``, ``WARN`` (works, but look),
``FAIL`` (will not work), ``SKIP`` (not present or not asked for).

Exit codes: 0 when a TEE is ready (a real one, or simulation asked for with ``--tee sim``)
and no check failed; 2 otherwise, with one ``error:`` line naming the failed checks.
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import click
from cryptography import x509

from enclaveml.attestation.tee import DEV_ROOT, GRAMINE_ROOT, TSM_ROOT, TeeProbe, probe_tees
from enclaveml.cli._app import instant_option, out_console
from enclaveml.errors import AttestationError, ConfigError

__all__ = ["doctor"]

Status = Literal["OK", "WARN", "FAIL", "SKIP"]
_SOON = timedelta(days=7)
_NAMES = {"sgx": "TEE sgx (Gramine)", "tdx": "TEE tdx (configfs-tsm)", "snp": "TEE snp (configfs-tsm)"}
_REFRESH = "fetch fresh collateral: `enclaveml attest verify QUOTE --pccs URL --collateral-cache DIR`"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def _when(moment: datetime, now: datetime) -> str:
    days = (moment - now) / timedelta(days=1)
    relative = f"in {days:.1f} days" if days >= 0 else f"{-days:.1f} days ago"
    return f"{moment.isoformat()} ({relative})"


# -- the checks -------------------------------------------------------------------------------------


def _tee_checks(probes: list[TeeProbe], want: str) -> tuple[list[Check], TeeProbe | None]:
    """A row per real kind, then which TEE would be used and whether it made evidence."""
    rows = []
    for probe in probes[:3]:
        status: Status = "OK" if probe.usable else ("WARN" if probe.present else "SKIP")
        rows.append(Check(_NAMES[probe.kind], status, probe.detail, probe.hint))
    chosen = next((p for p in probes if p.usable and p.kind != "sim" and want in ("auto", p.kind)), None)
    if want == "sim":
        chosen = probes[3]
        rows.append(Check("TEE", "WARN", "simulated TEE (--tee sim): INSECURE, proves nothing about the host",
                          "development only; production runs in SGX (Gramine), TDX or SEV-SNP"))  # fmt: skip
    elif chosen is not None:
        rows.append(Check("TEE", "OK", f"{chosen.kind} through {chosen.source}"))
    else:
        label = "TEE" if want == "auto" else want.upper()
        fix = "run inside Gramine (SGX) or a TDX / SEV-SNP confidential VM; for development pass --tee sim"
        rows.append(Check("TEE", "FAIL", f"no {label} found (see the rows above)", fix))
    if chosen is None:
        rows.append(Check("quote generation", "SKIP", "no TEE to ask"))
    elif chosen.evidence_ok:
        rows.append(Check("quote generation", "OK", chosen.evidence_detail))
    else:
        rows.append(Check("quote generation", "FAIL", chosen.evidence_detail or "not tried", chosen.hint))
    return rows, chosen


def _sim_check(probe: TeeProbe, want: str) -> Check:
    if not probe.evidence_ok:
        return Check("simulation", "FAIL", probe.evidence_detail, probe.hint)
    use = "selected" if want == "sim" else "available with --tee sim"
    return Check("simulation", "OK", f"{use}; development only ({probe.evidence_detail})")


def _collateral_check(path: str | None, now: datetime) -> Check:
    if path is None:
        return Check("collateral", "SKIP", "not checked (no --collateral FILE|DIR)")
    from enclaveml.attestation.collateral import load_collateral

    try:
        collateral = load_collateral(path)
    except (ConfigError, AttestationError) as exc:
        return Check("collateral", "FAIL", f"{path}: {exc.what}", exc.hint)
    fmspc = collateral.tcb_info.fmspc.hex()
    tee = collateral.tcb_info.id
    about = f"{path} ({tee}, FMSPC {fmspc})"
    if now >= collateral.expiry:
        return Check("collateral", "FAIL", f"{about} expired at {_when(collateral.expiry, now)}", _REFRESH)
    if now < collateral.not_before:
        what = f"{about} is not valid before {_when(collateral.not_before, now)}"
        return Check("collateral", "FAIL", what, "check this machine's clock")
    if collateral.expiry - now < _SOON:
        return Check("collateral", "WARN", f"{about} expires {_when(collateral.expiry, now)}", _REFRESH)
    return Check("collateral", "OK", f"{about} valid until {_when(collateral.expiry, now)}")


def _pccs_check(url: str | None, ca: str | None, fmspc: str | None, tee: str, timeout: float, now: datetime) -> Check:
    if url is None:
        return Check("PCCS", "SKIP", "not checked (no --pccs URL)")
    import httpx

    from enclaveml.attestation.collateral import Collateral
    from enclaveml.attestation.pcs import PcsClient  # httpx: only when a PCCS is checked

    try:
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=ca) if ca else True
    except (OSError, ssl.SSLError) as exc:
        return Check("PCCS", "FAIL", f"cannot load --pccs-ca {ca}: {exc}", "pass the PCCS's CA certificate (PEM)")
    try:
        with PcsClient(url, cache_dir=None, timeout=timeout, verify=ca or True) as client:
            crl_url = client.root_ca_crl_url
            if fmspc is not None:
                kind: Literal["sgx", "tdx"] = "tdx" if tee == "tdx" else "sgx"
                fetched = client.fetch_collateral(fmspc, tee=kind, pck_ca="processor", now=now)
                expiry = Collateral.from_dict(fetched).expiry
                return Check("PCCS", "OK", f"{url}: {kind} collateral for {fmspc}, valid until {_when(expiry, now)}")
    except ValueError as exc:  # a malformed --fmspc
        return Check("PCCS", "FAIL", str(exc), "--fmspc takes 12 hex digits, e.g. 00a067110000")
    except (ConfigError, AttestationError) as exc:
        return Check("PCCS", "FAIL", exc.what, exc.hint)
    started = time.monotonic()
    fix = f"is the PCCS running and reachable at {url} (proxy, firewall)? `--collateral DIR` works offline"
    try:
        with httpx.Client(timeout=timeout, verify=verify, follow_redirects=True) as http:
            response = http.get(crl_url)
    except httpx.TimeoutException:
        return Check("PCCS", "FAIL", f"{crl_url} did not answer within {timeout:g} s", fix)
    except httpx.TransportError as exc:
        return Check("PCCS", "FAIL", f"unreachable: {crl_url}: {exc or type(exc).__name__}", fix)
    took = time.monotonic() - started
    if response.status_code != httpx.codes.OK:
        what = f"{crl_url} answered HTTP {response.status_code} {response.reason_phrase}"
        return Check("PCCS", "FAIL", what, f"is {url} a PCCS (or Intel PCS) serving the v4 API?")
    crl = _crl(response.content)
    if crl is None:
        return Check("PCCS", "WARN", f"{crl_url} answered, but not with a CRL", f"is {url} a PCCS serving the v4 API?")
    update = f", next update {_when(crl.next_update_utc, now)}" if crl.next_update_utc else ""
    return Check("PCCS", "OK", f"reachable: {crl_url} gave the root CA CRL in {took:.2f} s{update}")


def _crl(body: bytes) -> x509.CertificateRevocationList | None:
    """A CRL as DER, PEM or hex text (a PCCS answers rootcacrl in hex)."""
    try:
        if body.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(body)
        return x509.load_der_x509_crl(body if body[:1] == b"\x30" else bytes.fromhex(body.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return None


# -- the command ------------------------------------------------------------------------------------


@click.command()
@click.option("--tee", "want", type=click.Choice(["auto", "sgx", "tdx", "snp", "sim"]), default="auto",
              show_default=True, help="The TEE that must be ready; `sim` accepts the simulated TEE.")  # fmt: skip
@click.option("--pccs", metavar="URL", help="Check that this PCCS (or Intel PCS) answers.")
@click.option("--pccs-ca", metavar="FILE", help="CA bundle for the PCCS's TLS certificate.")
@click.option("--fmspc", metavar="HEX", help="With --pccs: also fetch this platform's collateral (12 hex digits).")
@click.option("--collateral", metavar="FILE|DIR", help="Check that this offline collateral is still valid.")
@click.option("--timeout", type=click.FloatRange(0.1, 120), default=5.0, show_default=True,
              help="Seconds allowed for each PCCS request.")  # fmt: skip
@click.option("--at", callback=instant_option, metavar="ISO8601", help="Judge validity as of this time [default: now].")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--gramine-root", default=str(GRAMINE_ROOT), hidden=True)
@click.option("--tsm-root", default=str(TSM_ROOT), hidden=True)
@click.option("--dev-root", default=str(DEV_ROOT), hidden=True)
def doctor(
    want: str, pccs: str | None, pccs_ca: str | None, fmspc: str | None, collateral: str | None, timeout: float,
    at: datetime | None, as_json: bool, gramine_root: str, tsm_root: str, dev_root: str,
) -> None:  # fmt: skip
    """Check this machine: TEE, quote generation, PCCS, collateral, simulation. Exit 0 ready, 2 not.

    Each check prints OK, WARN, FAIL or SKIP with a one-line fix. Ready means a TEE produced
    evidence (a real one; the simulated one only with --tee sim) and no check failed.
    The only writes are the 64 zero bytes of report data (Gramine's user_report_data, or
    a temporary configfs-tsm report entry that is removed again).

    \b
    Example:
      enclaveml doctor
      enclaveml doctor --pccs https://pccs.example:8081 --fmspc 00a067110000
      enclaveml doctor --collateral collateral.json --json
      enclaveml doctor --tee sim
    """
    now = at or datetime.now(UTC)
    probes = probe_tees(
        gramine_root=Path(gramine_root), tsm_root=Path(tsm_root), dev_root=Path(dev_root), try_evidence=True
    )
    checks, chosen = _tee_checks(probes, want)
    checks.append(_pccs_check(pccs, pccs_ca, fmspc, want, timeout, now))
    checks.append(_collateral_check(collateral, now))
    checks.append(_sim_check(probes[3], want))
    failed = [c.name for c in checks if c.status == "FAIL"]
    ready = chosen is not None and bool(chosen.evidence_ok) and not failed
    if as_json:
        tee = None if chosen is None else {"kind": chosen.kind, "source": chosen.source}
        document = {"ready": ready, "tee": tee, "checked_at": now.isoformat(),
                    "checks": [asdict(c) for c in checks], "probes": [asdict(p) for p in probes]}  # fmt: skip
        out_console.print_json(json.dumps(document))
    else:
        _print_table(checks)
    if not ready:
        where_fixes = "the `fix` of each check in the JSON" if as_json else "the fixes above"
        raise ConfigError(f"not ready: {', '.join(failed) or 'no TEE'} failed", f"see {where_fixes}")


def _print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    out_console.print(f"{'CHECK':<{width}}  STATUS  DETAIL", markup=False)
    for check in checks:
        out_console.print(f"{check.name:<{width}}  {check.status:<6}  {check.detail}", markup=False)
        if check.fix and check.status in ("WARN", "FAIL"):
            out_console.print(f"{'':<{width}}          fix: {check.fix}", markup=False)
