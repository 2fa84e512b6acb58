"""The REST frontend over a real socket: KServe v2 JSON and binary tensors, TF Serving REST, health, metrics."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from enclaveml.kms import LocalKms
from enclaveml.serving.keys import LocalKeys
from enclaveml.serving.repository import publish_eml_model
from enclaveml.serving.server import ModelServer, ServeConfig

MODEL_KEY = "models"  # the key conftest's local_kms holds
LIMIT = 64 << 10
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 5.6, 2.4]]


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
def http(server: ModelServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{server.rest_port}", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def expected(sklearn_model_bytes: bytes) -> dict[str, list[Any]]:
    session = ort.InferenceSession(sklearn_model_bytes, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"input": np.asarray(ROWS, np.float32)})
    return {"label": labels.tolist(), "probabilities": probabilities.tolist()}


OVERSTATED = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 64}}]}
).encode()  # a binary header claiming 64 bytes where 32 follow


def kserve_body(data: Any = ROWS, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": data}], **extra}


# -- health and metadata ---------------------------------------------------------------------------------


def test_health_and_server_metadata(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2").json()["extensions"] == ["binary_tensor_data"]


def test_model_metadata_and_readiness_by_name_and_version(http: httpx.Client) -> None:
    metadata = http.get("/v2/models/sklearn").json()
    assert metadata == http.get("/v2/models/sklearn/versions/1").json()
    assert metadata["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    assert http.get("/v2/models/sklearn/ready").json() == {"name": "sklearn", "ready": True}
    missing = http.get("/v2/models/sklearn/versions/4/ready")
    assert missing.status_code == 404
    assert "no available version 4" in missing.json()["error"]


def test_unknown_models_and_routes_answer_json_errors(http: httpx.Client) -> None:
    unknown = http.get("/v2/models/nope")
    assert unknown.status_code == 404
    assert unknown.json()["error"].startswith("no model named 'nope'")
    route = http.get("/v3/anything")
    assert route.status_code == 404
    assert route.json() == {"error": "GET /v3/anything: Not Found"}
    assert http.get("/v2/models/sklearn/versions/latest").status_code == 404


# -- KServe v2 infer ---------------------------------------------------------------------------------------


def test_json_inference_echoes_the_id_and_answers_flat_data(http: httpx.Client, expected: dict[str, Any]) -> None:
    answer = http.post("/v2/models/sklearn/infer", json=kserve_body(id="req-7"))
    assert answer.status_code == 200
    body = answer.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("sklearn", "1", "req-7")
    label, probabilities = body["outputs"]
    assert label == {"name": "label", "datatype": "INT64", "shape": [2], "data": expected["label"]}
    np.testing.assert_allclose(np.reshape(probabilities["data"], (2, 3)), expected["probabilities"], rtol=1e-6)


def test_binary_tensors_in_and_out(http: httpx.Client, expected: dict[str, Any]) -> None:
    raw = np.asarray(ROWS, np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        }
    ).encode()
    answer = http.post(
        "/v2/models/sklearn/versions/1/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert answer.status_code == 200
    length = int(answer.headers["Inference-Header-Content-Length"])
    head = json.loads(answer.content[:length])
    assert head["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}}
    ]
    assert list(struct.unpack("<2q", answer.content[length:])) == expected["label"]


@pytest.mark.parametrize(
    ("content", "headers", "status", "message"),
    [
        (b"{not json", {}, 400, "the request body is not JSON"),
        (json.dumps(kserve_body([1, 2, 3])).encode(), {}, 400, "3 values, shape [2, 4] needs 8"),
        (json.dumps(kserve_body([[1, 2, 3, 4], [5, 6, 7, 8.5]], outputs=[{"name": "x"}])).encode(), {}, 400,
         "no output 'x'"),
        (json.dumps({"inputs": []}).encode(), {}, 400, '"inputs" must be a non-empty list'),
        (OVERSTATED + b"\0" * 32, {"Inference-Header-Content-Length": str(len(OVERSTATED))}, 400,
         "binary_data_size 64 runs past the binary data"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, 400, "does not fit the 2-byte body"),
        (b"x" * (LIMIT + 1), {}, 413, f"over the server's limit of {LIMIT}"),
    ],
    ids=["not_json", "count", "unknown_output", "no_inputs", "binary_size", "header_length", "oversized"],
)  # fmt: skip
def test_malformed_infer_requests_are_refused_and_the_next_one_is_answered(
    http: httpx.Client, content: bytes, headers: dict[str, str], status: int, message: str, expected: dict[str, Any]
) -> None:
    answer = http.post("/v2/models/sklearn/infer", content=content, headers=headers)
    assert answer.status_code == status
    assert message in answer.json()["error"]
    assert http.post("/v2/models/sklearn/infer", json=kserve_body()).json()["outputs"][0]["data"] == expected["label"]


def test_a_chunked_body_is_cut_off_at_the_limit(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):  # 100 KiB, no Content-Length: the server counts as it reads
            yield b" " * 1024

    answer = http.post("/v2/models/sklearn/infer", content=chunks())
    assert answer.status_code == 413


# -- TF Serving REST -----------------------------------------------------------------------------------------


def test_tf_serving_status_and_metadata(http: httpx.Client) -> None:
    assert http.get("/v1/models/sklearn").json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    metadata = http.get("/v1/models/sklearn/metadata").json()
    assert metadata["model_spec"] == {"name": "sklearn", "version": "1", "signature_name": "serving_default"}
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"]["input"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in signature["inputs"]["input"]["tensor_shape"]["dim"]] == ["-1", "4"]


def test_tf_serving_predict_in_row_and_columnar_form(http: httpx.Client, expected: dict[str, Any]) -> None:
    rows = http.post("/v1/models/sklearn:predict", json={"instances": ROWS}).json()["predictions"]
    assert [r["label"] for r in rows] == expected["label"]
    np.testing.assert_allclose([r["probabilities"] for r in rows], expected["probabilities"], rtol=1e-6)
    columns = http.post("/v1/models/sklearn/versions/1:predict", json={"inputs": {"input": ROWS}}).json()["outputs"]
    assert columns["label"] == expected["label"]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/models/nope:predict", {"instances": ROWS}, 404, "no model named 'nope'"),
        ("/v1/models/sklearn/versions/2:predict", {"instances": ROWS}, 404, "no available version 2"),
        ("/v1/models/sklearn:predict", {"instances": [[1, 2]]}, 400, "expects shape [?, 4], got [1, 2]"),
        ("/v1/models/sklearn:predict", {"instances": [["a", "b", "c", "d"]]}, 400, "do not fit dtype float32"),
        ("/v1/models/sklearn:predict", {"signature_name": "x", "instances": ROWS}, 400, "no signature 'x'"),
        ("/v1/models/sklearn:predict", {"rows": ROWS}, 400, 'exactly one of "instances" or "inputs"'),
    ],
    ids=["unknown_model", "unknown_version", "shape", "dtype", "signature", "no_instances"],
)
def test_tf_serving_predict_errors_are_json(
    http: httpx.Client, path: str, body: dict[str, Any], status: int, message: str
) -> None:
    answer = http.post(path, json=body)
    assert answer.status_code == status
    assert message in answer.json()["error"]


# -- metrics ----------------------------------------------------------------------------------------------------


def test_metrics_count_requests_per_protocol_and_status(http: httpx.Client) -> None:
    http.post("/v1/models/sklearn:predict", json={"instances": ROWS})
    http.post("/v1/models/sklearn:predict", json={"instances": [[1]]})
    text = http.get("/metrics").text
    assert 'enclaveml_serving_requests_total{code="200",model="sklearn",protocol="tfserving-rest"}' in text
    assert 'enclaveml_serving_requests_total{code="400",model="sklearn",protocol="tfserving-rest"}' in text
    assert 'enclaveml_serving_model_ready{model="sklearn"} 1.0' in text


def test_the_model_root_holds_only_the_sealed_file(server: ModelServer) -> None:
    version_dir = Path(server.config.models["sklearn"]) / "1"
    assert [p.name for p in version_dir.iterdir()] == ["model.onnx.eml"]
