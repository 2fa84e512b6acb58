"""The request path every frontend shares: which model version, check the request, run it, count it.

One ``Inference`` serves two kinds of callers:

- the gRPC frontends (``tfserving_grpc``, ``kserve_grpc``) run in the threads of a
  synchronous ``grpc.server`` and call ``run_blocking``;
- the REST frontend (``rest.py``) runs on the server's event loop and awaits ``run``.

Without batching a model runs in the caller's thread (gRPC) or in a small thread pool (REST,
so the event loop stays free), except that a model whose runs take under
``INLINE_BELOW_SECONDS`` on average runs where it is asked: handing a run of a small tabular
model (tens of microseconds) to another thread costs more than the run. Slower runs take
turns for ``concurrency`` slots (default 1), whichever frontend asked: ONNX Runtime already
spreads one run over every core, and two at once only compete for them (measured on 2 cores,
ResNet-50 with 4 clients: 44 images/s one at a time against 39 two at a time; at batch 16,
48 against 39).

With batching every run goes through the ``DynamicBatcher`` of its model version, which lives
on the event loop (``bind_loop``): a gRPC thread hands its request to the loop and waits for
the answer, so requests from both frontends join the same batches.

Metrics: ``measure`` counts one request with its status and latency (``ServingMetrics``);
every model run records its rows.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from enclaveml.serving.batching import DynamicBatcher
from enclaveml.serving.errors import ModelNotFound, status_of
from enclaveml.serving.metrics import ServingMetrics
from enclaveml.serving.repository import ModelRepository, ModelState, ServedModel, VersionStatus
from enclaveml.serving.runtime import DEFAULT_MAX_REQUEST_BYTES, Array, batch_rows, check_request

__all__ = ["Inference"]


class _Measured:
    """``Inference.measure``: counts the request when the block ends, with the status it ended in."""

    __slots__ = ("_metrics", "_model", "_protocol", "_rest", "_started")

    def __init__(self, metrics: ServingMetrics, model: str, protocol: str) -> None:
        self._metrics, self._model, self._protocol = metrics, model, protocol
        self._rest = protocol.endswith("-rest")

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        seconds = time.perf_counter() - self._started
        if exc is None:
            code: str | int = 200 if self._rest else "OK"
        else:
            grpc_code, http_status = status_of(exc)
            code = http_status if self._rest else grpc_code
        self._metrics.record_request(self._model, self._protocol, code, seconds)


class Inference:
    """The request path the frontends share (module docstring).

    ``metrics``: request counts and latency (``ServingMetrics``). ``batching``: group
    concurrent requests (``DynamicBatcher``, ``max_batch_size`` rows, ``batch_timeout_ms``).
    ``concurrency``: runs of slow models at a time (default 1, see the module docstring).
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
        concurrency: int = 1,
    ) -> None:
        self.repository, self.metrics = repository, metrics
        self.max_request_bytes = max_request_bytes
        self._batching, self._max_batch_size, self._batch_timeout_ms = batching, max_batch_size, batch_timeout_ms
        self._batchers: dict[tuple[str, int], DynamicBatcher] = {}
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._slots = threading.BoundedSemaphore(concurrency)
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="model")
        self._run_seconds: dict[tuple[str, int], float] = {}  # moving average of one run, per model version
        self._batched: dict[tuple[str, int], bool] = {}  # whether every tensor of the version has a batch dim
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def batching(self) -> bool:
        return self._batching

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the batchers live on (``run_blocking`` hands batched requests to it)."""
        self._loop = loop

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

    def measure(self, model: str, protocol: str) -> _Measured:
        """Count one request and its latency; the code is the gRPC status name, or the HTTP status for REST."""
        return _Measured(self.metrics, model, protocol)

    async def run(
        self, served: ServedModel, feeds: Mapping[str, Array], output_names: Sequence[str] | None
    ) -> dict[str, Array]:
        """The outputs of ``served`` for ``feeds`` (checked first: ``InvalidRequest``), on the event loop."""
        if self._batching:
            return await self._batcher(served).run(feeds, output_names)
        check_request(served.runtime, feeds, output_names)
        if self._is_fast(served):
            return self._timed_run(served, feeds, output_names)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._slotted_run, served, feeds, output_names)

    def run_blocking(
        self, served: ServedModel, feeds: Mapping[str, Array], output_names: Sequence[str] | None
    ) -> dict[str, Array]:
        """``run`` for a thread that is not the event loop's (a gRPC handler); blocks until answered."""
        if self._batching:
            if self._loop is None:
                raise RuntimeError("batching needs the event loop: call bind_loop first")
            return asyncio.run_coroutine_threadsafe(self.run(served, feeds, output_names), self._loop).result()
        check_request(served.runtime, feeds, output_names)
        if self._is_fast(served):
            return self._timed_run(served, feeds, output_names)
        return self._slotted_run(served, feeds, output_names)

    def _is_fast(self, served: ServedModel) -> bool:
        average = self._run_seconds.get((served.name, served.version))
        return average is not None and average < self.INLINE_BELOW_SECONDS

    def _slotted_run(
        self, served: ServedModel, feeds: Mapping[str, Array], output_names: Sequence[str] | None
    ) -> dict[str, Array]:
        with self._slots:
            return self._timed_run(served, feeds, output_names)

    def _timed_run(
        self, served: ServedModel, feeds: Mapping[str, Array], output_names: Sequence[str] | None
    ) -> dict[str, Array]:
        started = time.perf_counter()
        outputs = served.runtime.run(feeds, output_names)
        seconds = time.perf_counter() - started
        key = (served.name, served.version)
        previous = self._run_seconds.get(key)
        self._run_seconds[key] = seconds if previous is None else 0.9 * previous + 0.1 * seconds
        batched = self._batched.get(key)
        if batched is None:  # whether rows can be counted depends on the model only
            batched = self._batched[key] = batch_rows(served.runtime, feeds) is not None
        rows = int(feeds[served.runtime.inputs[0].name].shape[0]) if batched else 1
        self.metrics.observe_batch(served.name, rows)
        return outputs

    def _batcher(self, served: ServedModel) -> DynamicBatcher:
        """The batcher of a model version (made on first use; called on the event loop only)."""
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
