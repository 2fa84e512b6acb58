"""Key broker throughput: key releases per second and p50/p99 latency, SQLite and PostgreSQL.

16 clients, each with its own keep-alive HTTPS connection, against the real broker
(``BrokerServer``, uvicorn, TLS with a self-signed certificate on 127.0.0.1) running in a
*separate process*: ``server.serve_workers``, what ``enclaveml broker serve --workers N``
runs (``--workers``, default 1). One release = what ``enclaveml run`` does per key
(``runtime.run.release_keys``): ``GET /v1/nonce``, simulated evidence bound to a fresh
X25519 key, ``POST /v1/keys/{name}/release``, opening the HPKE answer and checking the key.
Baseline in the same run: as many plain ``GET /v1/health`` requests, same clients.
PostgreSQL is started by ``tests/broker/pg_server.py`` (skipped when its binaries are missing).

The load generator shares the machine with the broker, so its own CPU matters. The clients
run in ``--client-processes`` processes (each its share of the 16 client threads), and
``--client`` picks their HTTP stack:

- ``lean`` (default): :class:`LeanClient`, the same signed requests (``auth.sign_request``)
  over the standard library's ``http.client``; about half of httpx's CPU per release;
- ``httpx``: ``BrokerClient``, the client ``enclaveml run`` uses.

Both are ``runtime.run.BrokerLike``: the release protocol, its crypto and its checks are
the runtime's own. CPU time per release is reported for the broker's processes and for the
clients. A warm-up of 4 operations per client (connections, TLS sessions, caches) runs
straight into the measured ones, which all clients take from one shared counter.

    python benchmarks/bench_broker.py [--releases 2000] [--clients 16] [--backend sqlite|postgresql]
        [--workers 1] [--client lean|httpx] [--client-processes 2] [--json]
Goal: >= 500 releases/s and p99 <= 50 ms on a 2-core machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "broker"))

GOAL_RATE = 500.0
GOAL_P99_MS = 50.0
KEY = "customers"
_to_json, _from_json = json.dumps, json.loads  # LeanClient.request's argument is named json (BrokerLike)


def serve(url: str, workdir: Path, workers: int) -> None:
    """Child process: a broker with one owner key, one sim policy and a workload app."""
    import hashlib
    import logging

    from enclaveml.broker.server import BrokerServer, make_self_signed
    from enclaveml.broker.store import BrokerStore

    # One "INSECURE: ... simulated evidence" warning per release would flood the output.
    logging.getLogger("enclaveml.attestation").setLevel(logging.ERROR)
    measurement = hashlib.sha384(b"bench job").hexdigest()
    cert, key = make_self_signed(workdir / "tls")
    root_key = os.urandom(32)
    with BrokerStore(url, root_key) as store:
        store.create_key(KEY)
        policy = f'name = "bench"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement}"]\n'
        store.register_policy("bench", policy, [KEY])
        workload = store.enroll_app("bench-workload", "workload")
    info = {"ca": str(cert), "app_id": workload.app.app_id, "api_key": workload.api_key.hex()}
    info["measurement"] = measurement

    def make_server(index: int) -> BrokerServer:  # in each worker process
        return BrokerServer(BrokerStore(url, root_key), port=0, tls_cert=cert, tls_key=key)

    try:
        from enclaveml.broker.server import serve_workers
    except ImportError:  # a broker from before serve_workers (baseline runs): one server in a thread
        with BrokerStore(url, root_key) as store:
            server = BrokerServer(store, port=0, tls_cert=cert, tls_key=key).start()
            print(json.dumps(info | {"url": server.url}), flush=True)
            sys.stdin.read()  # until the parent closes our stdin
            server.stop()
        return
    with serve_workers(workers, make_server) as pool:  # what `broker serve --workers N` runs
        print(json.dumps(info | {"url": pool.url}), flush=True)
        sys.stdin.read()


class LeanClient:
    """Signed broker requests over one keep-alive ``http.client`` HTTPS connection (module docstring)."""

    def __init__(self, url: str, app_id: str, api_key: bytes, ca: str) -> None:
        from enclaveml.broker.auth import derive_signing_key

        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        self._conn = http.client.HTTPSConnection(
            parts.hostname, parts.port, context=ssl.create_default_context(cafile=ca), timeout=30
        )
        self._app_id, self._key = app_id, derive_signing_key(api_key)

    def request(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        from datetime import UTC, datetime

        from enclaveml.broker.auth import sign_request

        body = b"" if json is None else _to_json(json).encode()
        headers = sign_request(self._app_id, self._key, method, path, body, now=datetime.now(UTC))
        if json is not None:
            headers["Content-Type"] = "application/json"
        return self._call(method, path, body, headers)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/v1/health", b"", {})

    def _call(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        self._conn.request(method, path, body=body or None, headers=headers)
        response = self._conn.getresponse()
        answer: dict[str, Any] = _from_json(response.read())
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status} {answer}")
        return answer

    def close(self) -> None:
        self._conn.close()


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its live descendants (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in tree)


def _own_cpu_s() -> float:
    usage = os.times()
    return usage.user + usage.system


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _drive(clients: list[Any], take: Callable[[], int | None], op: Callable[[Any], None], warm: int) -> list[Any]:
    """Run ``op`` on one thread per client while ``take()`` hands out operation numbers; the first
    ``warm`` are the warm-up. -> ``(start, end)`` (monotonic seconds) of every other operation."""
    timings: list[tuple[float, float]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(client: Any) -> None:
        mine: list[tuple[float, float]] = []
        while (number := take()) is not None:
            started = time.monotonic()
            try:
                op(client)
            except BaseException as exc:
                errors.append(exc)
                return
            if number >= warm:
                mine.append((started, time.monotonic()))
        with lock:
            timings.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} operations failed, first: {errors[0]!r}")
    return timings


def _client_process(
    info: dict[str, str], kind: str, lean: bool, n_clients: int, plan: tuple[int, int], shared: Any, sync: Any, out: Any
) -> None:
    """One load-generator process: ``n_clients`` threads taking operations from the shared counter.

    ``plan``: (warm-up operations, total operations) for all processes together. The warm-up
    (connections, TLS sessions, caches) runs into the measured operations without a pause;
    ``sync``: (barrier to start together, event set when the first measured operation starts).
    """
    import logging

    from enclaveml.attestation.sim import SimulationKey
    from enclaveml.attestation.tee import SimulatedTee
    from enclaveml.broker.client import BrokerClient
    from enclaveml.runtime.run import release_keys

    logging.getLogger("enclaveml").setLevel(logging.ERROR)
    api_key = bytes.fromhex(info["api_key"])
    clients: list[Any] = [
        LeanClient(info["url"], info["app_id"], api_key, info["ca"])
        if lean
        else BrokerClient(info["url"], info["app_id"], api_key, ca=info["ca"])
        for _ in range(n_clients)
    ]
    tee = SimulatedTee(SimulationKey.generate(), bytes.fromhex(info["measurement"]), b"")

    def release(client: Any) -> None:
        outcome = release_keys(client, tee, [KEY])
        assert [k.name for k in outcome.keys] == [KEY]

    def health(client: Any) -> None:
        assert client.health()["status"] == "ok"

    warm, total = plan
    start, measuring = sync
    cpu_at_start: list[float] = []

    def take() -> int | None:
        with shared.get_lock():
            number = shared.value
            if number >= total:
                return None
            shared.value = number + 1
        if number >= warm and not cpu_at_start:
            cpu_at_start.append(_own_cpu_s())  # this process's first measured operation
            measuring.set()
        return number

    start.wait()
    timings = _drive(clients, take, release if kind == "release" else health, warm)
    cpu = _own_cpu_s() - (cpu_at_start[0] if cpu_at_start else _own_cpu_s())
    out.put({"timings": timings, "cpu": cpu})
    for client in clients:
        client.close()


def _phase(info: dict[str, str], kind: str, args: argparse.Namespace, server_pid: int) -> dict[str, Any]:
    """``args.releases`` operations of ``kind`` (after a warm-up) from all client processes at once."""
    context = multiprocessing.get_context("spawn")
    processes = max(1, min(args.client_processes, args.clients))
    warm = args.clients * 4
    shared = context.Value("q", 0)
    start, measuring = context.Barrier(processes), context.Event()
    out = context.Queue()
    shares = [args.clients // processes + (1 if i < args.clients % processes else 0) for i in range(processes)]
    plan = (warm, warm + args.releases)
    children = [
        context.Process(
            target=_client_process,
            args=(info, kind, args.client == "lean", n, plan, shared, (start, measuring), out),
        )
        for n in shares
    ]
    for child in children:
        child.start()
    if not measuring.wait(timeout=300):
        raise RuntimeError(f"{kind}: the load generator never got past its warm-up")
    server_cpu = _tree_cpu_s(server_pid)
    reports = [out.get(timeout=600) for _ in children]
    server_cpu = _tree_cpu_s(server_pid) - server_cpu
    for child in children:
        child.join(timeout=30)
    timings = [t for r in reports for t in r["timings"]]
    if len(timings) != args.releases:
        raise RuntimeError(f"{kind}: {len(timings)} of {args.releases} operations completed")
    seconds = max(end for _start, end in timings) - min(start for start, _end in timings)
    return {
        "rate": args.releases / seconds,
        "latencies": [end - begin for begin, end in timings],
        "server_cpu_ms": server_cpu / args.releases * 1000,
        "client_cpu_ms": sum(r["cpu"] for r in reports) / args.releases * 1000,
    }


def bench_backend(backend: str, url: str, args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", url, tmp, str(args.workers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            info = json.loads(child.stdout.readline())
            releases = _phase(info, "release", args, child.pid)
            health = _phase(info, "health", args, child.pid)
        finally:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=30)
    latencies, h_latencies = releases["latencies"], health["latencies"]
    rate, h_rate = releases["rate"], health["rate"]
    p99 = _percentile(latencies, 0.99) * 1000
    return {
        "backend": backend,
        "workers": args.workers,
        "client": args.client,
        "client_processes": args.client_processes,
        "releases": args.releases,
        "clients": args.clients,
        "releases_per_s": round(rate, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p90_ms": round(_percentile(latencies, 0.90) * 1000, 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
        "server_cpu_ms_per_release": round(releases["server_cpu_ms"], 3),
        "client_cpu_ms_per_release": round(releases["client_cpu_ms"], 3),
        "health_per_s": round(h_rate, 1),
        "health_p50_ms": round(_percentile(h_latencies, 0.50) * 1000, 2),
        "health_p99_ms": round(_percentile(h_latencies, 0.99) * 1000, 2),
        "health_server_cpu_ms": round(health["server_cpu_ms"], 3),
        "health_client_cpu_ms": round(health["client_cpu_ms"], 3),
        "release_to_health_ratio": round(rate / h_rate, 3),
        "goal_met": rate >= GOAL_RATE and p99 <= GOAL_P99_MS,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], action="append")
    parser.add_argument("--workers", type=int, default=1, help="broker processes (serve_workers)")
    parser.add_argument("--client", choices=["lean", "httpx"], default="lean", help="the load generator's HTTP client")
    parser.add_argument("--client-processes", type=int, default=2, help="load-generator processes")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--serve", nargs=3, metavar=("URL", "DIR", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], Path(args.serve[1]), int(args.serve[2]))
        return 0
    results: list[dict[str, object]] = []
    for backend in args.backend or ["sqlite", "postgresql"]:
        if backend == "sqlite":
            with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
                results.append(bench_backend(backend, f"sqlite:///{tmp}/broker.db", args))
            continue
        from pg_server import find_pg_bin, start_postgres

        bin_dir = find_pg_bin()
        if bin_dir is None:
            print("postgresql: skipped (no PostgreSQL server binaries)", file=sys.stderr)
            continue
        server = start_postgres(bin_dir)
        try:
            database = server.create_database()
            results.append(bench_backend(backend, server.url(database), args))
        finally:
            server.stop()
    if args.json:
        print(json.dumps({"results": results, "cpus": os.cpu_count()}, indent=2))
    else:
        print(
            "backend     workers client  releases/s  p50 ms  p99 ms  cpu ms/release (broker+clients)"
            "  health/s  health p99  goal (>=500/s, p99<=50ms)"
        )
        for r in results:
            verdict = "PASS" if r["goal_met"] else "FAIL"
            cpu = f"{r['server_cpu_ms_per_release']:.2f} + {r['client_cpu_ms_per_release']:.2f}"
            print(
                f"{r['backend']:<11} {r['workers']:>7} {r['client']:<6} {r['releases_per_s']:>11} {r['p50_ms']:>7} "
                f"{r['p99_ms']:>7}  {cpu:>30}  {r['health_per_s']:>8} {r['health_p99_ms']:>11}  {verdict}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
