"""TF Serving's gRPC API on a real server: Predict, GetModelMetadata, GetModelStatus, and every refusal.

The client is the generated ``PredictionServiceStub`` over a real channel on 127.0.0.1; each
bad request gets its own status and the server answers a good request right after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import empty_pb2

from enclaveml.kms import LocalKms
from enclaveml.serving._tf_protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
    tensor_pb2,
    types_pb2,
)
from enclaveml.serving.keys import LocalKeys
from enclaveml.serving.repository import publish_eml_model
from enclaveml.serving.server import ModelServer, ServeConfig
from enclaveml.serving.tensor_codec import from_tensor_proto, to_tensor_proto
from enclaveml.serving.tfserving_grpc import PREDICTION_SERVICE, unary_handler

MODEL_KEY = "models"  # the key conftest's local_kms holds
LIMIT = 64 << 10  # a small max_request_bytes, so that oversized requests are cheap to make
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 5.6, 2.4], [0.0, 0.0, 0.0, 0.0]], np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, local_kms: LocalKms, sklearn_model_bytes: bytes) -> Iterator[Any]:
    models = tmp_path_factory.mktemp("models")
    publish_eml_model(models / "sklearn", 1, sklearn_model_bytes, local_kms, MODEL_KEY)
    config = ServeConfig(
        {"sklearn": models / "sklearn"}, LocalKeys(local_kms), grpc_port=0, rest_port=0, max_request_bytes=LIMIT
    )
    with ModelServer(config) as running:
        assert running.wait_until_loaded()
        yield running


@pytest.fixture(scope="module")
def channel(server: ModelServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> Any:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def expected(sklearn_model_bytes: bytes) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(sklearn_model_bytes, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"input": ROWS})
    return {"label": labels, "probabilities": probabilities}


def predict_request(model: str = "sklearn", **inputs: Any) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for name, value in (inputs or {"input": ROWS}).items():
        request.inputs[name].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto) else to_tensor_proto(value))
    return request


def outputs_of(response: Any) -> dict[str, np.ndarray]:
    return {name: from_tensor_proto(name, proto, max_bytes=LIMIT) for name, proto in response.outputs.items()}


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value.code(), failure.value.details()


# -- Predict -----------------------------------------------------------------------------------------


def test_predict_answers_what_onnx_runtime_computes_and_names_the_version(
    stub: Any, expected: dict[str, np.ndarray]
) -> None:
    response = stub.Predict(predict_request())
    assert response.model_spec.name == "sklearn"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    got = outputs_of(response)
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], rtol=1e-6)


def test_output_filter_picks_outputs_and_a_version_may_be_named(stub: Any, expected: dict[str, np.ndarray]) -> None:
    request = predict_request()
    request.model_spec.version.value = 1
    request.model_spec.signature_name = "serving_default"
    request.output_filter.append("label")
    response = stub.Predict(request)
    assert list(response.outputs) == ["label"]
    np.testing.assert_array_equal(outputs_of(response)["label"], expected["label"])


def test_typed_value_fields_work_like_tensor_content(stub: Any, expected: dict[str, np.ndarray]) -> None:
    proto = to_tensor_proto(ROWS)
    proto.ClearField("tensor_content")
    proto.float_val.extend(ROWS.ravel().tolist())
    response = stub.Predict(predict_request(input=proto))
    np.testing.assert_array_equal(outputs_of(response)["label"], expected["label"])


def _with_version(version: int) -> Any:
    request = predict_request()
    request.model_spec.version.value = version
    return request


def _with_label(label: str) -> Any:
    request = predict_request()
    request.model_spec.version_label = label
    return request


def _with_signature(signature: str) -> Any:
    request = predict_request()
    request.model_spec.signature_name = signature
    return request


def _malformed_content() -> Any:
    proto = to_tensor_proto(ROWS)
    proto.tensor_content = proto.tensor_content[:-2]
    return predict_request(input=proto)


def _broadcast_too_large() -> Any:
    proto = to_tensor_proto(np.zeros((1, 4), np.float32))
    proto.ClearField("tensor_content")
    proto.float_val.append(1.0)
    proto.tensor_shape.dim[0].size = 100_000  # 1.6 MB of floats from a 4-byte value
    return predict_request(input=proto)


BAD_REQUESTS: dict[str, tuple[Callable[[], Any], grpc.StatusCode, str]] = {
    "unknown_model": (lambda: predict_request("nope"), grpc.StatusCode.NOT_FOUND, "no model named 'nope'"),
    "empty_name": (lambda: predict_request(""), grpc.StatusCode.INVALID_ARGUMENT, "model_spec.name is empty"),
    "unknown_version": (lambda: _with_version(7), grpc.StatusCode.NOT_FOUND, "no available version 7"),
    "version_label": (lambda: _with_label("stable"), grpc.StatusCode.NOT_FOUND, "no version label 'stable'"),
    "signature": (lambda: _with_signature("classify"), grpc.StatusCode.INVALID_ARGUMENT, "no signature 'classify'"),
    "wrong_dtype": (
        lambda: predict_request(input=ROWS.astype(np.float64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input' expects dtype float32, got float64",
    ),
    "wrong_shape": (
        lambda: predict_request(input=ROWS[:, :3].copy()),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"expects shape \[\?, 4\], got \[3, 3\]",
    ),
    "unknown_input": (
        lambda: predict_request(input=ROWS, extra=ROWS),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the model has no input 'extra'",
    ),
    "missing_input": (
        lambda: predict_request(features=ROWS),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the model has no input 'features'",
    ),
    "malformed_content": (
        _malformed_content,
        grpc.StatusCode.INVALID_ARGUMENT,
        r"46 bytes of content, shape \[3, 4\] of float32 needs 48",
    ),
    "oversized_message": (
        lambda: predict_request(input=np.zeros((5000, 4), np.float32)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",  # gRPC's own limit, set from max_request_bytes
    ),
    "oversized_decoded": (_broadcast_too_large, grpc.StatusCode.RESOURCE_EXHAUSTED, "needs 1600000 bytes, limit 65536"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_its_status_and_the_server_keeps_serving(
    stub: Any, case: str, expected: dict[str, np.ndarray]
) -> None:
    make, code, message = BAD_REQUESTS[case]
    got_code, details = code_of(lambda: stub.Predict(make()))
    assert got_code == code
    assert re.search(message, details), details
    np.testing.assert_array_equal(outputs_of(stub.Predict(predict_request()))["label"], expected["label"])


def test_a_server_fault_answers_internal_and_keeps_its_details_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    def broken(request: Any, context: Any) -> Any:
        raise RuntimeError("lookup table 0xdeadbeef is corrupt")

    handler = unary_handler(broken, predict_pb2.PredictRequest, predict_pb2.PredictResponse)
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PREDICTION_SERVICE, {"Predict": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            code, details = code_of(lambda: stub.Predict(predict_request(), timeout=30))
    finally:
        server.stop(None)
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error (the server log has the details)")
    assert "0xdeadbeef" in caplog.text


# -- GetModelMetadata and GetModelStatus ---------------------------------------------------------------


def test_metadata_is_the_serving_default_signature_with_dtypes_and_shapes(stub: Any) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "sklearn"
    response = stub.GetModelMetadata(request)
    assert response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    shapes = {
        name: (info.dtype, [d.size for d in info.tensor_shape.dim])
        for name, info in [*signature.inputs.items(), *signature.outputs.items()]
    }
    assert shapes == {
        "input": (types_pb2.DT_FLOAT, [-1, 4]),
        "label": (types_pb2.DT_INT64, [-1]),
        "probabilities": (types_pb2.DT_FLOAT, [-1, 3]),
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [([], "must name at least one metadata_field"), (["signature_def", "graph"], "'graph' is not supported")],
)
def test_metadata_fields_other_than_signature_def_are_refused(stub: Any, fields: list[str], message: str) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    request.model_spec.name = "sklearn"
    code, details = code_of(lambda: stub.GetModelMetadata(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details


def test_model_status_lists_the_available_version(channel: grpc.Channel) -> None:
    get_status = channel.unary_unary(
        "/tensorflow.serving.ModelService/GetModelStatus",
        request_serializer=get_model_status_pb2.GetModelStatusRequest.SerializeToString,
        response_deserializer=get_model_status_pb2.GetModelStatusResponse.FromString,
    )
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "sklearn"
    response = get_status(request)
    [version] = response.model_version_status
    assert version.version == 1
    assert version.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert version.status.error_code == 0
    assert version.status.error_message == ""
    request.model_spec.version.value = 3
    code, details = code_of(lambda: get_status(request))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "has no version 3" in details


def test_methods_tf_serving_has_but_this_server_does_not_serve_are_unimplemented(channel: grpc.Channel) -> None:
    classify = channel.unary_unary(
        "/tensorflow.serving.PredictionService/Classify",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )
    code, _details = code_of(lambda: classify(empty_pb2.Empty()))
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_requests_are_counted_by_protocol_and_status(server: ModelServer, stub: Any) -> None:
    stub.Predict(predict_request())
    code_of(lambda: stub.Predict(predict_request("nope")))
    assert server.inference is not None
    text = server.inference.metrics_exposition()[0].decode()
    assert 'enclaveml_serving_requests_total{code="OK",model="sklearn",protocol="tfserving-grpc"}' in text
    assert 'enclaveml_serving_requests_total{code="NOT_FOUND",model="_unknown",protocol="tfserving-grpc"}' in text
