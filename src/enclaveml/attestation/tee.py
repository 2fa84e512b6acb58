"""Evidence from the TEE this process runs in (adapter: file I/O on device paths).

One ``Tee`` protocol (``name``, ``kind``, ``evidence(report_data) -> bytes``), three sources:

- ``GramineTee``: an SGX enclave under Gramine (``tee-formats.md`` §2.1). ``/dev/attestation/
  attestation_type`` must read ``dcap``; write the 64 bytes to ``user_report_data``, read the
  DCAP quote from ``quote``.
- ``ConfigfsTsmTee``: a TDX or SEV-SNP guest, Linux configfs-tsm (kernel >= 6.7)::

      mkdir <root>/<unique name>         the kernel creates the attributes
      read  generation                   g
      write inblob (64 bytes)            generation becomes g + 1
      read  outblob, provider, auxblob   the report is made on this read
      read  generation                   still g + 1, else another writer interfered: retry
      rmdir <root>/<unique name>

  ``provider`` names the format: ``tdx_guest`` (a TDX DCAP quote), ``sev_guest`` (an SEV-SNP
  attestation report, certificates in ``auxblob``).
- ``SimulatedTee``: ``sim.create_sim_evidence``; development only, proves nothing about the host.

``detect_tee`` picks the real TEE present and never falls back to simulation on its own.
``probe_tees`` says for each kind what was found, why it is unusable and (optionally) whether it
produced evidence; ``enclaveml doctor`` prints it. Failures are ``ConfigError`` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol, get_args

from enclaveml.attestation.quote import parse_quote
from enclaveml.attestation.sim import SimulationKey, create_sim_evidence, verify_sim_evidence
from enclaveml.errors import ConfigError, EvidenceParseError

__all__ = [
    "DEV_ROOT",
    "GRAMINE_ROOT",
    "REPORT_DATA_SIZE",
    "TSM_PROVIDERS",
    "TSM_ROOT",
    "ConfigfsTsmTee",
    "GramineTee",
    "SimulatedTee",
    "Tee",
    "TeeKind",
    "TeeProbe",
    "TsmReport",
    "detect_tee",
    "probe_tees",
]

logger = logging.getLogger(__name__)

TeeKind = Literal["sgx", "tdx", "snp", "sim"]
GRAMINE_ROOT = Path("/dev/attestation")
TSM_ROOT = Path("/sys/kernel/config/tsm/report")
DEV_ROOT = Path("/dev")
REPORT_DATA_SIZE = 64
#: configfs-tsm ``provider`` -> the kind of TEE whose evidence ``outblob`` holds.
TSM_PROVIDERS: dict[str, TeeKind] = {"tdx_guest": "tdx", "sev_guest": "snp"}
_LABELS: dict[TeeKind, str] = {"sgx": "SGX", "tdx": "TDX", "snp": "SEV-SNP", "sim": "simulated TEE"}
_NO_TEE_HINT = "run `enclaveml doctor`; for development pass --tee sim"
_QPL_HINT = "is the DCAP quote provider configured (/etc/sgx_default_qcnl.conf) and its PCCS reachable?"
_TSM_HINT = "is configfs mounted (mount -t configfs none /sys/kernel/config) and the guest driver loaded?"


class Tee(Protocol):
    """Where evidence comes from. ``evidence`` binds exactly 64 bytes of report data."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> TeeKind: ...
    def evidence(self, report_data: bytes) -> bytes: ...


# -- file helpers: every failure names the file -------------------------------------------------


def _fail(path: Path, exc: OSError, doing: str, hint: str) -> ConfigError:
    reason = "no such file" if isinstance(exc, FileNotFoundError) else exc.strerror or type(exc).__name__
    return ConfigError(f"{path}: cannot {doing}: {reason}", hint)


def _read(path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()  # until EOF: configfs and Gramine make the report on this read
    except OSError as exc:
        raise _fail(path, exc, "read", hint) from None


def _write(path: Path, data: bytes, hint: str) -> None:
    try:  # no O_CREAT: the kernel or Gramine provides these files, a missing one is an error
        with open(os.open(path, os.O_WRONLY), "wb") as out:
            out.write(data)  # configfs commits a binary attribute when it is closed
    except OSError as exc:
        raise _fail(path, exc, "write", hint) from None


def _text(path: Path, hint: str) -> str:
    return _read(path, hint).decode("ascii", "replace").strip().strip("\0")


def _check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")


def _check_quote_binding(quote: bytes, report_data: bytes, source: Path, hint: str) -> None:
    """A DCAP quote must carry the report data just written (catches a stale quote)."""
    try:
        found = parse_quote(quote).body.report_data
    except EvidenceParseError as exc:
        raise ConfigError(f"{source}: not a DCAP quote ({exc.what})", hint) from None
    if found != report_data:
        shown = f"{found.hex()[:16]}…, not the {report_data.hex()[:16]}… written"
        raise ConfigError(f"{source}: the quote carries report data {shown}", hint)


# -- Gramine ------------------------------------------------------------------------------------


class GramineTee:
    """An SGX enclave under Gramine: DCAP quotes through ``/dev/attestation``."""

    name = "gramine"
    kind: TeeKind = "sgx"

    def __init__(self, root: Path = GRAMINE_ROOT) -> None:
        self.root = Path(root)

    def attestation_type(self) -> str:
        """``dcap`` or ``none`` (the manifest's ``sgx.remote_attestation``)."""
        hint = "run the workload under gramine-sgx (this file exists only inside a Gramine enclave)"
        return _text(self.root / "attestation_type", hint)

    def evidence(self, report_data: bytes) -> bytes:
        """A DCAP quote (v3) whose REPORTDATA is ``report_data``."""
        _check_report_data(report_data)
        if (kind := self.attestation_type()) != "dcap":
            raise ConfigError(
                f"{self.root / 'attestation_type'} is {kind!r}, not 'dcap': this enclave cannot produce quotes",
                'set sgx.remote_attestation = "dcap" in the Gramine manifest and sign it again',
            )
        _write(self.root / "user_report_data", report_data, "is this a Gramine enclave (gramine-sgx)?")
        quote = _read(self.root / "quote", _QPL_HINT)
        if not quote:
            raise ConfigError(f"{self.root / 'quote'}: empty quote", _QPL_HINT)
        _check_quote_binding(quote, report_data, self.root / "quote", "did another thread write user_report_data?")
        return quote


# -- Linux configfs-tsm -------------------------------------------------------------------------


@dataclass(frozen=True)
class TsmReport:
    """One configfs-tsm report: ``outblob`` is the evidence, in the format ``provider`` names."""

    provider: str
    outblob: bytes
    auxblob: bytes | None
    generation: int
    attempts: int


class ConfigfsTsmTee:
    """A TDX or SEV-SNP guest: reports through ``/sys/kernel/config/tsm/report``.

    Each request uses its own report entry (a unique directory), so concurrent requests share
    no state; ``generation`` still guards against another writer, with at most ``max_attempts``
    tries. ``attribute_wait_s`` bounds how long the attributes may take to appear after
    ``mkdir`` (the kernel creates them at once; an emulated tree may lag).
    """

    name = "configfs-tsm"

    def __init__(
        self, root: Path = TSM_ROOT, *, provider: str | None = None, max_attempts: int = 3, attribute_wait_s: float = 1
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.root, self.max_attempts, self.attribute_wait_s = Path(root), max_attempts, attribute_wait_s
        self._provider = provider

    @property
    def provider(self) -> str:
        """The provider's name (read from a fresh report entry the first time)."""
        if self._provider is None:
            with _report_entry(self.root, self.attribute_wait_s) as entry:
                self._provider = _text(entry / "provider", _TSM_HINT)
        return self._provider

    @property
    def kind(self) -> TeeKind:
        if (provider := self.provider) not in TSM_PROVIDERS:
            raise ConfigError(
                f"{self.root}: configfs-tsm provider {provider!r} is not supported",
                f"supported providers: {', '.join(TSM_PROVIDERS)}",
            )
        return TSM_PROVIDERS[provider]

    def evidence(self, report_data: bytes) -> bytes:
        """The provider's evidence (``outblob``) bound to ``report_data``."""
        return self.report(report_data).outblob

    def report(self, report_data: bytes) -> TsmReport:
        _check_report_data(report_data)
        with _report_entry(self.root, self.attribute_wait_s) as entry:
            seen: list[str] = []
            for attempt in range(1, self.max_attempts + 1):
                before = _generation(entry)
                _write(entry / "inblob", report_data, _TSM_HINT)
                outblob = _read(entry / "outblob", "the guest driver failed to make a report; see dmesg")
                provider = _text(entry / "provider", _TSM_HINT)
                auxblob = _read(entry / "auxblob", _TSM_HINT) if (entry / "auxblob").exists() else None
                if (after := _generation(entry)) == before + 1:
                    report = TsmReport(provider, outblob, auxblob or None, after, attempt)
                    return self._checked(entry, report, report_data)
                seen.append(f"{before}->{after}")
                logger.warning("%s: generation went %d -> %d, expected %d; retrying", entry, before, after, before + 1)
            raise ConfigError(
                f"{entry}: generation changed by another writer on every one of {self.max_attempts} attempts "
                f"({', '.join(seen)}); the report cannot be trusted to carry our report data",
                f"find the process writing to {self.root} (each user should create its own report entry)",
            )

    def _checked(self, entry: Path, report: TsmReport, report_data: bytes) -> TsmReport:
        if self._provider is not None and report.provider != self._provider:
            raise ConfigError(f"{entry / 'provider'} is {report.provider!r}, expected {self._provider!r}", _TSM_HINT)
        self._provider = report.provider
        if not report.outblob:
            raise ConfigError(f"{entry / 'outblob'}: empty report", "see dmesg for the guest driver's error")
        if report.provider == "tdx_guest":
            hint = "is the TDX quote generation service running?"
            _check_quote_binding(report.outblob, report_data, entry / "outblob", hint)
        return report


def _generation(entry: Path) -> int:
    text = _text(entry / "generation", _TSM_HINT)
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{entry / 'generation'}: not a number: {text[:20]!r}", _TSM_HINT) from None


@contextlib.contextmanager
def _report_entry(root: Path, wait_s: float) -> Iterator[Path]:
    """A uniquely named report directory, removed afterwards."""
    path = root / f"enclaveml-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        os.mkdir(path)
    except FileNotFoundError:
        raise ConfigError(f"{root}: no such directory: configfs-tsm is not available", _TSM_HINT) from None
    except OSError as exc:
        hint = f"run as root, or give this user write access to {root}"
        raise _fail(path, exc, "create a report entry", hint) from None
    deadline = time.monotonic() + wait_s
    while not (path / "generation").exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    try:
        yield path
    finally:
        _remove_entry(path)


def _remove_entry(path: Path) -> None:
    for _ in range(3):
        try:
            os.rmdir(path)  # configfs removes the attributes with the directory
            return
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                logger.warning("cannot remove report entry %s: %s", path, exc.strerror)
                return
        for child in path.iterdir():  # not configfs (an emulated tree): the attributes are files
            child.unlink(missing_ok=True)
    logger.warning("cannot remove report entry %s: not empty", path)


# -- simulation ---------------------------------------------------------------------------------


class SimulatedTee:
    """Simulated evidence signed by ``key``. INSECURE: for development only."""

    name = "sim"
    kind: TeeKind = "sim"

    def __init__(
        self, key: SimulationKey, measurement: bytes, nonce: bytes, *, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.key, self.measurement, self.nonce = key, measurement, nonce
        self.clock = clock or (lambda: datetime.now(UTC))

    def evidence(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        return create_sim_evidence(self.key, self.measurement, report_data, self.nonce, self.clock())


# -- detection ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeeProbe:
    """What was found for one kind of TEE.

    ``present``: its interface or device exists; ``usable``: ``detect_tee`` would pick it;
    ``evidence_ok``: ``None`` when not tried, else whether evidence for 64 zero bytes came back.
    """

    kind: TeeKind
    source: str  # "gramine", "configfs-tsm", "device", "sim" or "none"
    present: bool
    usable: bool
    detail: str  # what was found, or why it is not usable
    hint: str  # the fix (for the evidence when that failed), "" when there is nothing to do
    paths: tuple[str, ...]  # what was looked at
    evidence_ok: bool | None = None
    evidence_detail: str = ""


def _probe_gramine(root: Path, dev: Path) -> tuple[TeeProbe, Tee | None]:
    nodes = [dev / "sgx_enclave", dev / "sgx_provision"]
    paths = (str(root), *map(str, nodes))
    if root.is_dir():
        tee = GramineTee(root)
        try:
            kind = tee.attestation_type()
        except ConfigError as exc:
            return TeeProbe("sgx", "gramine", True, False, exc.what, exc.hint, paths), None
        if kind == "dcap":
            return TeeProbe("sgx", "gramine", True, True, f"Gramine enclave, {root}: dcap", "", paths), tee
        what = f"Gramine enclave, but {root / 'attestation_type'} is {kind!r}"
        return TeeProbe("sgx", "gramine", True, False, what, 'set sgx.remote_attestation = "dcap"', paths), None
    if found := [str(n) for n in nodes if n.exists()]:
        what = f"SGX device nodes {', '.join(found)} exist, but this process is not inside a Gramine enclave"
        return TeeProbe("sgx", "device", True, False, what, "run the workload under gramine-sgx", paths), None
    what = f"no {root} (not inside Gramine) and no {nodes[0]}"
    return TeeProbe("sgx", "none", False, False, what, "use an SGX machine with the in-kernel driver", paths), None


def _probe_tsm(root: Path, dev: Path) -> list[tuple[TeeProbe, Tee | None]]:
    tee, provider_kind, why = ConfigfsTsmTee(root), None, ""
    if root.is_dir():
        try:
            provider_kind = TSM_PROVIDERS.get(tee.provider)
            why = f"{root} provider is {tee.provider!r}"
        except ConfigError as exc:
            why = exc.what
    probes: list[tuple[TeeProbe, Tee | None]] = []
    nodes: tuple[tuple[TeeKind, Path], ...] = (("tdx", dev / "tdx_guest"), ("snp", dev / "sev-guest"))
    for kind, node in nodes:
        paths = (str(root), str(node))
        if provider_kind == kind:
            probes.append((TeeProbe(kind, "configfs-tsm", True, True, f"{why} ({_LABELS[kind]})", "", paths), tee))
        elif node.exists():
            what = f"{node} exists, but no usable configfs-tsm report ({why or f'no {root}'})"
            hint = "use kernel >= 6.7 with configfs-tsm; " + _TSM_HINT
            probes.append((TeeProbe(kind, "device", True, False, what, hint, paths), None))
        else:
            what = f"no {node}" + (f"; {why}" if why else f" and no {root}")
            hint = f"run in a {_LABELS[kind]} guest VM"
            probes.append((TeeProbe(kind, "none", False, False, what, hint, paths), None))
    return probes


def _scan(gramine_root: Path, tsm_root: Path, dev_root: Path) -> list[tuple[TeeProbe, Tee | None]]:
    return [_probe_gramine(gramine_root, dev_root), *_probe_tsm(tsm_root, dev_root)]


def _try_evidence(probe: TeeProbe, tee: Tee) -> TeeProbe:
    try:
        raw = tee.evidence(bytes(REPORT_DATA_SIZE))
        if isinstance(tee, SimulatedTee):
            keys = [tee.key.public_key]
            verify_sim_evidence(raw, trusted_keys=keys, expected_nonce=tee.nonce, now=tee.clock())
    except ConfigError as exc:
        return replace(probe, evidence_ok=False, evidence_detail=exc.what, hint=exc.hint)
    except Exception as exc:  # a diagnosis reports what went wrong, it does not crash
        return replace(probe, evidence_ok=False, evidence_detail=f"{type(exc).__name__}: {exc}")
    checked = ", signature verified" if isinstance(tee, SimulatedTee) else ""
    return replace(probe, evidence_ok=True, evidence_detail=f"{len(raw)} bytes from {tee.name}{checked}")


def probe_tees(
    *,
    gramine_root: Path = GRAMINE_ROOT,
    tsm_root: Path = TSM_ROOT,
    dev_root: Path = DEV_ROOT,
    try_evidence: bool = False,
    sim: SimulatedTee | None = None,
) -> list[TeeProbe]:
    """One probe per kind: sgx, tdx, snp, sim. ``try_evidence`` asks each usable TEE for evidence
    over 64 zero bytes (the simulated one signs with a throwaway key unless ``sim`` is given)."""
    detail = "simulated TEE (development only: proves nothing about the host; used only with --tee sim)"
    sim_probe = TeeProbe("sim", "sim", True, True, detail, "", ())
    sim = sim or SimulatedTee(SimulationKey.generate(), bytes(48), b"")
    found = [*_scan(gramine_root, tsm_root, dev_root), (sim_probe, sim)]
    return [_try_evidence(probe, tee) if try_evidence and tee else probe for probe, tee in found]


def detect_tee(
    *,
    gramine_root: Path = GRAMINE_ROOT,
    tsm_root: Path = TSM_ROOT,
    dev_root: Path = DEV_ROOT,
    want: TeeKind | Literal["auto"] = "auto",
    allow_sim: bool = False,
    sim: SimulatedTee | None = None,
) -> Tee:
    """The TEE to take evidence from: Gramine (SGX), else configfs-tsm (TDX / SEV-SNP).

    ``want`` restricts the choice to one kind; ``want="sim"`` explicitly asks for ``sim``. With
    ``want="auto"`` simulation is used only when no real TEE is present *and* ``allow_sim`` is
    true, and it is logged as insecure. Otherwise ``ConfigError("no TEE found: …")``.
    """
    if want not in (*get_args(TeeKind), "auto"):
        raise ValueError(f"want must be auto, sgx, tdx, snp or sim, got {want!r}")
    if (want == "sim" or allow_sim) and sim is None:
        raise ValueError("simulation was requested but no SimulatedTee was given")
    if want == "sim" and sim is not None:
        logger.warning("simulated TEE requested: its evidence proves nothing about the host (INSECURE)")
        return sim
    scanned = _scan(gramine_root, tsm_root, dev_root)
    for probe, tee in scanned:
        if tee is not None and probe.usable and want in ("auto", probe.kind):
            logger.info("TEE: %s (%s)", probe.kind, probe.detail)
            return tee
    reasons = "; ".join(f"{p.kind}: {p.detail}" for p, _ in scanned if want in ("auto", p.kind))
    if want == "auto" and allow_sim and sim is not None:
        logger.warning("no TEE found (%s); using the simulated TEE as allowed: INSECURE", reasons)
        return sim
    raise ConfigError(f"no {'TEE' if want == 'auto' else _LABELS[want]} found: {reasons}", _NO_TEE_HINT)
