"""Dynamic batching: concurrent requests share model runs, and each gets exactly its own answer.

The model under the batcher is a real ONNX Runtime session, wrapped by ``CountingRuntime`` (a
small class written here, not a mock) that counts the runs and their rows.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from enclaveml.serving.batching import DynamicBatcher
from enclaveml.serving.errors import InvalidRequest
from enclaveml.serving.metrics import ServingMetrics
from enclaveml.serving.runtime import ModelRuntime, OnnxModel, TensorInfo

Array = np.ndarray[Any, Any]


class CountingRuntime:
    """A ``ModelRuntime`` that records the rows of every run, and refuses rows holding ``poison``."""

    def __init__(self, inner: ModelRuntime, poison: float | None = None) -> None:
        self.inner, self.poison = inner, poison
        self.rows: list[int] = []
        self._lock = threading.Lock()

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self.inner.inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self.inner.outputs

    def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> dict[str, Array]:
        with self._lock:
            self.rows.append(int(next(iter(feeds.values())).shape[0]))
        if self.poison is not None and any((array == self.poison).any() for array in feeds.values()):
            raise InvalidRequest("a row holds the poison value")
        return self.inner.run(feeds, output_names)


@pytest.fixture(scope="module")
def classifier(sklearn_model_bytes: bytes) -> OnnxModel:
    return OnnxModel(sklearn_model_bytes, intra_op_threads=1)


def rows(n: int, seed: int) -> Array:
    return np.random.default_rng(seed).standard_normal((n, 4), dtype=np.float32)


async def run_all(batcher: DynamicBatcher, requests: list[dict[str, Array]]) -> list[Any]:
    results = await asyncio.gather(*(batcher.run(r) for r in requests), return_exceptions=True)
    await batcher.aclose()
    return results


def assert_same_outputs(got: Mapping[str, Array], expected: Mapping[str, Array]) -> None:
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7)
        assert got[name].dtype == value.dtype


def test_sixteen_concurrent_requests_share_runs_and_each_gets_its_own_rows(classifier: OnnxModel) -> None:
    counting = CountingRuntime(classifier)
    requests = [{"input": rows(1, seed)} for seed in range(16)]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_batch_size=32, max_wait_ms=20), requests))
    for request, result in zip(requests, results, strict=True):
        assert_same_outputs(result, classifier.run(request))
    assert len(counting.rows) < 16
    assert sum(counting.rows) == 16


def test_requests_of_different_sizes_are_split_back_by_their_row_counts(classifier: OnnxModel) -> None:
    counting = CountingRuntime(classifier)
    requests = [{"input": rows(n, seed=n)} for n in (1, 5, 2, 3, 1)]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_batch_size=32, max_wait_ms=20), requests))
    for request, result in zip(requests, results, strict=True):
        assert result["probabilities"].shape == (request["input"].shape[0], 3)
        assert_same_outputs(result, classifier.run(request))
    assert counting.rows == [12]


def test_no_run_exceeds_max_batch_size(classifier: OnnxModel) -> None:
    counting = CountingRuntime(classifier)
    requests = [{"input": rows(n, seed=i)} for i, n in enumerate([1, 2, 1, 3, 1, 1, 2, 1, 1, 1])]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_batch_size=4, max_wait_ms=20), requests))
    for request, result in zip(requests, results, strict=True):
        assert_same_outputs(result, classifier.run(request))
    assert max(counting.rows) <= 4
    assert sum(counting.rows) == 14


def test_a_request_as_large_as_a_batch_runs_alone(classifier: OnnxModel) -> None:
    counting = CountingRuntime(classifier)
    requests = [{"input": rows(1, 0)}, {"input": rows(4, 1)}, {"input": rows(1, 2)}]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_batch_size=4, max_wait_ms=20), requests))
    for request, result in zip(requests, results, strict=True):
        assert_same_outputs(result, classifier.run(request))
    assert sorted(counting.rows) == [2, 4]


def reduce_model() -> OnnxModel:
    """``y = ReduceSum(x, axis 1)`` over ``x: float[n, w]``, both dimensions free."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "reduce",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return OnnxModel(model.SerializeToString())


def test_requests_with_different_inner_shapes_are_never_combined() -> None:
    model = reduce_model()
    counting = CountingRuntime(model)
    requests = [{"x": np.full((1, w), float(w), np.float32)} for w in (3, 5, 3, 5, 3)]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_batch_size=32, max_wait_ms=20), requests))
    for request, result in zip(requests, results, strict=True):
        width = request["x"].shape[1]
        np.testing.assert_array_equal(result["y"], [[float(width * width)]])
    # The width-3 requests shared a run, and so did the width-5 ones, though they arrived interleaved.
    assert counting.rows == [3, 2]


def test_a_malformed_request_fails_alone_before_it_is_queued(classifier: OnnxModel) -> None:
    counting = CountingRuntime(classifier)
    requests = [{"input": rows(1, 0)}, {"input": rows(1, 1).astype(np.float64)}, {"input": rows(1, 2)}]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_batch_size=32, max_wait_ms=20), requests))
    assert isinstance(results[1], InvalidRequest)
    assert "expects dtype float32, got float64" in str(results[1])
    assert_same_outputs(results[0], classifier.run(requests[0]))
    assert_same_outputs(results[2], classifier.run(requests[2]))
    assert counting.rows == [2]


def test_a_request_the_model_refuses_does_not_fail_the_others_in_its_batch(classifier: OnnxModel) -> None:
    counting = CountingRuntime(classifier, poison=-999.0)
    poisoned = rows(2, 9)
    poisoned[1, 2] = -999.0
    requests = [{"input": rows(1, 0)}, {"input": poisoned}, {"input": rows(3, 2)}]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_batch_size=32, max_wait_ms=20), requests))
    assert isinstance(results[1], InvalidRequest)
    assert str(results[1]) == "a row holds the poison value"
    assert_same_outputs(results[0], classifier.run(requests[0]))
    assert_same_outputs(results[2], classifier.run(requests[2]))
    assert counting.rows == [6, 1, 2, 3]  # the combined run failed, then each request ran alone


@pytest.mark.parametrize("settings", [{"enabled": False}, {"max_batch_size": 1}], ids=["disabled", "batch-of-1"])
def test_batching_off_runs_every_request_alone(classifier: OnnxModel, settings: dict[str, Any]) -> None:
    counting = CountingRuntime(classifier)
    requests = [{"input": rows(1, seed)} for seed in range(5)]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_wait_ms=20, **settings), requests))
    for request, result in zip(requests, results, strict=True):
        assert_same_outputs(result, classifier.run(request))
    assert counting.rows == [1] * 5


def test_a_model_without_a_batch_dimension_runs_each_request_alone() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    counting = CountingRuntime(OnnxModel(model.SerializeToString()))
    requests = [{"x": np.full((1, 2), float(i), np.float32)} for i in range(3)]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_wait_ms=20), requests))
    assert [r["y"][0, 0] for r in results] == [0.0, 1.0, 2.0]
    assert counting.rows == [1, 1, 1]


def test_a_caller_that_goes_away_does_not_disturb_the_others(classifier: OnnxModel) -> None:
    counting = CountingRuntime(classifier)

    async def scenario() -> list[Any]:
        batcher = DynamicBatcher(counting, max_batch_size=32, max_wait_ms=50)
        tasks = [asyncio.create_task(batcher.run({"input": rows(1, seed)})) for seed in range(3)]
        await asyncio.sleep(0)  # one turn of the loop: every request is queued
        tasks[1].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.aclose()
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[1], asyncio.CancelledError)
    assert_same_outputs(results[0], classifier.run({"input": rows(1, 0)}))
    assert_same_outputs(results[2], classifier.run({"input": rows(1, 2)}))
    assert sum(counting.rows) == 2


def test_batch_sizes_reach_the_metrics(classifier: OnnxModel) -> None:
    metrics = ServingMetrics(models=["sklearn"])
    batcher = DynamicBatcher(
        classifier, max_batch_size=32, max_wait_ms=20, on_batch=lambda n: metrics.observe_batch("sklearn", n)
    )
    asyncio.run(run_all(batcher, [{"input": rows(1, seed)} for seed in range(8)]))
    text = metrics.render()[0].decode()
    assert 'enclaveml_serving_batch_size_sum{model="sklearn"} 8.0' in text
    assert 'enclaveml_serving_batch_size_count{model="sklearn"} 1.0' in text


def test_the_batcher_survives_a_second_event_loop(classifier: OnnxModel) -> None:
    batcher = DynamicBatcher(classifier, max_wait_ms=5)

    async def one(seed: int) -> dict[str, Array]:
        return await batcher.run({"input": rows(2, seed)})

    first = asyncio.run(one(0))
    second = asyncio.run(one(1))  # a new loop: the batcher starts new workers on it
    assert_same_outputs(first, classifier.run({"input": rows(2, 0)}))
    assert_same_outputs(second, classifier.run({"input": rows(2, 1)}))
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(one(2))


def test_resnet50_images_batched_together_match_single_runs(resnet50_model_bytes: bytes) -> None:
    model = OnnxModel(resnet50_model_bytes)
    counting = CountingRuntime(model)
    images = np.random.default_rng(5).random((3, 224, 224, 3), dtype=np.float32)
    requests = [{"input": images[i : i + 1]} for i in range(3)]
    results = asyncio.run(run_all(DynamicBatcher(counting, max_batch_size=8, max_wait_ms=20), requests))
    assert counting.rows == [3]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result["probabilities"], model.run(request)["probabilities"], rtol=1e-4, atol=1e-6)


def test_two_concurrent_batches_keep_every_answer_straight(classifier: OnnxModel) -> None:
    counting = CountingRuntime(classifier)
    requests = [{"input": rows(1 + seed % 3, seed)} for seed in range(20)]
    batcher = DynamicBatcher(counting, max_batch_size=4, max_wait_ms=5, max_concurrent_batches=2)
    results = asyncio.run(run_all(batcher, requests))
    for request, result in zip(requests, results, strict=True):
        assert_same_outputs(result, classifier.run(request))
    assert sum(counting.rows) == sum(r["input"].shape[0] for r in requests)
    assert max(counting.rows) <= 4
