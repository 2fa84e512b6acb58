"""Several broker processes on one port: :func:`serve_workers`.

The broker's request path is Python, and one process uses at most one core (the GIL). The
scale-out is *stateless HTTP workers over one database* (ARCHITECTURE.md): everything a
request needs across processes lives in the store — nonces are MACed by the root key and
made single-use by the database, the audit chain is appended under the database's lock —
so any worker can answer any request.

``serve_workers(n, make_server)`` binds the listening socket in the calling process, then
forks ``n`` workers. Each builds its own server with ``make_server(index)`` — its own
``BrokerStore``: engine, connection pool and group commit are never shared across a fork —
and serves the inherited socket; the kernel gives each new connection to whichever worker
accepts it first. The parent starts no threads and holds no database connection (so forking
is safe); :meth:`WorkerPool.supervise` waits on the workers, starts a worker that died
again (its clients reconnect; at most once a second per worker), and on SIGTERM / SIGINT
stops them all (uvicorn's graceful shutdown in each). A worker that could not start (exit
status ``STARTUP_FAILURE``: bad certificate, store unreachable, port) is a broken
configuration, not a crash: the pool stops and says so.

What the workers must share is made before the fork and reaches them through
``make_server``'s closure: the root key, and the ES256 key that signs attestation results
(one JWKS whichever worker answers). Per worker: the caches (``APP_CACHE_TTL_S``,
``POLICY_CACHE_S``: another worker's disable or revocation shows within 5 s, a revoked
policy never releases), ``/metrics``, and secret provisioning if ``make_server`` starts it
(give it to worker 0 only: it listens on a port of its own).

SQLite works with several workers, but they take turns at its one write lock (each
worker's group commit is one writer; SQLite's busy handler sleeps between tries); use
PostgreSQL to scale out (docs/performance.md, "Key broker").
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from enclaveml.errors import ConfigError, EnclaveMLError, KeyServiceError

__all__ = ["STARTUP_FAILURE", "ServesSocket", "WorkerPool", "serve_workers"]

logger = logging.getLogger("enclaveml.broker")

STARTUP_FAILURE = 3  # a worker's exit status when it could not start (uvicorn's too)
_RESTART_INTERVAL_S = 1.0
_STOP_TIMEOUT_S = 15.0


class _Closable(Protocol):
    def close(self) -> None: ...


class ServesSocket(Protocol):
    """What a worker runs (``BrokerServer``): ``preflight()``, ``serve_forever(sock)``, then its store is closed."""

    @property
    def store(self) -> _Closable: ...

    def preflight(self) -> None: ...

    def serve_forever(self, sock: socket.socket | None = None) -> None: ...


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise ConfigError(f"the key broker could not listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _log_startup_failure(index: int, exc: Exception) -> None:
    if isinstance(exc, EnclaveMLError):  # says what is wrong and what to do: no traceback
        logger.error("broker worker %d could not start: %s", index, " ".join(exc.diagnostics().split()))
    else:
        logger.error("broker worker %d could not start", index, exc_info=exc)


def _run_worker(make_server: Callable[[int], ServesSocket], index: int, sock: socket.socket) -> int:
    """In the forked child: serve until SIGTERM / SIGINT; the exit status."""
    # The parent's handlers must not run here; until uvicorn installs its own, a stop
    # request is remembered and acted on once the server runs (uvicorn re-raises it).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        server = make_server(index)
    except Exception as exc:
        _log_startup_failure(index, exc)
        return STARTUP_FAILURE
    try:
        server.preflight()
    except Exception as exc:
        _log_startup_failure(index, exc)
        server.store.close()
        return STARTUP_FAILURE
    try:
        server.serve_forever(sock)
    except SystemExit as exc:  # uvicorn exits so when it cannot start
        return exc.code if isinstance(exc.code, int) else 1
    except Exception:
        logger.exception("broker worker %d failed", index)
        return 1
    finally:
        server.store.close()
    return 0


class WorkerPool:
    """``count`` forked broker processes serving one listening socket (module docstring)."""

    def __init__(
        self,
        count: int,
        make_server: Callable[[int], ServesSocket],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = True,
        backlog: int = 2048,
    ) -> None:
        if count < 1:
            raise ConfigError(f"the broker needs at least one worker, not {count}")
        self.count, self.host, self._make_server, self._tls = count, host, make_server, tls
        self._sock = _listen(host, port, backlog)
        self.port = int(self._sock.getsockname()[1])
        self._workers: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
        self._stopping = False

    @property
    def url(self) -> str:
        scheme = "https" if self._tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def pids(self) -> list[int]:
        return sorted(self._workers)

    def start(self) -> WorkerPool:
        """Fork every worker; connections wait in the listening socket's backlog meanwhile."""
        for index in range(self.count):
            self._fork(index)
        return self

    def _fork(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            status = 1
            try:
                status = _run_worker(self._make_server, index, self._sock)
            finally:
                logging.shutdown()
                os._exit(status)
        self._workers[pid] = (index, time.monotonic())

    def supervise(self) -> None:
        """Wait on the workers until SIGTERM / SIGINT, starting any that dies again (module docstring).

        ``KeyServiceError`` when a worker could not start (its log says why).
        """

        def stop_on_signal(signum: int, frame: FrameType | None) -> None:
            self._stopping = True
            self._signal_workers(signal.SIGTERM)

        previous = {sig: signal.signal(sig, stop_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self._workers:
                pid, status = os.wait()
                index, started = self._workers.pop(pid, (-1, 0.0))
                if self._stopping or index < 0:
                    continue
                code = os.waitstatus_to_exitcode(status)
                if code == STARTUP_FAILURE:
                    self.stop()
                    raise KeyServiceError(f"broker worker {index} could not start", "see the worker's log above")
                logger.warning("broker worker %d (pid %d) exited with status %d; starting it again", index, pid, code)
                time.sleep(max(0.0, started + _RESTART_INTERVAL_S - time.monotonic()))  # no restart storm
                if not self._stopping:
                    self._fork(index)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._sock.close()

    def _signal_workers(self, signum: int) -> None:
        for pid in list(self._workers):
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                os.kill(pid, signum)

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """SIGTERM every worker, wait for them (SIGKILL after ``timeout``), close the socket."""
        self._stopping = True
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._workers:
            for pid in list(self._workers):
                done, _status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self._workers.pop(pid, None)
            if self._workers and time.monotonic() > deadline:
                self._signal_workers(signal.SIGKILL)
                deadline = time.monotonic() + timeout
            if self._workers:
                time.sleep(0.05)  # polling our own children's exit; no other way without a thread
        self._sock.close()

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_workers(
    count: int, make_server: Callable[[int], ServesSocket], *, host: str = "127.0.0.1", port: int = 0, tls: bool = True
) -> WorkerPool:
    """A :class:`WorkerPool` (not started: ``with serve_workers(...) as pool:`` or ``.start()``)."""
    return WorkerPool(count, make_server, host=host, port=port, tls=tls)
