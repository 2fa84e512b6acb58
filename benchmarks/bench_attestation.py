"""Attestation throughput on one core (not a test): how many quotes a verifier checks per second.

For each real DCAP vector in ``shared/vectors/dcap`` (SGX v3, TDX v4, TDX v5) it measures,
pinned to one CPU, with the collateral parsed once beforehand (as the key broker caches it):

1. ``verify_quote(bytes, collateral)``: parse + every verification step (PCK chain, CRLs,
   TCB Info / QE Identity signatures, QE report, quote signature, TCB level matching);
2. ``verify_evidence(bytes)``: the same through the dispatcher (kind detection added);
3. ``parse_quote(bytes)``: parsing only (including the PCK certificate chain).

It also times simulated-evidence verification, the one-off collateral parse, and one
``enclaveml attest verify`` process end to end (interpreter start-up included). Each rate
is the median over ``--rounds`` rounds of ``--seconds`` each. The goal is >= 200 full
verifications per second per core; the ratio is rate / goal. Exit status is always 0
unless a verification gives an unexpected verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import cryptography

from enclaveml.attestation.collateral import Collateral
from enclaveml.attestation.dcap import verify_quote
from enclaveml.attestation.evidence import verify_evidence
from enclaveml.attestation.quote import parse_quote
from enclaveml.attestation.sim import SimulationKey, create_sim_evidence
from enclaveml.attestation.sim import verify_sim_evidence as verify_sim

DCAP = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "dcap"
GOAL_PER_S = 200.0
VECTORS = (
    ("SGX quote v3", "dcapqvl_sgx_quote_v3", datetime(2025, 7, 1, tzinfo=UTC), "ConfigurationAndSWHardeningNeeded"),
    ("TDX quote v4", "dcapqvl_tdx_quote_v4", datetime(2025, 7, 1, tzinfo=UTC), "UpToDate"),
    ("TDX quote v5", "dcapqvl_tdx_quote_v5_notcbmatch", datetime(2026, 3, 1, tzinfo=UTC), "TcbNotSupported"),
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pin_to_one_core() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def rate(call: Callable[[], object], seconds: float, rounds: int) -> float:
    """Calls per second: the median of ``rounds`` timed runs of about ``seconds`` each."""
    call()  # warm up (imports, caches of the crypto library)
    results = []
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        deadline = start + seconds
        while True:
            call()
            count += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        results.append(count / (now - start))
    return statistics.median(results)


def cli_latency(name: str, at: datetime, runs: int) -> float:
    """Median wall time of one `enclaveml attest verify` process, start-up included."""
    enclaveml = str(Path(sys.executable).with_name("enclaveml"))
    args = [enclaveml, "attest", "verify", str(DCAP / f"{name}.bin")]
    args += ["--collateral", str(DCAP / f"{name}_collateral.json"), "--at", at.isoformat(), "--json"]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed round [1.0]")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per measurement; the median counts [5]")
    parser.add_argument("--cli-runs", type=int, default=5, help="`attest verify` processes to time [5]")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    options = parser.parse_args()

    pinning = pin_to_one_core()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs; {pinning})")
    print(f"Python {platform.python_version()}, cryptography {cryptography.__version__}, {datetime.now(UTC):%Y-%m-%d}")
    print(f"{options.rounds} rounds x {options.seconds:g} s per measurement; goal >= {GOAL_PER_S:.0f} verifications/s")
    print()
    results: dict[str, dict[str, float | str]] = {}
    header = (
        f"{'evidence':<14} {'verify/s':>9} {'ratio':>6} {'':4} {'dispatch/s':>10} {'parse/s':>8} {'collateral ms':>13}"
    )
    print(header)
    for label, name, at, expected in VECTORS:
        raw = (DCAP / f"{name}.bin").read_bytes()
        document = json.loads((DCAP / f"{name}_collateral.json").read_text())
        start = time.perf_counter()
        collateral = Collateral.from_dict(document)  # parsed once, then reused like a cache
        collateral_ms = (time.perf_counter() - start) * 1000
        verdict = verify_quote(raw, collateral, now=at).status
        if str(verdict) != expected:
            print(f"{label}: unexpected verdict {verdict}, expected {expected}", file=sys.stderr)
            return 1
        timing = (options.seconds, options.rounds)
        full = rate(partial(verify_quote, raw, collateral, now=at), *timing)
        dispatched = rate(partial(verify_evidence, raw, now=at, collateral=collateral), *timing)
        parsed = rate(partial(parse_quote, raw), *timing)
        verdict_word = "PASS" if full >= GOAL_PER_S else "MISS"
        print(
            f"{label:<14} {full:>9.0f} {full / GOAL_PER_S:>6.2f} {verdict_word:4} {dispatched:>10.0f} "
            f"{parsed:>8.0f} {collateral_ms:>13.1f}"
        )
        results[label] = {
            "verify_per_s": full,
            "dispatch_per_s": dispatched,
            "parse_per_s": parsed,
            "ratio_to_goal": full / GOAL_PER_S,
            "goal": verdict_word,
            "collateral_parse_ms": collateral_ms,
            "status": str(verdict),
        }

    key = SimulationKey.generate()
    now = datetime.now(UTC)
    sim = create_sim_evidence(key, bytes(48), bytes(64), b"", now)
    sim_rate = rate(lambda: verify_sim(sim, trusted_keys=[key.public_key], expected_nonce=None, now=now), 0.5, 3)
    print(f"\nsimulated evidence: {sim_rate:.0f} verifications/s")
    latency = cli_latency(VECTORS[0][1], VECTORS[0][2], options.cli_runs)
    print(
        f"`enclaveml attest verify` SGX v3, one process end to end: {latency * 1000:.0f} ms"
        f" (median of {options.cli_runs})"
    )
    results["sim"] = {"verify_per_s": sim_rate}
    results["cli_sgx_v3_ms"] = {"median_ms": latency * 1000}
    if options.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
