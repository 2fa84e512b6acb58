"""The real TF Serving client (tensorflow + tensorflow-serving-api, in .venv/tfclient) against our server.

Nothing here imports TensorFlow: ``tf_client_interop.py`` runs in the TensorFlow venv as a
subprocess and prints what it got; this test compares that with ONNX Runtime run in-process
on the decrypted model.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from enclaveml.kms import LocalKms
from enclaveml.serving.certs import create_ca, issue_server_certificate
from enclaveml.serving.keys import LocalKeys
from enclaveml.serving.server import ModelServer, ServeConfig
from enclaveml.serving.tls import ServerTls

REPO = Path(__file__).resolve().parents[2]
TF_PYTHON = REPO / ".venv" / "tfclient" / "bin" / "python"
SCRIPT = Path(__file__).with_name("tf_client_interop.py")

pytestmark = pytest.mark.skipif(not TF_PYTHON.exists(), reason="run make install")


@pytest.fixture
def servers(model_repo_dir: Path, local_kms: LocalKms, tmp_path: Path) -> Iterator[tuple[ModelServer, ModelServer]]:
    now = datetime.now(UTC)
    ca = create_ca(now=now)
    issued = issue_server_certificate(ca, "localhost", now=now)
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    models = {"sklearn": model_repo_dir / "sklearn"}
    plain = ModelServer(ServeConfig(models, LocalKeys(local_kms), grpc_port=0, rest_port=0))
    tls = ModelServer(
        ServeConfig(
            models, LocalKeys(local_kms), grpc_port=0, rest_port=0, tls=ServerTls(issued.cert_pem, issued.key_pem)
        )
    )
    with plain, tls:
        assert plain.wait_until_loaded()
        assert tls.wait_until_loaded()
        yield plain, tls


def test_the_unchanged_tf_serving_client_predicts_reads_metadata_and_status(
    servers: tuple[ModelServer, ModelServer], sklearn_model_bytes: bytes, tmp_path: Path
) -> None:
    plain, tls = servers
    rows = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)
    spec = {
        "plain": f"127.0.0.1:{plain.grpc_port}",
        "tls": f"localhost:{tls.grpc_port}",
        "ca": str(tmp_path / "ca.crt"),
        "model": "sklearn",
        "input": "input",
        "rows": rows.tolist(),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    run = subprocess.run(
        [str(TF_PYTHON), str(SCRIPT), str(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        timeout=180,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])

    session = ort.InferenceSession(sklearn_model_bytes, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"input": rows})
    for answer in (got["predict"], got["predict_v1"], got["predict_tls"]):
        assert answer["version"] == 1
        assert answer["outputs"]["label"] == labels.tolist()
        np.testing.assert_allclose(answer["outputs"]["probabilities"], probabilities, rtol=1e-6)

    # tf.make_tensor_proto(0.5, shape=[2, 4]) sends one float_val; TF's rule repeats it.
    assert got["broadcast_float_val"] == [0.5]
    broadcast_labels, _ = session.run(["label", "probabilities"], {"input": np.full((2, 4), 0.5, np.float32)})
    assert got["predict_broadcast"]["outputs"]["label"] == broadcast_labels.tolist()

    assert got["signature"] == {
        "method_name": "tensorflow/serving/predict",
        "inputs": {"input": ["float32", [-1, 4]]},
        "outputs": {"label": ["int64", [-1]], "probabilities": ["float32", [-1, 3]]},
    }
    assert got["status"] == [[1, "AVAILABLE", 0]]
    assert got["errors"] == {
        "unknown_model": "NOT_FOUND",
        "wrong_dtype": "INVALID_ARGUMENT",
        "wrong_signature": "INVALID_ARGUMENT",
        "unknown_version": "NOT_FOUND",
    }
