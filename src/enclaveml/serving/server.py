"""The model server: gRPC (TF Serving + KServe v2) and REST on their ports, models loaded behind them.

``ModelServer(ServeConfig(...))`` runs, in one process:

- a ``grpc.server`` on ``grpc_port`` with TF Serving's ``PredictionService`` and
  ``ModelService`` (``tfserving_grpc``) and KServe's ``GRPCInferenceService``
  (``kserve_grpc``); ``grpc.max_receive_message_length`` is ``max_request_bytes``, so a larger
  message is refused by gRPC itself (``RESOURCE_EXHAUSTED``);
- uvicorn on ``rest_port`` serving ``rest.create_app`` (KServe v2 REST, TF Serving REST,
  health, ``/metrics``), on an asyncio event loop in a thread of its own;
- a ``ModelRepository`` (``repository.py``) that loads the models in a background thread.

Both ports listen *before* the models load: ``/v2/health/ready`` answers 503 with the reason
(``not loaded yet``, a tampered file, a refused attestation...) until every model has an
AVAILABLE version, and a request for a model that is not ready gets ``UNAVAILABLE`` / 503.

Every request goes through one ``Inference`` (``inference.py``, shared by the frontends):
resolve the model version, check the request, run the model (with ``enable_batching``
through a ``DynamicBatcher`` that groups concurrent requests from both frontends), record
metrics.

Why a synchronous ``grpc.server`` with a few threads, not ``grpc.aio``: for the small unary
calls a model server answers, gRPC's Python layer is most of the cost, and ``grpc.aio``'s
costs about 1.7 times the CPU per call of the synchronous one (bare handlers over TLS, same
client: ~250 µs against ~140 µs on a 2-core VM); model runs leave Python (ONNX Runtime
releases the interpreter lock), so threads lose nothing. Few threads (``grpc_threads``: one
per core, at least 2): each running thread competes for the interpreter lock, and with 16 a
small model's calls cost twice the CPU of 2. ``benchmarks/bench_serving.py`` measures both.

TLS: ``tls`` (a ``ServerTls``: one-way, or mutual when it has a client CA) serves both ports;
``ra_tls`` makes a fresh RA-TLS certificate with evidence from ``tee`` instead
(``ratls.ratls_server_tls``), mutual when ``ra_tls_client_ca_pem`` is set.

``workers > 1``: that many processes, each a full server on the same two ports
(``workers.py``). The RA-TLS certificate is made once, in the parent, so every worker
presents the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import grpc
import uvicorn

from enclaveml.attestation.tee import Tee
from enclaveml.errors import ConfigError, EnclaveMLError
from enclaveml.serving.inference import Inference
from enclaveml.serving.keys import KeySource
from enclaveml.serving.kserve_grpc import KServeServicer
from enclaveml.serving.metrics import ServingMetrics
from enclaveml.serving.repository import ModelRepository
from enclaveml.serving.rest import create_app
from enclaveml.serving.runtime import DEFAULT_MAX_REQUEST_BYTES
from enclaveml.serving.tfserving_grpc import TfServingServicer
from enclaveml.serving.tls import ServerTls, grpc_server_credentials, uvicorn_ssl_options
from enclaveml.serving.workers import WorkerPool, bind_socket

__all__ = ["Inference", "ModelServer", "ServeConfig", "grpc_threads"]

logger = logging.getLogger("enclaveml.serving")

KeySourceOrFactory = KeySource | Callable[[], KeySource]


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


# -- the in-process server -------------------------------------------------------------------


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def grpc_threads(config: ServeConfig | None = None) -> int:
    """Threads answering gRPC calls: one per core, at least 2; with batching, at least ``max_batch_size``.

    Few on purpose: every thread running Python competes for the interpreter lock, and the
    hand-overs cost more than the calls (module docstring). Calls beyond them wait in order.
    Batched calls wait for their batch in a thread each, so a full batch needs that many.
    """
    threads = max(2, os.cpu_count() or 1)
    if config is not None and config.enable_batching:
        return max(threads, config.max_batch_size)
    return threads


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
        self._workers: WorkerPool | None = None

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
            self._workers = WorkerPool(self.config, self._tls)
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
        inference.bind_loop(self._loop)
        reuse_port = self._worker is not None
        options = [
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ]
        executor = ThreadPoolExecutor(max_workers=grpc_threads(config), thread_name_prefix="grpc")
        server = grpc.server(executor, options=options)
        for handler in [*TfServingServicer(inference).handlers(), *KServeServicer(inference).handlers()]:
            server.add_generic_rpc_handlers((handler,))
        address = _grpc_address(config.host, self.grpc_port)
        try:
            if self._tls is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, grpc_server_credentials(self._tls))
        except RuntimeError:
            port = 0
        try:
            if not port:
                raise ConfigError(f"cannot listen on {address} for gRPC", "choose another --grpc-port or --host")
            sock = bind_socket(config.host, self.rest_port, reuse_port=reuse_port)
        except BaseException:
            server.stop(None)  # releases the gRPC port it may hold
            executor.shutdown(wait=False)
            raise
        self.grpc_port = port
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
            server.start()
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
                stopped = server.stop(grace=2)  # calls in flight finish; batched ones need this loop running
                await asyncio.get_running_loop().run_in_executor(None, stopped.wait, 5)
                executor.shutdown(wait=False)
                with contextlib.suppress(Exception):
                    await rest_task
                await inference.aclose()
