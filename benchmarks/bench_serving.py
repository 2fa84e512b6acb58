"""Model serving: our server (TLS, encrypted model) against ONNX Runtime in-process; small-model requests/s.

Three measurements, each against a baseline measured in the same run:

1. **Model open time**: ResNet-50 (random weights, ~100 MB, ``sample_models.resnet50_onnx``)
   and the small sklearn classifier, as EML files and as Gramine protected files, opened by
   ``ModelRepository`` (read + verify + decrypt, then the ONNX Runtime session), against
   building the session from plaintext bytes.
2. **ResNet-50 through the server**: ``enclaveml serve`` in its own process (one-way TLS, the
   EML model, ``--workers 1``), driven by the load client (``serving/load_client.py``, one
   gRPC channel per client) against ONNX Runtime called in this process on the same model
   and data shape, with as many threads as clients and the same number of requests. Batch 1
   and 16, 1 and 4 clients. Goals: throughput ratio >= 0.95, added p50 at batch 1 / 1 client
   <= 3 ms.
3. **Small-model requests/s**: the sklearn classifier over gRPC + TLS, 4 and 16 clients,
   ``--workers 1`` and ``--workers 2``, against the Python gRPC ceiling: bare servers in
   their own processes answering every Predict with fixed bytes (same TLS, same client), one
   ``grpc.aio`` and one synchronous ``grpc.server`` with as many threads as ours; "of
   ceiling" is against the faster of the two. Goal: >= 3,000 requests/s on a 2-core machine.
   Client and servers share the machine's cores, as they do in the goal.

This machine's speed drifts (up to 2x between minutes), so candidate and baseline rounds
are interleaved, their order alternating, and each side reports its median round.

    python benchmarks/bench_serving.py [--quick] [--rounds N] [--json] [--skip resnet|sklearn|open]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import queue
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

GOAL_RATIO = 0.95
GOAL_ADDED_P50_MS = 3.0
GOAL_SMALL_RPS = 3000.0
PASSPHRASE = secrets.token_hex(16)  # of the throwaway key store; handed to the server via env
KEY = "models"
ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
_LISTENING = re.compile(r"gRPC [\d.]+:(\d+), REST")


@dataclass(frozen=True)
class Setup:
    home: Path
    models: Path
    ca: Path
    cert: Path
    key: Path
    pf_key_file: Path


def prepare(workdir: Path) -> Setup:
    """A local key store, ResNet-50 and sklearn as EML and PF model files, a TLS CA and server certificate."""
    from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
    from enclaveml.serving.certs import issue_oneway
    from enclaveml.serving.repository import publish_eml_model, publish_pf_model
    from enclaveml.serving.sample_models import resnet50_onnx, sklearn_classifier_onnx

    home, models = workdir / "home", workdir / "models"
    kms = LocalKms.init(home / "keystore.json", PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    kms.create_key(KEY)
    pf_key = os.urandom(16)
    (workdir / "wrap_key").write_bytes(pf_key)
    for name, onnx_bytes in (("resnet50", resnet50_onnx()), ("sklearn", sklearn_classifier_onnx())):
        publish_eml_model(models / name, 1, onnx_bytes, kms, KEY)
        publish_pf_model(models / f"{name}-pf", 1, onnx_bytes, pf_key)
    certs = issue_oneway("localhost", workdir / "pki", now=datetime.now(UTC))
    return Setup(home, models, certs.ca_cert, certs.server_cert, certs.server_key, workdir / "wrap_key")


# -- processes -----------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(setup: Setup, model: str, *, workers: int = 1) -> Iterator[str]:
    """``enclaveml serve`` (TLS, the EML model) in its own process; yields its gRPC address once loaded."""
    args = ["serve", "--model", f"{model}={setup.models / model}", "--grpc-port", "0", "--rest-port", "0"]
    args += ["--tls-cert", str(setup.cert), "--tls-key", str(setup.key), "--workers", str(workers)]
    env = {**os.environ, "ENCLAVEML_HOME": str(setup.home), "ENCLAVEML_PASSPHRASE": PASSPHRASE}
    process = subprocess.Popen(
        [ENCLAVEML, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    try:
        port = _wait_for(process, lambda line: f"model {model} version 1 available" in line, workers)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)


def _wait_for(process: subprocess.Popen[str], ready: Callable[[str], bool], count: int) -> int:
    """Read the server's stderr until ``count`` lines satisfy ``ready``; the gRPC port it printed."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    port, seen, deadline = 0, list[str](), time.monotonic() + 120
    while count:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line is None:
            raise RuntimeError("the server exited:\n" + "".join(seen))
        seen.append(line)
        if match := _LISTENING.search(line):
            port = int(match.group(1))
        if ready(line):
            count -= 1
    return port


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.contextmanager
def grpc_ceiling(setup: Setup, kind: str = "aio") -> Iterator[str]:
    """A bare Python gRPC server (``--ceiling-server``, ``aio`` or ``sync``) in its own process; yields its address."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--ceiling-server", kind, str(setup.cert), str(setup.key)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield f"127.0.0.1:{_wait_for(process, lambda line: 'listening' in line, 1)}"
    finally:
        _stop(process)


def ceiling_server(kind: str, cert: Path, key: Path) -> None:
    """Child process: ``PredictionService/Predict`` answering fixed bytes; no model, no decoding.

    ``aio``: a ``grpc.aio`` server; ``sync``: a ``grpc.server`` with as many threads as the
    model server gives its gRPC calls.
    """
    import grpc

    from enclaveml.serving._tf_protos import predict_pb2
    from enclaveml.serving.server import grpc_threads
    from enclaveml.serving.tensor_codec import to_tensor_proto

    answer = predict_pb2.PredictResponse()
    answer.outputs["label"].CopyFrom(to_tensor_proto(np.zeros(1, dtype=np.int64)))
    body = answer.SerializeToString()
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])

    def handlers(predict: Callable[[bytes, Any], Any]) -> Any:
        handler = grpc.unary_unary_rpc_method_handler(predict)
        return (grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {"Predict": handler}),)

    if kind == "sync":
        server = grpc.server(ThreadPoolExecutor(max_workers=grpc_threads()))
        server.add_generic_rpc_handlers(handlers(lambda _request, _context: body))
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        print(f"gRPC 127.0.0.1:{port}, REST none; listening", file=sys.stderr, flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        server.stop(None)
        return

    async def predict(_request: bytes, _context: Any) -> bytes:
        return bytes(body)

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(handlers(predict))
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        print(f"gRPC 127.0.0.1:{port}, REST none; listening", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(None)

    asyncio.run(main())


# -- one round of each kind ----------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def server_round(
    url: str, setup: Setup, model: str, batch: int, clients: int, loop: int, **extra: Any
) -> dict[str, float]:
    from enclaveml.serving.load_client import LoadConfig, run_load

    report = run_load(
        LoadConfig(url=url, model=model, batch=batch, cnum=clients, loop=loop, warmup=1, crt=setup.ca, **extra)
    )
    if not report.ok:
        raise RuntimeError(f"{report.failed} requests failed: {report.first_error}")
    return {"rps": report.requests_per_second, "p50_ms": report.latency.p50_ms, "p99_ms": report.latency.p99_ms}


def ort_round(session: Any, batch: int, clients: int, loop: int) -> dict[str, float]:
    """``clients`` threads, each one warm-up then ``loop`` sequential runs of the same session."""
    feeds = [
        {"input": np.random.default_rng(i).standard_normal((batch, 224, 224, 3)).astype(np.float32)}
        for i in range(clients)
    ]
    latencies: list[float] = []
    lock = threading.Lock()
    warmed = threading.Barrier(clients + 1)
    go = threading.Event()

    def worker(i: int) -> None:
        session.run(None, feeds[i])
        warmed.wait()
        go.wait()
        mine = []
        for _ in range(loop):
            started = time.perf_counter()
            session.run(None, feeds[i])
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    warmed.wait()
    began = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    return {"rps": len(latencies) / seconds, "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99)}


def interleaved(rounds: int, sides: dict[str, Callable[[], dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each side once per round, the order rotating each round; per side the median of each field."""
    names = list(sides)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            results[name].append(sides[name]())
    return {n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in results.items()}


# -- the three measurements ----------------------------------------------------------------------


def bench_open(setup: Setup, repeats: int) -> list[dict[str, Any]]:
    from enclaveml.kms import LocalKms
    from enclaveml.serving.keys import LocalKeys
    from enclaveml.serving.repository import ModelRepository
    from enclaveml.serving.runtime import OnnxModel
    from enclaveml.serving.sample_models import resnet50_onnx, sklearn_classifier_onnx

    keys = LocalKeys(LocalKms(setup.home / "keystore.json", PASSPHRASE), pf_wrap_key_file=setup.pf_key_file)
    rows = []
    for model, plaintext in (("resnet50", resnet50_onnx()), ("sklearn", sklearn_classifier_onnx())):
        plain = []
        for _ in range(repeats):
            started = time.perf_counter()
            OnnxModel(plaintext)
            plain.append(time.perf_counter() - started)
        for fmt, root in (("eml", model), ("gramine-pf", f"{model}-pf")):
            decrypt, load = [], []
            for _ in range(repeats):
                repository = ModelRepository({model: setup.models / root}, keys)
                repository.load_all()
                served = repository.get(model)
                decrypt.append(served.decrypt_seconds)
                load.append(served.load_seconds)
                repository.close()
            decrypt_ms, session_ms = statistics.median(decrypt) * 1000, statistics.median(load) * 1000
            plain_ms = statistics.median(plain) * 1000
            rows.append(
                {
                    "model": model,
                    "format": fmt,
                    "mb": round(len(plaintext) / 1e6, 3),
                    "decrypt_ms": round(decrypt_ms, 1),
                    "session_ms": round(session_ms, 1),
                    "plaintext_session_ms": round(plain_ms, 1),
                    "added_ms": round(decrypt_ms + session_ms - plain_ms, 1),
                }
            )
    return rows


def bench_resnet(setup: Setup, rounds: int, quick: bool) -> list[dict[str, Any]]:
    import onnxruntime as ort  # type: ignore[import-untyped]

    from enclaveml.serving.sample_models import resnet50_onnx

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(resnet50_onnx(), options, providers=["CPUExecutionProvider"])
    # (batch, clients, requests per client)
    configs = [(1, 1, 5), (1, 4, 2), (16, 1, 1)] if quick else [(1, 1, 15), (1, 4, 5), (16, 1, 2), (16, 4, 1)]
    rows = []
    with serve(setup, "resnet50") as url:
        for batch, clients, loop in configs:
            measured = interleaved(
                rounds,
                {
                    "onnxruntime": functools.partial(ort_round, session, batch, clients, loop),
                    "server": functools.partial(server_round, url, setup, "resnet50", batch, clients, loop),
                },
            )
            base, ours = measured["onnxruntime"], measured["server"]
            rows.append(
                {
                    "batch": batch,
                    "clients": clients,
                    "requests": clients * loop,
                    "ort_samples_per_s": round(base["rps"] * batch, 2),
                    "server_samples_per_s": round(ours["rps"] * batch, 2),
                    "ratio": round(ours["rps"] / base["rps"], 3),
                    "ort_p50_ms": round(base["p50_ms"], 2),
                    "server_p50_ms": round(ours["p50_ms"], 2),
                    "added_p50_ms": round(ours["p50_ms"] - base["p50_ms"], 2),
                    "server_p99_ms": round(ours["p99_ms"], 2),
                }
            )
    return rows


def bench_sklearn(setup: Setup, rounds: int, quick: bool) -> list[dict[str, Any]]:
    total = 1000 if quick else 4000
    ceilings = ("grpc-aio-ceiling", "grpc-sync-ceiling")
    rows = []
    with (
        grpc_ceiling(setup, "aio") as aio_ceiling,
        grpc_ceiling(setup, "sync") as sync_ceiling,
        serve(setup, "sklearn", workers=1) as one,
        serve(setup, "sklearn", workers=2) as two,
    ):
        for clients in (4, 16):
            loop = total // clients
            bare = functools.partial(  # the ceiling servers have no metadata: name and shape given
                server_round, setup=setup, model="sklearn", batch=1, clients=clients, loop=loop,
                input_name="input", input_shape=(4,),
            )  # fmt: skip
            measured = interleaved(
                rounds,
                {
                    "grpc-aio-ceiling": functools.partial(bare, aio_ceiling),
                    "grpc-sync-ceiling": functools.partial(bare, sync_ceiling),
                    "workers-1": functools.partial(server_round, one, setup, "sklearn", 1, clients, loop),
                    "workers-2": functools.partial(server_round, two, setup, "sklearn", 1, clients, loop),
                },
            )
            top = max(measured[name]["rps"] for name in ceilings)
            for target, m in measured.items():
                rows.append(
                    {
                        "target": target,
                        "clients": clients,
                        "requests": clients * loop,
                        "rps": round(m["rps"]),
                        "p50_ms": round(m["p50_ms"], 2),
                        "p99_ms": round(m["p99_ms"], 2),
                        "of_ceiling": round(m["rps"] / top, 3),
                    }
                )
    return rows


# -- output --------------------------------------------------------------------------------------


def print_tables(result: dict[str, Any]) -> None:
    if result.get("open"):
        print("model open (median)        MB  decrypt ms  session ms  plaintext session ms  added ms")
        for r in result["open"]:
            print(
                f"{r['model']:<9} {r['format']:<11} {r['mb']:>7} {r['decrypt_ms']:>11} {r['session_ms']:>11} "
                f"{r['plaintext_session_ms']:>21} {r['added_ms']:>9}"
            )
        print()
    if result.get("resnet"):
        print(
            f"ResNet-50 via server (TLS, EML) vs onnxruntime in-process  goal: ratio >= {GOAL_RATIO}, "
            f"added p50 <= {GOAL_ADDED_P50_MS} ms at batch 1 / 1 client"
        )
        print("batch clients requests  ort samples/s  server samples/s  ratio  ort p50 ms  server p50 ms  added p50 ms")
        for r in result["resnet"]:
            verdict = "PASS" if r["ratio"] >= GOAL_RATIO else "FAIL"
            print(
                f"{r['batch']:>5} {r['clients']:>7} {r['requests']:>8} {r['ort_samples_per_s']:>14} "
                f"{r['server_samples_per_s']:>17} {r['ratio']:>6} {r['ort_p50_ms']:>11} {r['server_p50_ms']:>14} "
                f"{r['added_p50_ms']:>13}  {verdict}"
            )
        print()
    if result.get("sklearn"):
        print(f"sklearn classifier over gRPC + TLS, batch 1  goal: >= {GOAL_SMALL_RPS:.0f} requests/s")
        print("target            clients  requests  requests/s  p50 ms  p99 ms  of ceiling")
        for r in result["sklearn"]:
            verdict = "" if "ceiling" in r["target"] else ("PASS" if r["rps"] >= GOAL_SMALL_RPS else "FAIL")
            print(
                f"{r['target']:<17} {r['clients']:>7} {r['requests']:>9} {r['rps']:>11} {r['p50_ms']:>7} "
                f"{r['p99_ms']:>7} {r['of_ceiling']:>11}  {verdict}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (1 round, few requests)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per side [default: 3, quick: 1]")
    parser.add_argument("--skip", action="append", choices=["open", "resnet", "sklearn"], default=[])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--ceiling-server", nargs=3, metavar=("KIND", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_server:
        ceiling_server(args.ceiling_server[0], Path(args.ceiling_server[1]), Path(args.ceiling_server[2]))
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    result: dict[str, Any] = {"cpus": os.cpu_count(), "rounds": rounds, "quick": args.quick}
    result["load_average_before"] = round(os.getloadavg()[0], 2)  # other work on the machine skews everything
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        setup = prepare(Path(tmp))
        if "open" not in args.skip:
            result["open"] = bench_open(setup, 1 if args.quick else 3)
        if "resnet" not in args.skip:
            result["resnet"] = bench_resnet(setup, rounds, args.quick)
        if "sklearn" not in args.skip:
            result["sklearn"] = bench_sklearn(setup, rounds, args.quick)
    result["seconds"] = round(time.perf_counter() - began, 1)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)
        print(
            f"\n{result['cpus']} CPUs, {rounds} interleaved round(s) per side, {result['seconds']} s; "
            f"load average {result['load_average_before']} before, {result['load_average_after']} after"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
