"""The model server: gRPC (TF Serving + KServe v2) and REST on their ports, models loaded behind them.

``ModelServer(ServeConfig(...))`` runs, in one process:

- a ``grpc.aio`` server on ``grpc_port`` with TF Serving's ``PredictionService`` and
  ``ModelService`` (``tfserving_grpc``) and KServe's ``GRPCInferenceService``
  (``kserve_grpc``); ``grpc.max_receive_message_length`` is ``max_request_bytes``, so a larger
  message is refused by gRPC itself (``RESOURCE_EXHAUSTED``);
- uvicorn on ``rest_port`` serving ``rest.create_app`` (KServe v2 REST, TF Serving REST,
  health, ``/metrics``);
- a ``ModelRepository`` (``repository.py``) that loads the models in a background thread.

Both ports listen *before* the models load: ``/v2/health/ready`` answers 503 with the reason
(``not loaded yet``, a tampered file, a refused attestation...) until every model has an
AVAILABLE version, and a request for a model that is not ready gets ``UNAVAILABLE`` / 503.

Every request goes through one ``Inference`` (shared by the frontends): resolve the model
version, check the request, run the model (with ``enable_batching`` through a
``DynamicBatcher`` that groups concurrent requests; without, in a thread pool, or on the event
loop itself for models that answer in under a millisecond), record metrics.

TLS: ``tls`` (a ``ServerTls``: one-way, or mutual when it has a client CA) serves both ports;
``ra_tls`` makes a fresh RA-TLS certificate with evidence from ``tee`` instead
(``ratls.ratls_server_tls``), mutual when ``ra_tls_client_ca_pem`` is set.

``workers > 1``: that many processes (``multiprocessing`` spawn), each a full server on the
same two ports (``SO_REUSEPORT``: the kernel spreads connections over them), each loading
the models itself; Python gRPC's per-call cost is what one process cannot get past for small
models. The parent reserves the ports, starts the workers and returns from ``start()`` when
all listen (``ConfigError`` naming the worker and why if one fails); ``wait()`` returns when
asked to stop or raises when a worker dies; ``stop()`` sends SIGTERM to each and waits. The
RA-TLS certificate is made once, in the parent, so every worker presents the same one. A key
source given as a callable is called in each worker (it must be picklable, as the config).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
import uvicorn

from enclaveml.attestation.tee import Tee
from enclaveml.errors import ConfigError, EnclaveMLError
from enclaveml.serving.batching import DynamicBatcher
from enclaveml.serving.errors import ModelNotFound, status_of
from enclaveml.serving.keys import KeySource
from enclaveml.serving.kserve_grpc import KServeServicer
from enclaveml.serving.metrics import ServingMetrics
from enclaveml.serving.repository import ModelRepository, ModelState, ServedModel, VersionStatus
from enclaveml.serving.rest import create_app
from enclaveml.serving.runtime import DEFAULT_MAX_REQUEST_BYTES, Array, batch_rows, check_request
from enclaveml.serving.tfserving_grpc import TfServingServicer
from enclaveml.serving.tls import ServerTls, grpc_server_credentials, uvicorn_ssl_options

__all__ = ["Inference", "ModelServer", "ServeConfig"]

logger = logging.getLogger("enclaveml.serving")

KeySourceOrFactory = KeySource | Callable[[], KeySource]
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class ServeConfig:
    """What to serve and how. Ports ``0`` pick free ports (``ModelServer.grpc_port`` / ``rest_port`` tell which).

    ``models``: name → model root (numbered version directories, ``repository.py``).
    ``keys``: a ``KeySource``, or a callable making one (called in each worker process).
    ``tls``: one-way or mutual TLS for both ports; ``None`` = plaintext (behind a TLS proxy
    only). ``ra_tls``: serve a fresh RA-TLS certificate with evidence from ``tee`` instead
    (``ra_tls_client_ca_pem``: also require client certificates). ``enable_batching``,
    ``max_batch_size``, ``batch_timeout_ms``: dynamic batching (``batching.py``).
    ``max_request_bytes``: largest request (message, body, and decoded tensors).
    ``workers``: server processes sharing the ports. ``poll_seconds``: model hot-reload period.
    """

    models: Mapping[str, Path]
    keys: KeySourceOrFactory
    host: str = "127.0.0.1"
    grpc_port: int = 8500
    rest_port: int = 8501
    tls: ServerTls | None = None
    ra_tls: bool = False
    tee: Tee | None = None
    ra_tls_client_ca_pem: bytes | None = None
    enable_batching: bool = False
    max_batch_size: int = 32
    batch_timeout_ms: float = 2.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    workers: int = 1
    poll_seconds: float | None = None
    pf_path_prefix: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("no models to serve", "give --model NAME=PATH")
        for port in (self.grpc_port, self.rest_port):
            if not 0 <= port <= 65535:
                raise ConfigError(f"port {port} is out of range", "use 0..65535 (0 picks a free port)")
        if self.grpc_port and self.grpc_port == self.rest_port:
            raise ConfigError(f"the gRPC and REST ports are both {self.grpc_port}", "give them different ports")
        if self.ra_tls and self.tls is not None:
            raise ConfigError("RA-TLS and a given certificate exclude each other", "drop --tls-cert or --ra-tls")
        if self.ra_tls and self.tee is None:
            raise ConfigError("RA-TLS needs the TEE whose evidence goes into the certificate", "give --tee")
        if self.ra_tls_client_ca_pem is not None and not self.ra_tls:
            raise ConfigError("ra_tls_client_ca_pem goes with ra_tls; put the client CA in tls otherwise")
        if self.max_batch_size < 1 or self.batch_timeout_ms < 0:
            raise ConfigError("the batch size must be at least 1 and the batch timeout not negative")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"max_request_bytes {self.max_request_bytes} is too small", "allow at least 1024")
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")

    @property
    def tls_mode(self) -> str:
        if self.ra_tls:
            return "RA-TLS + mutual TLS" if self.ra_tls_client_ca_pem else "RA-TLS"
        if self.tls is None:
            return "plaintext"
        return "mutual TLS" if self.tls.mutual else "TLS"


def _key_source(keys: KeySourceOrFactory) -> KeySource:
    """A key source as given, or made by its factory (in the process that loads the models)."""
    if hasattr(keys, "key_wrapper_for_eml"):
        return cast(KeySource, keys)
    return keys()


class Inference:
    """The request path the frontends share: which model version, run it, count it.

    ``metrics``: request counts and latency (``ServingMetrics``). ``batching``: group
    concurrent requests (``DynamicBatcher``). Without batching a run leaves the event loop for
    a pool of ``concurrency`` threads, except for a model whose runs take under
    ``INLINE_BELOW_SECONDS`` on average: handing those to a thread costs more than the run
    (a small tabular model answers in tens of microseconds), so they run on the loop.
    """

    INLINE_BELOW_SECONDS = 0.001

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServingMetrics,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        batching: bool = False,
        max_batch_size: int = 32,
        batch_timeout_ms: float = 2.0,
        concurrency: int | None = None,
    ) -> None:
        self.repository, self.metrics = repository, metrics
        self.max_request_bytes = max_request_bytes
        self._batching, self._max_batch_size, self._batch_timeout_ms = batching, max_batch_size, batch_timeout_ms
        self._batchers: dict[tuple[str, int], DynamicBatcher] = {}
        self._executor = ThreadPoolExecutor(max_workers=concurrency or os.cpu_count() or 1, thread_name_prefix="model")
        self._run_seconds: dict[tuple[str, int], float] = {}  # moving average of one run, per model version

    # -- models ------------------------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        """``None`` when every model has an AVAILABLE version, else why not (one line)."""
        reasons = self.repository.not_ready_reasons()
        if not reasons:
            return None
        return "; ".join(f"model {name!r}: {why}" for name, why in sorted(reasons.items()))

    def model(self, name: str, version: int | None = None) -> ServedModel:
        """``ModelNotFound`` for an unknown name or version, ``ModelNotReady`` while none is available."""
        if not name:
            raise ModelNotFound("the request names no model", "give the model's name")
        return self.repository.get(name, version)

    def status(self, name: str) -> list[VersionStatus]:
        return self.repository.status(name)

    def available_versions(self, name: str) -> list[str]:
        return [str(s.version) for s in self.repository.status(name) if s.state is ModelState.AVAILABLE]

    # -- requests ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def measure(self, model: str, protocol: str) -> Iterator[None]:
        """Count one request and its latency; the code is the gRPC status name, or the HTTP status for REST."""
        started = time.perf_counter()
        rest = protocol.endswith("-rest")
        try:
            yield
        except BaseException as exc:
            grpc_code, http_status = status_of(exc)
            self.metrics.record_request(
                model, protocol, http_status if rest else grpc_code, time.perf_counter() - started
            )
            raise
        self.metrics.record_request(model, protocol, 200 if rest else "OK", time.perf_counter() - started)

    async def run(
        self, served: ServedModel, feeds: Mapping[str, Array], output_names: Sequence[str] | None
    ) -> dict[str, Array]:
        """The outputs of ``served`` for ``feeds`` (checked first: ``InvalidRequest``)."""
        if self._batching:
            return await self._batcher(served).run(feeds, output_names)
        check_request(served.runtime, feeds, output_names)
        key = (served.name, served.version)
        average = self._run_seconds.get(key)
        if average is not None and average < self.INLINE_BELOW_SECONDS:
            return self._timed_run(served, feeds, output_names)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._timed_run, served, feeds, output_names)

    def _timed_run(
        self, served: ServedModel, feeds: Mapping[str, Array], output_names: Sequence[str] | None
    ) -> dict[str, Array]:
        started = time.perf_counter()
        outputs = served.runtime.run(feeds, output_names)
        seconds = time.perf_counter() - started
        key = (served.name, served.version)
        previous = self._run_seconds.get(key)
        self._run_seconds[key] = seconds if previous is None else 0.9 * previous + 0.1 * seconds
        rows = batch_rows(served.runtime, feeds)
        self.metrics.observe_batch(served.name, 1 if rows is None else rows)
        return outputs

    def _batcher(self, served: ServedModel) -> DynamicBatcher:
        key = (served.name, served.version)
        batcher = self._batchers.get(key)
        if batcher is None:
            for old in [k for k in self._batchers if k[0] == served.name and k[1] < served.version]:
                self._batchers.pop(old).close()  # a superseded version: its requests have finished or fail
            batcher = self._batchers[key] = DynamicBatcher(
                served.runtime,
                max_batch_size=self._max_batch_size,
                max_wait_ms=self._batch_timeout_ms,
                name=served.name,
                on_batch=lambda rows: self.metrics.observe_batch(served.name, rows),
            )
        return batcher

    def metrics_exposition(self) -> tuple[bytes, str]:
        return self.metrics.render()

    async def aclose(self) -> None:
        batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            await batcher.aclose()
        self._executor.shutdown(wait=False)


# -- sockets ---------------------------------------------------------------------------------


def _bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound (not yet listening) TCP socket; ``SO_REUSEPORT`` for worker processes sharing the port."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot resolve the host {host!r}: {exc.strerror}", "give an IP address or host name"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}", "choose another port or --host") from None
    sock.set_inheritable(False)
    return sock


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the in-process server -------------------------------------------------------------------


class ModelServer:
    """gRPC + REST model server (module docstring). ``start()`` returns once both ports listen.

    ``worker``: this process's index among several workers (``enclaveml-worker`` REST header);
    set by the worker processes themselves.
    """

    def __init__(self, config: ServeConfig, *, worker: int | None = None) -> None:
        self.config = config
        self._worker = worker
        self._tls = config.tls
        self.grpc_port = config.grpc_port
        self.rest_port = config.rest_port
        self.repository: ModelRepository | None = None
        self.inference: Inference | None = None
        self._thread: threading.Thread | None = None
        self._loader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._stopping = threading.Event()
        self._workers: _WorkerPool | None = None

    @property
    def tls_mode(self) -> str:
        return self.config.tls_mode

    @property
    def tls(self) -> ServerTls | None:
        """The TLS identity served (after ``start()``; the RA-TLS certificate with ``ra_tls``)."""
        return self._tls

    def _resolve_tls(self) -> None:
        config = self.config
        if config.ra_tls and self._tls is None:
            from enclaveml.serving.ratls import ratls_server_tls

            assert config.tee is not None  # checked by ServeConfig
            names = [] if config.host in ("0.0.0.0", "::", "") else [config.host]  # noqa: S104 - comparing only
            self._tls = ratls_server_tls(
                config.tee, now=datetime.now(UTC), names=names, client_ca_pem=config.ra_tls_client_ca_pem
            )

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> ModelServer:
        """Listen on both ports, then load the models in the background (several workers: start them)."""
        if self._thread is not None or self._workers is not None:
            raise RuntimeError("the model server is already started")
        self._resolve_tls()
        if self.config.workers > 1 and self._worker is None:
            self._workers = _WorkerPool(self.config, self._tls)
            self.grpc_port, self.rest_port = self._workers.start(timeout)
            return self
        keys = _key_source(self.config.keys)
        self.repository = ModelRepository(
            self.config.models,
            keys,
            poll_seconds=self.config.poll_seconds,
            pf_path_prefix=dict(self.config.pf_path_prefix) or None,
        )
        metrics = ServingMetrics(repository=self.repository)
        self.inference = Inference(
            self.repository,
            metrics,
            max_request_bytes=self.config.max_request_bytes,
            batching=self.config.enable_batching,
            max_batch_size=self.config.max_batch_size,
            batch_timeout_ms=self.config.batch_timeout_ms,
        )
        self._thread = threading.Thread(target=self._serve_in_thread, name="model-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._failure is not None:
            failure = self._failure
            self.stop()
            if isinstance(failure, EnclaveMLError):
                raise failure
            raise ConfigError(f"the model server did not start: {failure or 'timed out'}")
        self._loader = threading.Thread(target=self._load_models, name="model-loader", daemon=True)
        self._loader.start()
        return self

    def _load_models(self) -> None:
        assert self.repository is not None
        try:
            self.repository.load_all()
        except Exception:  # the repository records per-model errors; this is a bug, keep serving health
            logger.exception("loading the models failed")
            return
        for name, why in sorted(self.repository.not_ready_reasons().items()):
            if not self.repository.status(name):  # no version seen: the repository logged nothing
                logger.warning("model %s not loaded: %s", name, why)

    def wait_until_loaded(self, timeout: float = 60.0) -> bool:
        """Block until the first load of every model finished (loaded or failed); in-process servers only."""
        if self._loader is None:
            raise RuntimeError("wait_until_loaded needs a started, single-process server")
        self._loader.join(timeout)
        return not self._loader.is_alive()

    def request_stop(self) -> None:
        """Ask the server to stop (safe from a signal handler); ``wait()`` then returns."""
        self._stopping.set()
        if self._workers is not None:
            self._workers.request_stop()
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(event.set)

    def wait(self) -> None:
        """Block until stopped; with workers, ``ConfigError`` when a worker died."""
        if self._workers is not None:
            self._workers.wait()
            return
        while self._thread is not None and self._thread.is_alive() and not self._stopping.is_set():
            self._thread.join(0.5)
        if self._failure is not None and isinstance(self._failure, EnclaveMLError):
            raise self._failure

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, unload the models."""
        self.request_stop()
        if self._workers is not None:
            self._workers.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.repository is not None:
            self.repository.close()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the event loop ------------------------------------------------------------------------

    def _serve_in_thread(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() / wait()
            self._failure = exc
            if not isinstance(exc, EnclaveMLError):
                logger.exception("the model server stopped on an error")
        finally:
            self._started.set()

    async def _serve(self) -> None:
        assert self.inference is not None
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stopping.is_set():
            return
        config, inference = self.config, self.inference
        reuse_port = self._worker is not None
        options = [
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        server = grpc.aio.server(options=options)
        for handler in [*TfServingServicer(inference).handlers(), *KServeServicer(inference).handlers()]:
            server.add_generic_rpc_handlers((handler,))
        address = _grpc_address(config.host, self.grpc_port)
        try:
            if self._tls is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, grpc_server_credentials(self._tls))
        except RuntimeError:
            raise ConfigError(f"cannot listen on {address} for gRPC", "choose another --grpc-port or --host") from None
        sock = _bind(config.host, self.rest_port, reuse_port=reuse_port)
        self.rest_port = int(sock.getsockname()[1])
        worker = None if self._worker is None else str(self._worker)
        app = create_app(inference, worker=worker)
        with contextlib.ExitStack() as stack:
            stack.enter_context(sock)
            ssl_options = stack.enter_context(uvicorn_ssl_options(self._tls)) if self._tls else {}
            uvicorn_config = uvicorn.Config(
                app,
                log_level="warning",
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=5,
                **ssl_options,
            )
            rest = uvicorn.Server(uvicorn_config)
            await server.start()
            rest_task = asyncio.create_task(rest.serve(sockets=[sock]))
            try:
                while not rest.started:
                    if rest_task.done():
                        await rest_task
                        raise ConfigError(f"the REST server could not start on {config.host}:{self.rest_port}")
                    await asyncio.sleep(0.01)
                self._started.set()
                await self._stop_event.wait()
            finally:
                rest.should_exit = True
                await server.stop(grace=2)
                with contextlib.suppress(Exception):
                    await rest_task
                await inference.aclose()


# -- worker processes --------------------------------------------------------------------------


def _worker_main(config: ServeConfig, index: int, events: Any, log_level: int) -> None:
    """A worker process: a full in-process server on the shared ports until SIGTERM / SIGINT."""
    if log_level < logging.WARNING:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"worker {index}: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level)
        logger.propagate = False
    server = ModelServer(config, worker=index)
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda *_: server.request_stop())
    try:
        server.start()
    except EnclaveMLError as exc:
        events.put((index, "failed", exc.diagnostics()))
        raise SystemExit(2) from None
    events.put((index, "listening", os.getpid()))
    try:
        server.wait()
    finally:
        server.stop()


class _WorkerPool:
    """The parent's side of ``workers > 1``: reserve ports, spawn, supervise, forward stop."""

    def __init__(self, config: ServeConfig, tls: ServerTls | None) -> None:
        self.config, self.tls = config, tls
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.pids: list[int] = []
        self._stopping = threading.Event()

    def start(self, timeout: float) -> tuple[int, int]:
        config = self.config
        reserved = [_bind(config.host, p, reuse_port=True) for p in (config.grpc_port, config.rest_port)]
        try:
            grpc_port, rest_port = (int(s.getsockname()[1]) for s in reserved)
            worker_config = dataclasses.replace(
                config, grpc_port=grpc_port, rest_port=rest_port, tls=self.tls, ra_tls=False, tee=None,
                ra_tls_client_ca_pem=None, workers=1,
            )  # fmt: skip
            context = multiprocessing.get_context("spawn")
            events = context.Queue()
            level = logger.getEffectiveLevel() if logger.handlers or logging.getLogger().handlers else logging.WARNING
            for index in range(1, config.workers + 1):
                process = context.Process(
                    target=_worker_main, args=(worker_config, index, events, level), name=f"enclaveml-serve-{index}"
                )
                try:
                    process.start()
                except Exception as exc:  # pickling the config (a key source that cannot travel)
                    self.stop(5)
                    raise ConfigError(
                        f"cannot start worker {index}: {type(exc).__name__}: {exc}",
                        "with --workers the key source must be picklable (give a factory)",
                    ) from None
                self.processes.append(process)
            self._await_listening(events, timeout)
        finally:
            for sock in reserved:
                sock.close()
        return grpc_port, rest_port

    def _await_listening(self, events: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(range(1, len(self.processes) + 1))
        while waiting:
            try:
                index, what, detail = events.get(timeout=0.2)
            except Exception:  # queue.Empty: look at the processes
                index, what, detail = 0, "", None
            if what == "failed":
                self.stop(5)
                raise ConfigError(f"worker {index} did not start: {detail}")
            if what == "listening":
                waiting.discard(index)
                self.pids.append(int(detail))
                continue
            if self._stopping.is_set():  # SIGTERM / SIGINT while starting
                self.stop(5)
                raise KeyboardInterrupt
            dead = [i for i in waiting if self.processes[i - 1].exitcode is not None]
            if dead:
                code = self.processes[dead[0] - 1].exitcode
                self.stop(5)
                raise ConfigError(f"worker {dead[0]} exited with code {code} while starting")
            if time.monotonic() > deadline:
                self.stop(5)
                raise ConfigError(f"workers {sorted(waiting)} did not listen within {timeout:.0f} s")

    def request_stop(self) -> None:
        self._stopping.set()
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def wait(self) -> None:
        """Return when asked to stop; ``ConfigError`` when a worker exits on its own."""
        sentinels = [p.sentinel for p in self.processes]
        while not self._stopping.is_set():
            ready = multiprocessing.connection.wait(sentinels, timeout=0.5)
            if ready and not self._stopping.is_set():
                died = next(i for i, p in enumerate(self.processes, 1) if p.sentinel in ready)
                code = self.processes[died - 1].exitcode
                self.stop(5)
                raise ConfigError(f"worker {died} exited with code {code}; stopped the others")

    def stop(self, timeout: float) -> None:
        self.request_stop()
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
