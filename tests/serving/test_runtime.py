"""The model runtime: ONNX Runtime over bytes in memory, and the checks a request passes before it runs.

Models are the locally built ones (a scikit-learn classifier, ResNet-50 v1.5 with random
weights) and tiny graphs assembled here with ``onnx.helper`` for each dtype and shape rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from enclaveml.errors import ConfigError
from enclaveml.serving.errors import (
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    RequestTooLarge,
    status_of,
)
from enclaveml.serving.runtime import (
    OnnxModel,
    TensorInfo,
    batch_rows,
    check_request,
    check_request_size,
    request_bytes,
)
from enclaveml.serving.sample_models import RESNET50_CLASSES, sklearn_classifier_onnx


def identity_model(elem_type: int, shape: list[Any] | None, *, inputs: int = 1) -> bytes:
    """``y{i} = Identity(x{i})`` for ``inputs`` tensors of one type and shape."""
    nodes = [helper.make_node("Identity", [f"x{i}"], [f"y{i}"]) for i in range(inputs)]
    graph = helper.make_graph(
        nodes,
        "identity",
        [helper.make_tensor_value_info(f"x{i}", elem_type, shape) for i in range(inputs)],
        [helper.make_tensor_value_info(f"y{i}", elem_type, shape) for i in range(inputs)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


# -- the sklearn classifier, end to end -----------------------------------------------------


def test_onnx_model_describes_its_tensors_and_runs(sklearn_model_bytes: bytes) -> None:
    model = OnnxModel(sklearn_model_bytes, intra_op_threads=1)
    assert model.inputs == (TensorInfo("input", np.dtype(np.float32), (-1, 4)),)
    assert model.outputs == (
        TensorInfo("label", np.dtype(np.int64), (-1,)),
        TensorInfo("probabilities", np.dtype(np.float32), (-1, 3)),
    )
    x = np.random.default_rng(3).standard_normal((5, 4), dtype=np.float32)
    out = model.run({"input": x})
    assert out["label"].shape == (5,)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert (out["label"] == out["probabilities"].argmax(axis=1)).all()
    only = model.run({"input": x}, ["probabilities"])
    assert list(only) == ["probabilities"]
    np.testing.assert_array_equal(only["probabilities"], out["probabilities"])


def test_sample_classifier_bytes_are_reproducible() -> None:
    assert sklearn_classifier_onnx.__wrapped__(4, 0) == sklearn_classifier_onnx(4, 0)
    assert sklearn_classifier_onnx.__wrapped__(4, 1) != sklearn_classifier_onnx(4, 0)


def test_bytes_that_are_not_a_model_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="ONNX Runtime cannot load the model"):
        OnnxModel(b"definitely not a protobuf graph")


# -- dtypes --------------------------------------------------------------------------------

DTYPES = [
    (TensorProto.FLOAT, np.float32),
    (TensorProto.DOUBLE, np.float64),
    (TensorProto.FLOAT16, np.float16),
    (TensorProto.INT8, np.int8),
    (TensorProto.INT16, np.int16),
    (TensorProto.INT32, np.int32),
    (TensorProto.INT64, np.int64),
    (TensorProto.UINT8, np.uint8),
    (TensorProto.UINT16, np.uint16),
    (TensorProto.UINT32, np.uint32),
    (TensorProto.UINT64, np.uint64),
    (TensorProto.BOOL, np.bool_),
]


@pytest.mark.parametrize(("elem_type", "dtype"), DTYPES, ids=[np.dtype(d).name for _, d in DTYPES])
def test_each_onnx_type_maps_to_its_numpy_dtype(elem_type: int, dtype: type[np.generic]) -> None:
    model = OnnxModel(identity_model(elem_type, ["n", 2]))
    assert model.inputs == (TensorInfo("x0", np.dtype(dtype), (-1, 2)),)
    x = np.arange(6).reshape(3, 2).astype(dtype)
    check_request(model, {"x0": x})
    out = model.run({"x0": x})["y0"]
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, x)


def test_strings_are_object_arrays_and_bytes_elements_are_utf8_text() -> None:
    model = OnnxModel(identity_model(TensorProto.STRING, ["n"]))
    assert model.inputs[0].dtype == np.dtype(np.object_)
    for sent in (
        np.array(["grüezi", "b"], dtype=object),
        np.array(["grüezi", "b"]),
        np.array(["grüezi".encode(), b"b"], dtype=object),
        np.array(["grüezi".encode(), b"b"]),
    ):
        check_request(model, {"x0": sent})
        assert model.run({"x0": sent})["y0"].tolist() == ["grüezi", "b"]
    with pytest.raises(InvalidRequest, match=r"input 'x0': element 1 is not UTF-8 text"):
        model.run({"x0": np.array([b"ok", b"\xff\xfe"], dtype=object)})
    with pytest.raises(InvalidRequest, match=r"element 0 is int, not a string"):
        model.run({"x0": np.array([7], dtype=object)})
    with pytest.raises(InvalidRequest, match="expects dtype string, got float32"):
        check_request(model, {"x0": np.zeros(2, np.float32)})


def test_a_tensor_type_the_server_cannot_carry_is_refused_at_load() -> None:
    with pytest.raises(InvalidRequest, match=r"tensor 'x0' has type tensor\(bfloat16\)"):
        OnnxModel(identity_model(TensorProto.BFLOAT16, ["n"]))


# -- request checks --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(sklearn_model_bytes: bytes) -> OnnxModel:
    return OnnxModel(sklearn_model_bytes)


def test_a_well_formed_request_passes(classifier: OnnxModel) -> None:
    feeds = {"input": np.zeros((7, 4), np.float32)}
    check_request(classifier, feeds, ["label"])
    assert batch_rows(classifier, feeds) == 7


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"input": np.zeros((1, 4), np.float32), "extra": np.zeros(1)}, "the model has no input 'extra'"),
        ({}, "input 'input' is missing"),
        ({"input": [[1.0, 2.0, 3.0, 4.0]]}, "input 'input' is a list, not a tensor"),
        ({"input": np.zeros((1, 4), np.float64)}, "input 'input' expects dtype float32, got float64"),
        ({"input": np.zeros((1, 4), np.int64)}, "input 'input' expects dtype float32, got int64"),
        ({"input": np.zeros(4, np.float32)}, r"input 'input' expects rank 2 \[\?, 4\], got rank 1 \[4\]"),
        ({"input": np.zeros((2, 5), np.float32)}, r"expects shape \[\?, 4\], got \[2, 5\] \(dimension 1 must be 4\)"),
    ],
    ids=["unknown-input", "missing-input", "not-an-array", "float64", "int64", "rank", "fixed-dim"],
)
def test_malformed_requests_are_refused_naming_the_input(
    classifier: OnnxModel, feeds: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        check_request(classifier, feeds)
    assert caught.value.grpc_code == "INVALID_ARGUMENT"
    assert caught.value.http_status == 400


def test_an_unknown_output_is_refused(classifier: OnnxModel) -> None:
    feeds = {"input": np.zeros((1, 4), np.float32)}
    with pytest.raises(InvalidRequest, match="the model has no output 'scores'"):
        check_request(classifier, feeds, ["scores"])
    with pytest.raises(InvalidRequest, match="the model has no output 'scores'"):
        classifier.run(feeds, ["scores"])


def test_batch_dimensions_must_agree_across_inputs() -> None:
    model = OnnxModel(identity_model(TensorProto.FLOAT, ["batch", 3], inputs=2))
    feeds = {"x0": np.zeros((2, 3), np.float32), "x1": np.zeros((3, 3), np.float32)}
    with pytest.raises(InvalidRequest, match=r"the inputs' batch dimensions differ \(x0: 2, x1: 3\)"):
        check_request(model, feeds)


def test_an_undeclared_shape_is_checked_by_dtype_only_and_runtime_errors_are_one_line() -> None:
    # Add of two inputs whose shapes the graph leaves open: ONNX Runtime finds the mismatch at run time.
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "add",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
    )
    model = OnnxModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    assert model.inputs[0].shape == ()
    secret_values = np.full((2, 3), 1234.5678, np.float32)
    feeds = {"a": secret_values, "b": np.zeros((4, 5), np.float32)}
    check_request(model, feeds)  # shapes unknown to the model: ONNX Runtime decides
    assert batch_rows(model, feeds) is None
    with pytest.raises(InvalidRequest, match="the model refused the request: ") as caught:
        model.run(feeds)
    assert "\n" not in str(caught.value)
    assert "1234" not in str(caught.value)


# -- sizes and status codes ---------------------------------------------------------------------


def test_request_size_limit() -> None:
    feeds = {"x": np.zeros((10, 10), np.float32), "s": np.array([b"abc", "de"], dtype=object)}
    assert request_bytes(feeds) == 405
    check_request_size(405, 405)
    with pytest.raises(RequestTooLarge, match="the request is 406 bytes, over the server's limit of 405") as caught:
        check_request_size(406, 405)
    assert status_of(caught.value) == ("RESOURCE_EXHAUSTED", 413)


def test_every_request_error_maps_to_one_grpc_code_and_http_status() -> None:
    assert status_of(InvalidRequest("x")) == ("INVALID_ARGUMENT", 400)
    assert status_of(ModelNotFound("x")) == ("NOT_FOUND", 404)
    assert status_of(ModelNotReady("x")) == ("UNAVAILABLE", 503)
    assert status_of(RuntimeError("boom")) == ("INTERNAL", 500)
    assert issubclass(InvalidRequest, ConfigError)
    assert ModelNotReady("x").diagnostics().startswith("x (")


# -- ResNet-50 --------------------------------------------------------------------------------


def test_resnet50_has_the_v15_topology(resnet50_model_bytes: bytes) -> None:
    model = onnx.load_model_from_string(resnet50_model_bytes)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Conv") == 53  # stem 1 + 16 blocks × 3 + 4 projections
    assert ops.count("Add") == 16
    assert ops[0] == "Transpose"
    assert ops[-1] == "Softmax"
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 25_400_000 < params < 25_700_000  # torchvision's resnet50: 25.56 M
    # v1.5: a stage's stride-2 convolution is the 3×3 (and the 1×1 projection), never the block's first 1×1.
    kernels = {t.name: tuple(t.dims[2:]) for t in model.graph.initializer}

    def strides(node: onnx.NodeProto) -> list[int]:
        return list(next(helper.get_attribute_value(a) for a in node.attribute if a.name == "strides"))

    strided = [kernels[n.input[1]] for n in model.graph.node if n.op_type == "Conv" and strides(n) == [2, 2]]
    assert sorted(strided) == [(1, 1)] * 3 + [(3, 3)] * 3 + [(7, 7)]


def test_resnet50_runs_nhwc_images_and_refuses_nchw(resnet50_model_bytes: bytes) -> None:
    model = OnnxModel(resnet50_model_bytes)
    assert model.inputs == (TensorInfo("input", np.dtype(np.float32), (-1, 224, 224, 3)),)
    assert model.outputs == (TensorInfo("probabilities", np.dtype(np.float32), (-1, RESNET50_CLASSES)),)
    images = np.random.default_rng(0).random((2, 224, 224, 3), dtype=np.float32)
    probabilities = model.run({"input": images})["probabilities"]
    assert probabilities.shape == (2, RESNET50_CLASSES)
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    with pytest.raises(InvalidRequest, match=r"expects shape \[\?, 224, 224, 3\], got \[1, 3, 224, 224\]"):
        check_request(model, {"input": np.zeros((1, 3, 224, 224), np.float32)})
