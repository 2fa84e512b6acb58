"""The request path both frontends share: where a model runs, how many slow runs at once, batching from threads, counts.

The models are real: a sealed classifier loaded by a real ``ModelRepository``, whose runtime
factory wraps ONNX Runtime in ``TracingRuntime`` (a small class written here, not a mock)
that records the thread of every run, how many run at once, and can add a fixed delay to
stand for a slow model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclaveml.kms import LocalKms
from enclaveml.serving.errors import InvalidRequest, ModelNotFound
from enclaveml.serving.inference import Inference
from enclaveml.serving.keys import LocalKeys
from enclaveml.serving.metrics import ServingMetrics
from enclaveml.serving.repository import ModelRepository
from enclaveml.serving.runtime import ModelRuntime, OnnxModel, TensorInfo

Array = np.ndarray[Any, Any]
ROWS = np.random.default_rng(5).standard_normal((6, 4), dtype=np.float32)


class TracingRuntime:
    """A ``ModelRuntime`` that records each run's thread and the most runs at once; ``delay`` makes it slow."""

    def __init__(self, inner: ModelRuntime, delay: float = 0.0) -> None:
        self.inner, self.delay = inner, delay
        self.threads: list[int] = []
        self.rows: list[int] = []
        self.most_at_once = 0
        self._running = 0
        self._lock = threading.Lock()

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self.inner.inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self.inner.outputs

    def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> dict[str, Array]:
        with self._lock:
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
            self.threads.append(threading.get_ident())
            self.rows.append(int(feeds["input"].shape[0]))
        try:
            if self.delay:
                time.sleep(self.delay)
            return self.inner.run(feeds, output_names)
        finally:
            with self._lock:
                self._running -= 1


def open_inference(models: Path, kms: LocalKms, *, delay: float = 0.0, **options: Any) -> Inference:
    repository = ModelRepository(
        {"sklearn": models / "sklearn"},
        LocalKeys(kms),
        runtime_factory=lambda data: TracingRuntime(OnnxModel(data, intra_op_threads=1), delay),
    )
    repository.load_all()
    return Inference(repository, ServingMetrics(repository=repository), **options)


def runtime_of(inference: Inference) -> TracingRuntime:
    runtime = inference.model("sklearn").runtime
    assert isinstance(runtime, TracingRuntime)
    return runtime


@pytest.fixture
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as the server's REST loop does."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


# -- where a model runs -------------------------------------------------------------------------


def test_blocking_runs_answer_what_the_model_computes_in_the_callers_thread(
    model_repo_dir: Path, local_kms: LocalKms, sklearn_model_bytes: bytes
) -> None:
    inference = open_inference(model_repo_dir, local_kms)
    served = inference.model("sklearn")
    outputs = inference.run_blocking(served, {"input": ROWS}, None)
    expected = OnnxModel(sklearn_model_bytes).run({"input": ROWS})
    np.testing.assert_array_equal(outputs["label"], expected["label"])
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-6)
    assert runtime_of(inference).threads == [threading.get_ident()]
    assert list(inference.run_blocking(served, {"input": ROWS}, ["label"])) == ["label"]


def test_a_request_the_model_cannot_take_is_refused_before_it_runs(model_repo_dir: Path, local_kms: LocalKms) -> None:
    inference = open_inference(model_repo_dir, local_kms)
    served = inference.model("sklearn")
    with pytest.raises(InvalidRequest, match="expects dtype float32, got float64"):
        inference.run_blocking(served, {"input": ROWS.astype(np.float64)}, None)
    with pytest.raises(InvalidRequest, match="no output 'nope'"):
        inference.run_blocking(served, {"input": ROWS}, ["nope"])
    assert runtime_of(inference).threads == []
    with pytest.raises(ModelNotFound, match="names no model"):
        inference.model("")


def test_on_the_event_loop_a_fast_model_runs_inline_and_a_slow_one_in_a_thread(
    model_repo_dir: Path, local_kms: LocalKms
) -> None:
    async def loop_and_run_threads(inference: Inference, runs: int) -> tuple[int, list[int]]:
        served = inference.model("sklearn")
        for _ in range(runs):
            await inference.run(served, {"input": ROWS}, None)
        return threading.get_ident(), runtime_of(inference).threads

    fast = open_inference(model_repo_dir, local_kms)
    loop, threads = asyncio.run(loop_and_run_threads(fast, 40))
    assert threads[0] != loop  # the first run: its speed is not known yet
    assert threads[-5:] == [loop] * 5  # known by now to take well under a millisecond (a moving average)

    slow = open_inference(model_repo_dir, local_kms, delay=0.005)
    loop, threads = asyncio.run(loop_and_run_threads(slow, 5))
    assert loop not in threads


def test_slow_runs_take_turns_whichever_thread_asks(model_repo_dir: Path, local_kms: LocalKms) -> None:
    slow = open_inference(model_repo_dir, local_kms, delay=0.005)
    served = slow.model("sklearn")
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: slow.run_blocking(served, {"input": ROWS}, None), range(12)))
    assert runtime_of(slow).most_at_once == 1

    two = open_inference(model_repo_dir, local_kms, delay=0.005, concurrency=2)
    served = two.model("sklearn")
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: two.run_blocking(served, {"input": ROWS}, None), range(12)))
    assert runtime_of(two).most_at_once == 2

    with pytest.raises(ValueError, match="at least 1"):
        open_inference(model_repo_dir, local_kms, concurrency=0)


# -- batching from gRPC threads -------------------------------------------------------------------


def test_threads_hand_batched_requests_to_the_loop_and_share_runs(
    model_repo_dir: Path, local_kms: LocalKms, loop_thread: asyncio.AbstractEventLoop
) -> None:
    inference = open_inference(model_repo_dir, local_kms, batching=True, batch_timeout_ms=50)
    served = inference.model("sklearn")
    with pytest.raises(RuntimeError, match="bind_loop"):
        inference.run_blocking(served, {"input": ROWS[:1]}, None)
    inference.bind_loop(loop_thread)
    with ThreadPoolExecutor(len(ROWS)) as pool:
        answers = list(pool.map(lambda i: inference.run_blocking(served, {"input": ROWS[i : i + 1]}, None), range(6)))
    expected = served.runtime.run({"input": ROWS}, ["label"])["label"]
    assert [int(a["label"][0]) for a in answers] == expected.tolist()
    runtime = runtime_of(inference)
    assert len(runtime.rows) < 1 + len(ROWS)  # fewer runs than requests (one more: the check above)
    with pytest.raises(InvalidRequest, match="expects dtype float32"):
        inference.run_blocking(served, {"input": ROWS[:1].astype(np.float64)}, None)
    asyncio.run_coroutine_threadsafe(inference.aclose(), loop_thread).result(10)


# -- counting -------------------------------------------------------------------------------------


def test_measure_counts_each_request_with_its_status_per_protocol(model_repo_dir: Path, local_kms: LocalKms) -> None:
    inference = open_inference(model_repo_dir, local_kms)
    for _ in range(3):
        with inference.measure("sklearn", "tfserving-grpc"):
            pass
    with pytest.raises(InvalidRequest), inference.measure("sklearn", "kserve-grpc"):
        raise InvalidRequest("bad tensor")
    with pytest.raises(InvalidRequest), inference.measure("sklearn", "kserve-rest"):
        raise InvalidRequest("bad tensor")
    with pytest.raises(RuntimeError), inference.measure("sklearn", "kserve-rest"):
        raise RuntimeError("a bug")
    for name in ("x1", "x2", "x3"):  # names a client makes up share one series
        with pytest.raises(ModelNotFound), inference.measure(name, "tfserving-grpc"):
            raise ModelNotFound(f"no model named {name!r}")
    text = inference.metrics_exposition()[0].decode()
    for line in (
        'enclaveml_serving_requests_total{code="OK",model="sklearn",protocol="tfserving-grpc"} 3.0',
        'enclaveml_serving_requests_total{code="INVALID_ARGUMENT",model="sklearn",protocol="kserve-grpc"} 1.0',
        'enclaveml_serving_requests_total{code="400",model="sklearn",protocol="kserve-rest"} 1.0',
        'enclaveml_serving_requests_total{code="500",model="sklearn",protocol="kserve-rest"} 1.0',
        'enclaveml_serving_requests_total{code="NOT_FOUND",model="_unknown",protocol="tfserving-grpc"} 3.0',
        'enclaveml_serving_request_seconds_count{model="sklearn",protocol="tfserving-grpc"} 3.0',
        'enclaveml_serving_request_seconds_count{model="_unknown",protocol="tfserving-grpc"} 3.0',
    ):
        assert line in text, line
    assert "x1" not in text


def test_every_run_records_its_rows(model_repo_dir: Path, local_kms: LocalKms) -> None:
    inference = open_inference(model_repo_dir, local_kms)
    served = inference.model("sklearn")
    for rows in (1, 4, 6):
        inference.run_blocking(served, {"input": ROWS[:rows]}, None)
    text = inference.metrics_exposition()[0].decode()
    assert 'enclaveml_serving_batch_size_count{model="sklearn"} 3.0' in text
    assert 'enclaveml_serving_batch_size_sum{model="sklearn"} 11.0' in text
