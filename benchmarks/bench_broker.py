"""Key broker throughput: key releases per second and p50/p99 latency, SQLite and PostgreSQL.

16 client threads, each with its own keep-alive HTTPS connection (``BrokerClient``, httpx),
against the real broker (``BrokerServer``, uvicorn, TLS with a self-signed certificate on
127.0.0.1) running in a *separate process*, so clients and server do not share the GIL.
One release = what ``enclaveml run`` does per key: ``GET /v1/nonce``, simulated evidence
bound to a fresh X25519 key, ``POST /v1/keys/{name}/release``, opening the HPKE answer.
Baseline in the same run: as many plain ``GET /v1/health`` requests, same clients.
PostgreSQL is started by ``tests/broker/pg_server.py`` (skipped when its binaries are missing).

    python benchmarks/bench_broker.py [--releases 2000] [--clients 16] [--backend sqlite|postgresql]
Goal: >= 500 releases/s and p99 <= 50 ms on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "broker"))

GOAL_RATE = 500.0
GOAL_P99_MS = 50.0
KEY = "customers"
JOB = ["python", "job.py"]


def serve(url: str, workdir: Path) -> None:
    """Child process: a broker with one owner key, one sim policy and a workload app."""
    import hashlib
    import logging

    from enclaveml.broker.server import BrokerServer, make_self_signed
    from enclaveml.broker.store import BrokerStore

    # One "INSECURE: ... simulated evidence" warning per release would flood the output.
    logging.getLogger("enclaveml.attestation").setLevel(logging.ERROR)
    measurement = hashlib.sha384(b"bench job").hexdigest()
    cert, key = make_self_signed(workdir / "tls")
    store = BrokerStore(url, os.urandom(32))
    store.create_key(KEY)
    policy = f'name = "bench"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement}"]\n'
    store.register_policy("bench", policy, [KEY])
    workload = store.enroll_app("bench-workload", "workload")
    server = BrokerServer(store, port=0, tls_cert=cert, tls_key=key).start()
    info = {"url": server.url, "ca": str(cert), "app_id": workload.app.app_id, "api_key": workload.api_key.hex()}
    info["measurement"] = measurement
    print(json.dumps(info), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()
    store.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _drive(clients: list[object], total: int, op: Callable[[object], None]) -> tuple[float, list[float]]:
    """Run ``op`` ``total`` times spread over one thread per client; -> (seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))
    errors: list[BaseException] = []

    def worker(client: object) -> None:
        mine: list[float] = []
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            started = time.perf_counter()
            try:
                op(client)
            except BaseException as exc:
                errors.append(exc)
                return
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} operations failed, first: {errors[0]!r}")
    return elapsed, latencies


def bench_backend(backend: str, url: str, releases: int, n_clients: int) -> dict[str, object]:
    from enclaveml.attestation.sim import SimulationKey
    from enclaveml.attestation.tee import SimulatedTee
    from enclaveml.broker.client import BrokerClient
    from enclaveml.runtime.run import release_keys

    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", url, tmp], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            info = json.loads(child.stdout.readline())
            api_key = bytes.fromhex(info["api_key"])
            clients = [BrokerClient(info["url"], info["app_id"], api_key, ca=info["ca"]) for _ in range(n_clients)]
            tee = SimulatedTee(SimulationKey.generate(), bytes.fromhex(info["measurement"]), b"")

            def release(client: object) -> None:
                outcome = release_keys(client, tee, [KEY])  # type: ignore[arg-type]
                assert outcome.keys
                assert outcome.keys[0].name == KEY

            def health(client: object) -> None:
                client.health()  # type: ignore[attr-defined]

            _drive(clients, n_clients * 4, release)  # warm-up: connections, TLS sessions, caches
            seconds, latencies = _drive(clients, releases, release)
            h_seconds, h_latencies = _drive(clients, releases, health)
            for client in clients:
                client.close()
        finally:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=30)
    rate, h_rate = releases / seconds, releases / h_seconds
    return {
        "backend": backend,
        "releases": releases,
        "clients": n_clients,
        "releases_per_s": round(rate, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        "health_per_s": round(h_rate, 1),
        "health_p50_ms": round(_percentile(h_latencies, 0.50) * 1000, 2),
        "health_p99_ms": round(_percentile(h_latencies, 0.99) * 1000, 2),
        "release_to_health_ratio": round(rate / h_rate, 3),
        "goal_met": rate >= GOAL_RATE and _percentile(latencies, 0.99) * 1000 <= GOAL_P99_MS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], action="append")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--serve", nargs=2, metavar=("URL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], Path(args.serve[1]))
        return 0
    results: list[dict[str, object]] = []
    for backend in args.backend or ["sqlite", "postgresql"]:
        if backend == "sqlite":
            with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
                results.append(bench_backend(backend, f"sqlite:///{tmp}/broker.db", args.releases, args.clients))
            continue
        from pg_server import find_pg_bin, start_postgres

        bin_dir = find_pg_bin()
        if bin_dir is None:
            print("postgresql: skipped (no PostgreSQL server binaries)", file=sys.stderr)
            continue
        server = start_postgres(bin_dir)
        try:
            database = server.create_database()
            results.append(bench_backend(backend, server.url(database), args.releases, args.clients))
        finally:
            server.stop()
    if args.json:
        print(json.dumps({"results": results, "cpus": os.cpu_count()}, indent=2))
    else:
        header = "backend      releases/s  p50 ms  p99 ms  health/s  health p99 ms  ratio  goal (>=500/s, p99<=50ms)"
        print(header)
        for r in results:
            verdict = "PASS" if r["goal_met"] else "FAIL"
            print(
                f"{r['backend']:<12} {r['releases_per_s']:>10} {r['p50_ms']:>7} {r['p99_ms']:>7} "
                f"{r['health_per_s']:>9} {r['health_p99_ms']:>14} {r['release_to_health_ratio']:>6}  {verdict}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
