"""Dynamic batching for asyncio servers: concurrent requests for one model share one model run.

TF Serving's ``--enable_batching`` in small: requests join a queue; a worker takes the oldest
and adds the requests behind it while they fit, until ``max_batch_size`` rows (the sum of
their first dimensions) or until ``max_wait_ms`` after the oldest arrived; then it runs the
model once on the inputs concatenated along axis 0 and hands each request its own rows of
every output. While a batch runs, new requests queue up, so under load batches fill without
waiting and when idle a request waits at most ``max_wait_ms``.

Rules:

- every request is checked first (``check_request``), so a malformed one fails alone and
  never enters a batch;
- requests are combined only when their non-batch dimensions, dtypes and asked-for outputs
  are equal; a request that cannot join keeps its place at the head of the queue and
  starts the next batch, while matching requests behind it may join the current one;
- a request is run on its own when the model has an input or output without a batch
  dimension, when it alone has ``max_batch_size`` rows or more, or when batching is off
  (``enabled=False`` or ``max_batch_size=1``);
- if a combined run fails, or an output does not have one row per input row, each request
  of the batch is run on its own, so one request's error never fails the others.

The model runs in a thread pool of ``max_concurrent_batches`` threads (default 1: ONNX Runtime
already uses every core within one run), created per batcher, never on the event loop;
concatenation and splitting run there too. ``on_batch(rows)`` is called for every model run
(``ServingMetrics.observe_batch``).

Hand-written: the batching schedulers that exist (TF Serving's, Triton's, Ray Serve's) are
parts of their servers; this is the part of them an asyncio frontend needs.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enclaveml.serving.runtime import Array, ModelRuntime, batch_rows, check_request

__all__ = ["DynamicBatcher"]

Outputs = dict[str, Array]
_Signature = tuple[Any, ...]


@dataclass
class _Pending:
    feeds: Mapping[str, Array]
    output_names: tuple[str, ...] | None
    rows: int
    signature: _Signature
    future: asyncio.Future[Outputs]
    enqueued: float


@dataclass
class _LoopState:
    loop: asyncio.AbstractEventLoop
    queue: collections.deque[_Pending] = field(default_factory=collections.deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    workers: list[asyncio.Task[None]] = field(default_factory=list)


class DynamicBatcher:
    """Groups concurrent ``run`` calls for ``runtime`` along axis 0; see the module docstring.

    ``max_batch_size`` (32): most rows per model run. ``max_wait_ms`` (2.0): longest a request
    waits for others. ``enabled`` (True): ``False`` runs every request on its own (still in
    the thread pool). ``max_concurrent_batches`` (1): model runs at a time. ``name``: names the
    threads. ``on_batch``: called with the rows of every model run.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        enabled: bool = True,
        max_concurrent_batches: int = 1,
        name: str = "model",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be at least 1")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled and max_batch_size > 1
        self._concurrency = max_concurrent_batches
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent_batches, thread_name_prefix=f"model-{name}")
        self._state: _LoopState | None = None
        self._closed = False

    async def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> Outputs:
        """The outputs for ``feeds``, as ``runtime.run`` would give them; ``InvalidRequest`` before queueing."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        check_request(self.runtime, feeds, output_names)
        names = None if output_names is None else tuple(output_names)
        rows = batch_rows(self.runtime, feeds) if self.enabled else None
        loop = asyncio.get_running_loop()
        if rows is None or rows == 0 or rows >= self.max_batch_size:
            return await loop.run_in_executor(self._executor, self._run_alone, feeds, names)
        state = self._state_for(loop)
        future: asyncio.Future[Outputs] = loop.create_future()
        state.queue.append(_Pending(feeds, names, rows, _signature(feeds, names), future, loop.time()))
        state.arrived.set()
        return await future

    def _state_for(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        state = self._state
        if state is None or state.loop is not loop or state.loop.is_closed():
            state = self._state = _LoopState(loop)
            for _ in range(self._concurrency):
                state.workers.append(loop.create_task(self._work(state)))
        return state

    # -- the worker ---------------------------------------------------------------------------

    async def _work(self, state: _LoopState) -> None:
        while True:
            batch = await self._collect(state)
            if not batch:
                continue
            try:
                results = await state.loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # the pool itself failed: every caller learns it, none hangs
                results = [exc] * len(batch)
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():  # the caller went away
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    async def _collect(self, state: _LoopState) -> list[_Pending]:
        queue = state.queue
        while not queue:
            state.arrived.clear()
            await state.arrived.wait()
        first = queue.popleft()
        if first.future.done():
            return []
        batch, rows = [first], first.rows
        deadline = first.enqueued + self.max_wait
        scanned = 0  # queue[:scanned] cannot join this batch; later arrivals are appended behind them
        while rows < self.max_batch_size:
            while scanned < len(queue) and rows < self.max_batch_size:
                item = queue[scanned]
                if item.future.done():
                    del queue[scanned]
                elif item.signature == first.signature and rows + item.rows <= self.max_batch_size:
                    del queue[scanned]
                    batch.append(item)
                    rows += item.rows
                else:
                    scanned += 1  # it keeps its place and starts the next batch
            remaining = deadline - state.loop.time()
            if rows >= self.max_batch_size or remaining <= 0:
                break
            state.arrived.clear()
            try:
                await asyncio.wait_for(state.arrived.wait(), remaining)
            except TimeoutError:
                break
        return batch

    # -- in the model's thread ----------------------------------------------------------------

    def _run_alone(self, feeds: Mapping[str, Array], output_names: tuple[str, ...] | None) -> Outputs:
        outputs = self.runtime.run(feeds, output_names)
        if self._on_batch is not None:
            first = next(iter(feeds.values()), None)
            self._on_batch(int(first.shape[0]) if first is not None and first.ndim else 1)
        return outputs

    def _run_batch(self, batch: list[_Pending]) -> list[Outputs | BaseException]:
        if len(batch) > 1:
            combined = self._run_combined(batch)
            if combined is not None:
                return combined
        results: list[Outputs | BaseException] = []
        for pending in batch:
            try:
                results.append(self._run_alone(pending.feeds, pending.output_names))
            except Exception as exc:  # handed to that request's caller
                results.append(exc)
        return results

    def _run_combined(self, batch: list[_Pending]) -> list[Outputs | BaseException] | None:
        """Each request's outputs from one run, or ``None`` when they must run one by one."""
        first = batch[0]
        rows = sum(p.rows for p in batch)
        feeds = {name: np.concatenate([p.feeds[name] for p in batch], axis=0) for name in first.feeds}
        try:
            outputs = self.runtime.run(feeds, first.output_names)
        except Exception:  # some request in the batch is at fault: isolate it
            return None
        if any(out.ndim == 0 or out.shape[0] != rows for out in outputs.values()):
            return None
        if self._on_batch is not None:
            self._on_batch(rows)
        cuts = np.cumsum([p.rows for p in batch])[:-1]
        split = {name: np.split(out, cuts, axis=0) for name, out in outputs.items()}
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(batch))]

    # -- lifecycle ------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the workers (queued requests are cancelled) and the thread pool."""
        self._closed = True
        state, self._state = self._state, None
        if state is not None:
            for task in state.workers:
                task.cancel()
            for pending in state.queue:
                pending.future.cancel()
            await asyncio.gather(*state.workers, return_exceptions=True)
        self._executor.shutdown(wait=False)

    def close(self) -> None:
        """``aclose`` for code outside the event loop: cancels the workers, stops the pool."""
        self._closed = True
        state, self._state = self._state, None
        if state is not None and not state.loop.is_closed():
            for task in state.workers:
                state.loop.call_soon_threadsafe(task.cancel)
        self._executor.shutdown(wait=False)


def _signature(feeds: Mapping[str, Array], output_names: tuple[str, ...] | None) -> _Signature:
    """What must be equal for requests to share a run: dtypes, non-batch dimensions, outputs."""
    return (*((name, array.dtype.str, array.shape[1:]) for name, array in sorted(feeds.items())), output_names)
