"""KServe v2 / Open Inference Protocol with Triton's own clients (tritonclient.grpc and .http), plain and TLS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gevent.ssl
import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from enclaveml._version import __version__
from enclaveml.kms import LocalKms
from enclaveml.serving.certs import create_ca, issue_server_certificate
from enclaveml.serving.keys import LocalKeys
from enclaveml.serving.repository import publish_eml_model
from enclaveml.serving.server import ModelServer, ServeConfig
from enclaveml.serving.tls import ServerTls

MODEL_KEY = "models"  # the key conftest's local_kms holds
LIMIT = 64 << 10
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 5.6, 2.4]], np.float32)


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, local_kms: LocalKms, sklearn_model_bytes: bytes) -> Path:
    models = tmp_path_factory.mktemp("models")
    publish_eml_model(models / "sklearn", 1, sklearn_model_bytes, local_kms, MODEL_KEY)
    return models / "sklearn"


def _serve(model_root: Path, local_kms: LocalKms, tls: ServerTls | None = None) -> ModelServer:
    config = ServeConfig(
        {"sklearn": model_root}, LocalKeys(local_kms), grpc_port=0, rest_port=0, tls=tls, max_request_bytes=LIMIT
    )
    server = ModelServer(config).start()
    assert server.wait_until_loaded()
    return server


@pytest.fixture(scope="module")
def server(model_root: Path, local_kms: LocalKms) -> Iterator[ModelServer]:
    running = _serve(model_root, local_kms)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tls_server(model_root: Path, local_kms: LocalKms, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    now = datetime.now(UTC)
    ca = create_ca(now=now)
    issued = issue_server_certificate(ca, "localhost", now=now)
    ca_file = tmp_path_factory.mktemp("tls") / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    running = _serve(model_root, local_kms, ServerTls(issued.cert_pem, issued.key_pem))
    yield running, ca_file
    running.stop()


@pytest.fixture(scope="module")
def expected(sklearn_model_bytes: bytes) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(sklearn_model_bytes, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"input": ROWS})
    return {"label": labels, "probabilities": probabilities}


def grpc_input(array: np.ndarray, name: str = "input", datatype: str = "FP32") -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def http_input(array: np.ndarray, *, binary: bool, datatype: str = "FP32") -> triton_http.InferInput:
    tensor = triton_http.InferInput("input", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def check(result: Any, expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6)


# -- gRPC ----------------------------------------------------------------------------------------------


def test_grpc_health_metadata_and_inference(server: ModelServer, expected: dict[str, np.ndarray]) -> None:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("sklearn")
    assert client.is_model_ready("sklearn", "1")
    server_metadata = client.get_server_metadata(as_json=True)
    assert server_metadata["name"] == "enclaveml"
    assert server_metadata["version"] == __version__
    metadata = client.get_model_metadata("sklearn", as_json=True)
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert [o["name"] for o in metadata["outputs"]] == ["label", "probabilities"]

    result = client.infer("sklearn", [grpc_input(ROWS)], request_id="r-1")
    check(result, expected)
    assert result.get_response().model_version == "1"
    assert result.get_response().id == "r-1"
    only_label = client.infer("sklearn", [grpc_input(ROWS)], outputs=[triton_grpc.InferRequestedOutput("label")])
    assert [o.name for o in only_label.get_response().outputs] == ["label"]
    client.close()


def test_grpc_inputs_may_come_in_typed_contents_instead_of_raw_bytes(
    server: ModelServer, expected: dict[str, np.ndarray]
) -> None:
    request = service_pb2.ModelInferRequest(model_name="sklearn", model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(ROWS.shape))
    tensor.contents.fp32_contents.extend(ROWS.ravel().tolist())
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert [o.name for o in response.outputs] == ["label", "probabilities"]
    labels = np.frombuffer(response.raw_output_contents[0], dtype="<i8")
    np.testing.assert_array_equal(labels, expected["label"])


def _grpc_cases() -> dict[str, tuple[Callable[[], list[Any]], str, str]]:
    raw_short = grpc_input(ROWS)
    raw_short._raw_content = raw_short._raw_content[:-4]  # the bytes tritonclient would send, 4 short
    return {
        "wrong_datatype": (
            lambda: [grpc_input(ROWS.astype(np.float64), datatype="FP64")],
            "INVALID_ARGUMENT",
            "expects dtype float32, got float64",
        ),
        "wrong_shape": (lambda: [grpc_input(ROWS[:, :2].copy())], "INVALID_ARGUMENT", "expects shape [?, 4]"),
        "unknown_input": (
            lambda: [grpc_input(ROWS), grpc_input(ROWS, "extra")],
            "INVALID_ARGUMENT",
            "no input 'extra'",
        ),
        "raw_length": (
            lambda: [raw_short],
            "INVALID_ARGUMENT",
            "28 bytes of content, shape [2, 4] of float32 needs 32",
        ),
        "oversized": (lambda: [grpc_input(np.zeros((5000, 4), np.float32))], "RESOURCE_EXHAUSTED", "larger than max"),
    }


@pytest.mark.parametrize("case", ["wrong_datatype", "wrong_shape", "unknown_input", "raw_length", "oversized"])
def test_grpc_refuses_bad_inputs_with_their_status_and_keeps_serving(
    server: ModelServer, case: str, expected: dict[str, np.ndarray]
) -> None:
    make, status, message = _grpc_cases()[case]
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    with pytest.raises(InferenceServerException) as refused:
        client.infer("sklearn", make())
    assert refused.value.status() == f"StatusCode.{status}"
    assert message in refused.value.message()
    check(client.infer("sklearn", [grpc_input(ROWS)]), expected)
    client.close()


def test_grpc_unknown_models_and_versions_are_not_found(server: ModelServer) -> None:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    for model, version, message in [("nope", "", "no model named 'nope'"), ("sklearn", "7", "no available version 7")]:
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model, [grpc_input(ROWS)], model_version=version)
        assert refused.value.status() == "StatusCode.NOT_FOUND"
        assert message in refused.value.message()
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        client.is_model_ready("nope")
    client.close()


def test_triton_extensions_are_unimplemented(server: ModelServer) -> None:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_repository_index()
    assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
    client.close()


# -- HTTP ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary_extension", "json"])
def test_http_health_metadata_and_inference(server: ModelServer, expected: dict[str, np.ndarray], binary: bool) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.rest_port}")
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("sklearn")
    assert client.get_model_metadata("sklearn")["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    outputs = [triton_http.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
    result = client.infer("sklearn", [http_input(ROWS, binary=binary)], outputs=outputs)
    check(result, expected)
    client.close()


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (lambda: [http_input(ROWS.astype(np.float64), binary=True, datatype="FP64")], 400, "expects dtype float32"),
        (lambda: [http_input(ROWS[:1, :3].copy(), binary=False)], 400, "expects shape [?, 4], got [1, 3]"),
        (lambda: [http_input(np.zeros((5000, 4), np.float32), binary=True)], 413, "over the server's limit"),
    ],
    ids=["wrong_datatype", "wrong_shape", "oversized"],
)
def test_http_refuses_bad_inputs_with_their_status_and_keeps_serving(
    server: ModelServer, expected: dict[str, np.ndarray], make: Callable[[], list[Any]], status: int, message: str
) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.rest_port}")
    with pytest.raises(InferenceServerException) as refused:
        client.infer("sklearn", make())
    assert refused.value.status() == str(status)
    assert message in refused.value.message()
    check(client.infer("sklearn", [http_input(ROWS, binary=True)]), expected)
    client.close()


# -- TLS -------------------------------------------------------------------------------------------------


def test_both_clients_over_one_way_tls(tls_server: tuple[ModelServer, Path], expected: dict[str, np.ndarray]) -> None:
    server, ca_file = tls_server
    secure = triton_grpc.InferenceServerClient(
        f"localhost:{server.grpc_port}", ssl=True, root_certificates=str(ca_file)
    )
    assert secure.is_server_ready()
    check(secure.infer("sklearn", [grpc_input(ROWS)]), expected)
    secure.close()

    https = triton_http.InferenceServerClient(
        f"localhost:{server.rest_port}",
        ssl=True,
        ssl_context_factory=lambda cafile=None: gevent.ssl.create_default_context(cafile=str(ca_file)),
    )
    assert https.is_server_ready()
    check(https.infer("sklearn", [http_input(ROWS, binary=True)]), expected)
    https.close()


def test_a_client_that_does_not_trust_the_server_ca_is_refused(tls_server: tuple[ModelServer, Path]) -> None:
    server, _ca_file = tls_server
    other_ca = create_ca(now=datetime.now(UTC))
    credentials = grpc.ssl_channel_credentials(other_ca.cert_pem)
    untrusting = triton_grpc.InferenceServerClient(f"localhost:{server.grpc_port}", ssl=True, creds=credentials)
    with pytest.raises(InferenceServerException) as refused:
        untrusting.is_server_live(client_timeout=10)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    untrusting.close()
