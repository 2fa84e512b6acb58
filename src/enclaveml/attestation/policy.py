"""One attestation policy format for every TEE: reference values and what may be weaker.

A policy is a TOML (or JSON) document; ``docs/attestation/sim-and-policy.md`` lists every
field. ``Policy.evaluate(claims, now=...)`` runs every check and returns a ``Decision``
listing *all* failures (check, expected, actual, hint); ``Policy.verify`` raises
``PolicyViolation`` naming the first one. Defaults are secure: UpToDate TCB only, no debug
enclaves, no simulation. Anything weaker is opted into by name, marks the decision
``insecure`` and is logged as a warning naming the policy.

The TCB opt-ins mirror Gramine's RA-TLS variables exactly (tee-formats.md §2.2):
``allow_outdated_tcb_insecure`` admits OutOfDate (and expired collateral),
``allow_hw_config_insecure`` ConfigurationNeeded, ``allow_sw_hardening_needed``
SWHardeningNeeded; OutOfDateConfigurationNeeded needs outdated *and* hw-config, and
ConfigurationAndSWHardeningNeeded needs hw-config *and* sw-hardening.
"""

from __future__ import annotations

import difflib
import json
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.errors import PolicyError

__all__ = ["GRAMINE_OPT_INS", "NEVER_ALLOWED", "SECURE_STATUSES", "Decision", "Failure", "Policy", "PolicyViolation"]

logger = logging.getLogger("enclaveml.attestation")
_E = TypeVar("_E", TeeType, TcbStatus)

NEVER_ALLOWED = (TcbStatus.REVOKED, TcbStatus.TCB_NOT_SUPPORTED, TcbStatus.SIMULATED)
SECURE_STATUSES = frozenset({TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED})
# Accepted byte lengths. mr_enclave: 32 = SGX MRENCLAVE (SHA-256), 48 = simulated measurement (SHA-384).
_HEX_SIZES: dict[str, tuple[int, ...]] = {"mr_enclave": (32, 48), "mr_signer": (32,)}
_HEX_SIZES |= dict.fromkeys(("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id"), (48,))
_BOOLS = (
    "allow_debug",
    "allow_outdated_tcb_insecure",
    "allow_hw_config_insecure",
    "allow_sw_hardening_needed",
    "allow_simulation",
)
# Gramine's RA-TLS table (tee-formats.md §2.2): status -> every opt-in it needs.
GRAMINE_OPT_INS = {
    TcbStatus.OUT_OF_DATE: ("allow_outdated_tcb_insecure",),
    TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED: ("allow_outdated_tcb_insecure", "allow_hw_config_insecure"),
    TcbStatus.CONFIGURATION_NEEDED: ("allow_hw_config_insecure",),
    TcbStatus.SW_HARDENING_NEEDED: ("allow_sw_hardening_needed",),
    TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED: ("allow_hw_config_insecure", "allow_sw_hardening_needed"),
}


@dataclass(frozen=True)
class Failure:
    """One failed check: its name, what the policy expected, what the claims showed, the fix."""

    check: str
    expected: str
    actual: str
    hint: str
    what: str  # the one-line sentence shown to a person


@dataclass(frozen=True)
class Decision:
    """The outcome of ``Policy.evaluate``: every failed check, and whether trust was weakened."""

    policy: str
    allowed: bool
    failures: list[Failure] = field(default_factory=list)
    insecure: bool = False
    insecure_reasons: list[str] = field(default_factory=list)


class PolicyViolation(PolicyError):
    """Claims do not satisfy a policy. ``decision`` holds every failure, not just the first."""

    def __init__(self, decision: Decision) -> None:
        first = decision.failures[0]
        what = first.what
        if len(decision.failures) > 1:
            others = ", ".join(f.check for f in decision.failures[1:])
            what += f"; {len(decision.failures) - 1} more failed check(s): {others}"
        super().__init__(what, first.hint)
        self.decision = decision


@dataclass(frozen=True)
class Policy:
    """Reference values and allowances. Every parameter, its default and meaning:

    - ``name``: shown in every refusal and log line (required).
    - ``tee``: allowed TEE types, default ``(sgx, tdx)``; ``sim`` only with ``allow_simulation``.
    - ``mr_enclave``, ``mr_signer``, ``isv_prod_id``, ``min_isv_svn``: SGX (and sim) identity.
    - ``mr_td``, ``rtmr0``..``rtmr3``, ``mr_config_id``: TDX identity. ``None`` = not checked;
      a tuple lists the accepted values. Each allowed TEE needs at least one measurement.
    - ``allow_debug``: accept debug enclaves / TDs (insecure), default false.
    - ``allowed_tcb_statuses``: default ``(UpToDate,)``; Revoked and TcbNotSupported never.
    - ``allow_outdated_tcb_insecure``, ``allow_hw_config_insecure``, ``allow_sw_hardening_needed``:
      Gramine's opt-ins (module docstring), added to ``allowed_tcb_statuses``.
    - ``allowed_advisory_ids``: when set, any advisory not listed fails. Default: not checked.
    - ``allow_simulation``: accept simulated evidence (proves nothing; insecure), default false.
    """

    name: str
    tee: tuple[TeeType, ...] = (TeeType.SGX, TeeType.TDX)
    mr_enclave: tuple[bytes, ...] | None = None
    mr_signer: tuple[bytes, ...] | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    mr_td: tuple[bytes, ...] | None = None
    rtmr0: tuple[bytes, ...] | None = None
    rtmr1: tuple[bytes, ...] | None = None
    rtmr2: tuple[bytes, ...] | None = None
    rtmr3: tuple[bytes, ...] | None = None
    mr_config_id: tuple[bytes, ...] | None = None
    allow_debug: bool = False
    allowed_tcb_statuses: tuple[TcbStatus, ...] = (TcbStatus.UP_TO_DATE,)
    allow_outdated_tcb_insecure: bool = False
    allow_hw_config_insecure: bool = False
    allow_sw_hardening_needed: bool = False
    allowed_advisory_ids: tuple[str, ...] | None = None
    allow_simulation: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise PolicyError("policy has no `name`", "name the policy; refusals and logs show it")
        if not self.tee:
            raise PolicyError(f"policy {self.name}: `tee` is empty", 'list the allowed TEEs, e.g. tee = ["sgx"]')
        if TeeType.SNP in self.tee:
            raise PolicyError(f"policy {self.name}: tee snp has no reference values yet", "allow sgx or tdx")
        if TeeType.SIM in self.tee and not self.allow_simulation:
            raise PolicyError(f"policy {self.name}: `tee` lists sim", "set `allow_simulation = true` instead")
        for status in self.allowed_tcb_statuses:
            if status in NEVER_ALLOWED:
                raise PolicyError(
                    f"policy {self.name}: TCB status {status} can never be allowed",
                    "remove it from `allowed_tcb_statuses`"
                    + ("; use `allow_simulation`" if status is TcbStatus.SIMULATED else "; update the platform"),
                )
        for name, sizes in _HEX_SIZES.items():
            values = getattr(self, name)
            if values is not None and not values:
                raise PolicyError(f"policy {self.name}: `{name}` is empty", "omit the field to not check it")
            for value in values or ():
                if len(value) not in sizes:
                    raise PolicyError(
                        f"policy {self.name}: `{name}` value has {len(value)} bytes",
                        f"expected {' or '.join(str(s) for s in sizes)} bytes ({2 * sizes[0]} hex digits)",
                    )
        for name in ("isv_prod_id", "min_isv_svn"):
            number = getattr(self, name)
            if number is not None and not 0 <= number <= 0xFFFF:
                raise PolicyError(f"policy {self.name}: `{name}` = {number} is out of range", "use 0..65535")

    @property
    def tcb_statuses(self) -> frozenset[TcbStatus]:
        """The statuses this policy accepts: the list plus the Gramine-style opt-ins."""
        opted_in = {status for status, needs in GRAMINE_OPT_INS.items() if all(getattr(self, n) for n in needs)}
        return frozenset(self.allowed_tcb_statuses) | opted_in

    # -- reading and writing -------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read a policy file: JSON when the name ends in ``.json``, TOML otherwise."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc}", "check the path") from exc
        try:
            return cls.from_text(text, fmt="json" if path.suffix.lower() == ".json" else "toml")
        except PolicyError as exc:  # not exc.about(path): that leaves str(exc) without the path
            raise PolicyError(f"{path}: {exc.what}", exc.hint) from None

    @classmethod
    def from_text(cls, text: str, *, fmt: str = "toml") -> Policy:
        if fmt not in ("toml", "json"):
            raise ValueError(f"fmt must be 'toml' or 'json', not {fmt!r}")
        try:
            data = json.loads(text) if fmt == "json" else tomllib.loads(text)
        except ValueError as exc:
            raise PolicyError(f"policy is not valid {fmt.upper()}: {exc}", "fix the syntax") from None
        if not isinstance(data, dict):
            raise PolicyError("policy must be a table / object of fields", "see docs/attestation/sim-and-policy.md")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """Build a policy from parsed TOML/JSON. Unknown fields are refused (typo protection)."""
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"known fields: {', '.join(known)}"
                raise PolicyError(f"unknown policy field `{key}`", hint)
        name = d.get("name")
        if not isinstance(name, str):
            raise PolicyError("policy field `name` must be a string", 'e.g. name = "training-job"')
        kwargs: dict[str, Any] = {"name": name}
        if "tee" in d:
            kwargs["tee"] = tuple(_enum(TeeType, v, "tee") for v in _strings(d["tee"], "tee"))
        for key in _HEX_SIZES:
            if key in d:
                kwargs[key] = tuple(_hex(v, key) for v in _strings(d[key], key))
        for key in ("isv_prod_id", "min_isv_svn"):
            if key in d:
                if not isinstance(d[key], int) or isinstance(d[key], bool):
                    raise PolicyError(f"policy field `{key}` must be an integer", f"e.g. {key} = 1")
                kwargs[key] = d[key]
        for key in _BOOLS:
            if key in d:
                if not isinstance(d[key], bool):
                    raise PolicyError(f"policy field `{key}` must be true or false", f"e.g. {key} = false")
                kwargs[key] = d[key]
        if "allowed_tcb_statuses" in d:
            values = _strings(d["allowed_tcb_statuses"], "allowed_tcb_statuses")
            kwargs["allowed_tcb_statuses"] = tuple(_enum(TcbStatus, v, "allowed_tcb_statuses") for v in values)
        if "allowed_advisory_ids" in d:
            kwargs["allowed_advisory_ids"] = tuple(_strings(d["allowed_advisory_ids"], "allowed_advisory_ids"))
        return cls(**kwargs)

    def to_toml(self) -> str:
        """Deterministic TOML that ``Policy.from_text`` reads back into an equal policy."""
        lines = ["# enclaveml attestation policy", f"name = {_toml_str(self.name)}"]
        lines.append(f"tee = {_toml_list(str(t) for t in self.tee)}")
        for key in ("mr_enclave", "mr_signer", "isv_prod_id", "min_isv_svn", *list(_HEX_SIZES)[2:]):
            value = getattr(self, key)
            if isinstance(value, int):
                lines.append(f"{key} = {value}")
            elif value is not None:
                lines.append(f"{key} = {_toml_list(v.hex() for v in value)}")
        lines.append(f"allowed_tcb_statuses = {_toml_list(str(s) for s in self.allowed_tcb_statuses)}")
        if self.allowed_advisory_ids is not None:
            lines.append(f"allowed_advisory_ids = {_toml_list(self.allowed_advisory_ids)}")
        lines += [f"{key} = {'true' if getattr(self, key) else 'false'}" for key in _BOOLS]
        return "\n".join(lines) + "\n"

    # -- evaluation ----------------------------------------------------------------------

    def verify(self, claims: Claims, *, now: datetime) -> Decision:
        """Evaluate and raise ``PolicyViolation`` (a ``PolicyError``) unless allowed."""
        decision = self.evaluate(claims, now=now)
        if not decision.allowed:
            raise PolicyViolation(decision)
        return decision

    def evaluate(self, claims: Claims, *, now: datetime) -> Decision:
        """Run every check against ``claims`` at ``now`` (timezone-aware); list all failures."""
        run = _Evaluation(self)
        simulated = claims.tee is TeeType.SIM or claims.insecure
        # 1. Which TEE. Simulation is its own opt-in: it proves nothing about the host.
        if simulated:
            if self.allow_simulation:
                run.weakened("simulated evidence (proves nothing about the host)")
            else:
                run.fail(
                    "allow_simulation", "TEE", "a hardware TEE", "sim",
                    "simulation proves nothing about the host: use a real TEE, "
                    "or set `allow_simulation = true` for development only",
                )  # fmt: skip
        elif claims.tee not in self.tee:
            run.fail("tee", "TEE", _one_of(self.tee), str(claims.tee), "add it to `tee` with its reference values")
        # 2. Debug mode exposes enclave memory to the host (tee-formats.md §1.7 step 14).
        if claims.debug:
            if self.allow_debug:
                run.weakened("debug enclave")
            else:
                run.fail("debug", "debug mode", "off", "on", "run a production build, or set `allow_debug = true`")
        # 3. Platform TCB status, Gramine-style opt-ins (§2.2).
        if not (simulated and claims.tcb_status is TcbStatus.SIMULATED):
            self._check_tcb(run, claims, now)
        # 4. Reference values of the claims' TEE.
        if claims.tee in (TeeType.SGX, TeeType.SIM):
            self._check_values(run, claims, ("mr_enclave", "mr_signer"), [claims.mr_enclave, claims.mr_signer])
            run.match("isv_prod_id", "ISVPRODID", self.isv_prod_id, claims.isv_prod_id)
            if self.min_isv_svn is not None and (claims.isv_svn is None or claims.isv_svn < self.min_isv_svn):
                actual = "(absent)" if claims.isv_svn is None else str(claims.isv_svn)
                run.fail("min_isv_svn", "ISVSVN", f">= {self.min_isv_svn}", actual, "deploy a newer enclave build")
        elif claims.tee is TeeType.TDX:
            rtmrs = list(claims.rtmrs or ()) + [None] * 4
            keys = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id")
            self._check_values(run, claims, keys, [claims.mr_td, *rtmrs[:4], claims.mr_config_id])
        return run.decision()

    def _check_tcb(self, run: _Evaluation, claims: Claims, now: datetime) -> None:
        status = claims.tcb_status
        if status not in self.tcb_statuses:
            knob = " with ".join(f"`{n} = true`" for n in GRAMINE_OPT_INS.get(status, ()))
            hint = (
                f"allow it with `allowed_tcb_statuses`{' or ' + knob if knob else ''}, or update the platform"
                if status not in NEVER_ALLOWED
                else "this status can never be allowed; update the platform (microcode, BIOS, TCB recovery)"
            )
            allowed = _one_of(sorted(self.tcb_statuses, key=lambda s: s.severity))
            run.fail("tcb_status", "TCB status", allowed, str(status), hint)
        elif status not in SECURE_STATUSES:
            run.weakened(f"TCB status {status}")
        expiry = claims.collateral_expiry
        if expiry is not None and expiry <= now:
            if self.allow_outdated_tcb_insecure:  # Gramine: expired collateral needs the OUTDATED opt-in
                run.weakened(f"collateral expired at {expiry.isoformat()}")
            else:
                run.fail(
                    "collateral_expiry", "collateral expiring", f"after {now.isoformat()}", expiry.isoformat(),
                    "refresh the collateral from PCCS (`enclaveml doctor` checks it), "
                    "or set `allow_outdated_tcb_insecure = true`",
                )  # fmt: skip
        if self.allowed_advisory_ids is not None:
            unlisted = [a for a in claims.advisory_ids if a not in self.allowed_advisory_ids]
            if unlisted:
                expected = _one_of(self.allowed_advisory_ids) if self.allowed_advisory_ids else "none"
                run.fail(
                    "advisory_ids", "advisory", expected, ", ".join(unlisted),
                    "review the advisories and list them in `allowed_advisory_ids`, or update the platform",
                )  # fmt: skip

    def _check_values(
        self, run: _Evaluation, claims: Claims, keys: tuple[str, ...], actuals: list[bytes | None]
    ) -> None:
        if all(getattr(self, key) is None for key in keys):
            if claims.tee in self.tee or (claims.tee is TeeType.SIM and self.allow_simulation):
                wanted = f"one of {', '.join(keys)}"
                run.fail(
                    "reference_values", "measurement", wanted, "(none)",
                    f"pin the workload: `enclaveml policy from-sig` writes `{keys[0]}`",
                    f"policy {self.name} pins no measurement for {claims.tee} (expected {wanted} in the policy)",
                )  # fmt: skip
            return
        for key, actual in zip(keys, actuals, strict=True):
            expected: tuple[bytes, ...] | None = getattr(self, key)
            if expected is not None and actual not in expected:
                shown = "(absent)" if actual is None else actual.hex()
                run.fail(
                    key, key.upper(), _one_of(v.hex() for v in expected), shown,
                    f"this is not the workload the policy names; rebuild it or add the value to `{key}`",
                )  # fmt: skip


class _Evaluation:
    """Collects failures and weakened-trust reasons while a policy is evaluated."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.failures: list[Failure] = []
        self.reasons: list[str] = []

    def fail(self, check: str, label: str, expected: str, actual: str, hint: str, what: str = "") -> None:
        what = what or f"{label} {actual} is not allowed by policy {self.policy.name} (expected {expected})"
        self.failures.append(Failure(check, expected, actual, hint, what))

    def match(self, check: str, label: str, expected: int | None, actual: int | None) -> None:
        if expected is not None and actual != expected:
            shown = "(absent)" if actual is None else str(actual)
            self.fail(check, label, str(expected), shown, f"this is not the product the policy names; check `{check}`")

    def weakened(self, reason: str) -> None:
        self.reasons.append(reason)

    def decision(self) -> Decision:
        allowed = not self.failures
        if allowed and self.reasons:
            logger.warning(
                "INSECURE: policy %s accepted claims with weakened trust: %s", self.policy.name, "; ".join(self.reasons)
            )
        return Decision(self.policy.name, allowed, self.failures, bool(self.reasons), self.reasons)


def _one_of(values: Any) -> str:
    items = [str(v) for v in values]
    return items[0] if len(items) == 1 else "one of " + ", ".join(items)


def _strings(value: object, key: str) -> list[str]:
    """A string or a list of strings, as a list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise PolicyError(f"policy field `{key}` must be a string or a list of strings", f'e.g. {key} = ["..."]')
    return list(items)


def _enum(kind: type[_E], value: str, key: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(str(v) for v in kind)
        raise PolicyError(f"policy field `{key}`: unknown value {value!r}", f"use one of {names}") from None


def _hex(value: str, key: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise PolicyError(f"policy field `{key}`: {value!r} is not hex", "write measurements as hex digits") from None


def _toml_str(value: str) -> str:
    """A TOML basic string: escape quote, backslash and every control character."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_list(values: Any) -> str:
    return "[" + ", ".join(_toml_str(str(v)) for v in values) + "]"
