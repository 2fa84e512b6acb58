"""Worker processes of the model server: several full servers sharing the same two ports.

``ServeConfig(workers=N)`` with ``N > 1``: the parent (``ModelServer.start``) reserves both
ports with ``SO_REUSEPORT``, starts ``N`` processes (``multiprocessing`` spawn) that each run
a complete in-process ``ModelServer`` on those ports and load the models themselves, and the
kernel spreads incoming connections over them. Python's per-call cost is what one process
cannot get past for small models; processes share no interpreter lock.

``WorkerPool.start`` returns once every worker listens (``ConfigError`` naming the worker and
why when one fails or exits); ``wait`` returns when asked to stop or raises when a worker
dies on its own (the others are stopped then); ``stop`` sends SIGTERM to each and waits,
killing one that does not exit in time. A key source given as a callable is called in each
worker (it, like the whole config, must be picklable to travel).

``bind_socket`` is the socket both the parent (reserving) and each server (REST) bind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from enclaveml.errors import ConfigError, EnclaveMLError

if TYPE_CHECKING:
    from enclaveml.serving.server import ServeConfig
    from enclaveml.serving.tls import ServerTls

__all__ = ["STOP_SIGNALS", "WorkerPool", "bind_socket"]

logger = logging.getLogger("enclaveml.serving")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def bind_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
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


def _worker_main(config: ServeConfig, index: int, events: Any, log_level: int) -> None:
    """A worker process: a full in-process server on the shared ports until SIGTERM / SIGINT."""
    from enclaveml.serving.server import ModelServer  # the server module imports this one

    if log_level < logging.WARNING:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"worker {index}: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level)
        logger.propagate = False
    server = ModelServer(config, worker=index)
    for signum in STOP_SIGNALS:
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


class WorkerPool:
    """The parent's side of ``workers > 1``: reserve ports, spawn, supervise, forward stop."""

    def __init__(self, config: ServeConfig, tls: ServerTls | None) -> None:
        self.config, self.tls = config, tls
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.pids: list[int] = []
        self._stopping = threading.Event()

    def start(self, timeout: float) -> tuple[int, int]:
        """Start the workers; the gRPC and REST ports they share, once every one listens."""
        config = self.config
        reserved = [bind_socket(config.host, p, reuse_port=True) for p in (config.grpc_port, config.rest_port)]
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
