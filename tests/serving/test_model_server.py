"""The model server as an operator runs it: readiness, tampered models, mutual TLS, RA-TLS, workers, the CLI."""

from __future__ import annotations

import asyncio
import functools
import os
import queue
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from tritonclient.grpc import service_pb2, service_pb2_grpc

from enclaveml.attestation.policy import Policy, PolicyViolation
from enclaveml.attestation.sim import SimulationKey
from enclaveml.attestation.tee import SimulatedTee
from enclaveml.cli._app import App
from enclaveml.cli.serve_cmds import serve
from enclaveml.errors import ConfigError
from enclaveml.kms import LocalKms
from enclaveml.serving._tf_protos import get_model_status_pb2, predict_pb2, prediction_service_pb2_grpc
from enclaveml.serving.certs import create_ca, issue_client_certificate, issue_server_certificate
from enclaveml.serving.keys import LocalKeys, WrapKeyFile, read_wrap_key_file
from enclaveml.serving.ratls import fetch_verified_server_certificate, pinned_channel_options
from enclaveml.serving.repository import publish_eml_model, publish_pf_model
from enclaveml.serving.server import ModelServer, ServeConfig, grpc_threads
from enclaveml.serving.tensor_codec import to_kserve_raw, to_tensor_proto
from enclaveml.serving.tls import ServerTls, channel_credentials, client_ssl_context

MODEL_KEY = "models"  # the key conftest's local_kms holds
PASSPHRASE = "serving tests passphrase"  # conftest's, for the CLI's ENCLAVEML_PASSPHRASE
ROW = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)


def predict(channel: grpc.Channel) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "sklearn"
    request.inputs["input"].CopyFrom(to_tensor_proto(ROW))
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)


def model_status(channel: grpc.Channel) -> Any:
    call = channel.unary_unary(
        "/tensorflow.serving.ModelService/GetModelStatus",
        request_serializer=get_model_status_pb2.GetModelStatusRequest.SerializeToString,
        response_deserializer=get_model_status_pb2.GetModelStatusResponse.FromString,
    )
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "sklearn"
    return call(request, timeout=30)


def kserve_ready(channel: grpc.Channel) -> bool:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return bool(stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=30).ready)


def rejected(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    return failure.value


@pytest.fixture
def local(model_repo_dir: Path, local_kms: LocalKms) -> dict[str, Any]:
    return {"models": {"sklearn": model_repo_dir / "sklearn"}, "keys": LocalKeys(local_kms)}


# -- readiness -------------------------------------------------------------------------------------------


def test_the_ports_listen_before_any_model_exists_and_readiness_says_why(
    tmp_path: Path, local_kms: LocalKms, sklearn_model_bytes: bytes
) -> None:
    root = tmp_path / "models" / "sklearn"
    config = ServeConfig({"sklearn": root}, LocalKeys(local_kms), grpc_port=0, rest_port=0)
    with ModelServer(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        assert server.wait_until_loaded()
        ready = httpx.get(f"http://127.0.0.1:{server.rest_port}/v2/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "error": f"model 'sklearn': {root}: no such directory"}
        assert httpx.get(f"http://127.0.0.1:{server.rest_port}/v2/health/live").status_code == 200
        assert not kserve_ready(channel)
        assert rejected(lambda: predict(channel)).code() == grpc.StatusCode.UNAVAILABLE

        publish_eml_model(root, 1, sklearn_model_bytes, local_kms, MODEL_KEY)
        assert server.repository is not None
        server.repository.reload()
        assert httpx.get(f"http://127.0.0.1:{server.rest_port}/v2/health/ready").json() == {"ready": True}
        assert kserve_ready(channel)
        assert predict(channel).model_spec.version.value == 1


def test_a_tampered_model_is_refused_named_in_status_and_served_once_restored(local: dict[str, Any]) -> None:
    model_file = local["models"]["sklearn"] / "1" / "model.onnx.eml"
    sealed = model_file.read_bytes()
    model_file.write_bytes(sealed[:-100] + bytes([sealed[-100] ^ 1]) + sealed[-99:])
    config = ServeConfig(local["models"], local["keys"], grpc_port=0, rest_port=0)
    with ModelServer(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        assert server.wait_until_loaded()
        ready = httpx.get(f"http://127.0.0.1:{server.rest_port}/v2/health/ready")
        assert ready.status_code == 503
        assert "model 'sklearn': version 1: " in ready.json()["error"]
        assert "model.onnx.eml" in ready.json()["error"]
        [version] = model_status(channel).model_version_status
        assert version.state == get_model_status_pb2.ModelVersionStatus.END
        assert version.status.error_code != 0
        assert "model.onnx.eml" in version.status.error_message
        refused = rejected(lambda: predict(channel))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert "model 'sklearn' is not ready: version 1: " in refused.details()

        model_file.write_bytes(sealed)
        assert server.repository is not None
        server.repository.reload()
        assert httpx.get(f"http://127.0.0.1:{server.rest_port}/v2/health/ready").status_code == 200
        assert predict(channel).model_spec.version.value == 1


# -- TLS -------------------------------------------------------------------------------------------------


def test_mutual_tls_refuses_clients_without_a_certificate(local: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    ca = create_ca(now=now)
    server_cert = issue_server_certificate(ca, "localhost", now=now)
    client = issue_client_certificate(ca, "client", now=now)
    tls = ServerTls(server_cert.cert_pem, server_cert.key_pem, client_ca_pem=ca.cert_pem)
    config = ServeConfig(local["models"], local["keys"], grpc_port=0, rest_port=0, tls=tls)
    with ModelServer(config) as server:
        assert server.tls_mode == "mutual TLS"
        target = f"localhost:{server.grpc_port}"
        anonymous = channel_credentials(ca=ca.cert_pem, crt=None, key=None)
        with grpc.secure_channel(target, anonymous) as channel:
            assert rejected(lambda: predict(channel)).code() == grpc.StatusCode.UNAVAILABLE
        context = client_ssl_context(ca=ca.cert_pem, crt=None, key=None)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"https://localhost:{server.rest_port}/v2/health/live", verify=context)

        identified = channel_credentials(ca=ca.cert_pem, crt=client.cert_pem, key=client.key_pem)
        with grpc.secure_channel(target, identified) as channel:
            assert predict(channel).model_spec.version.value == 1
        context = client_ssl_context(ca=ca.cert_pem, crt=client.cert_pem, key=client.key_pem)
        assert httpx.get(f"https://localhost:{server.rest_port}/v2/health/live", verify=context).status_code == 200


def test_ra_tls_clients_verify_the_servers_evidence_then_pin_its_certificate(local: dict[str, Any]) -> None:
    measurement = bytes(range(48))
    tee = SimulatedTee(SimulationKey.generate(), measurement, b"")
    config = ServeConfig(local["models"], local["keys"], grpc_port=0, rest_port=0, ra_tls=True, tee=tee)
    with ModelServer(config) as server:
        assert server.tls_mode == "RA-TLS"
        now = datetime.now(UTC)
        good = Policy(name="serving-dev", allow_simulation=True, mr_enclave=(measurement,))
        pem = fetch_verified_server_certificate("127.0.0.1", server.grpc_port, good, now=now)
        assert server.tls is not None
        assert pem.strip() == server.tls.cert_pem.strip()
        credentials = channel_credentials(ca=None, crt=pem, key=None)
        options = pinned_channel_options(pem, "127.0.0.1")
        with grpc.secure_channel(f"127.0.0.1:{server.grpc_port}", credentials, options) as channel:
            assert predict(channel).model_spec.version.value == 1
        other = Policy(name="serving-dev", allow_simulation=True, mr_enclave=(bytes(48),))
        with pytest.raises(PolicyViolation):
            fetch_verified_server_certificate("127.0.0.1", server.rest_port, other, now=now)


# -- batching ----------------------------------------------------------------------------------------------


def test_concurrent_requests_share_model_runs_with_batching(local: dict[str, Any]) -> None:
    config = ServeConfig(
        local["models"], local["keys"], grpc_port=0, rest_port=0, enable_batching=True, batch_timeout_ms=50
    )
    rows = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32)

    async def infer_all(port: int) -> list[Any]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            requests = []
            for row in rows:
                request = service_pb2.ModelInferRequest(model_name="sklearn")
                request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
                request.raw_input_contents.append(to_kserve_raw(row[None, :]))
                requests.append(stub.ModelInfer(request, timeout=30))
            return list(await asyncio.gather(*requests))

    with ModelServer(config) as server:
        assert server.wait_until_loaded()
        answers = asyncio.run(infer_all(server.grpc_port))
        labels = [int(np.frombuffer(a.raw_output_contents[0], "<i8")[0]) for a in answers]
        assert server.inference is not None
        batch = server.inference.repository.get("sklearn").runtime.run({"input": rows}, ["label"])
        assert labels == batch["label"].tolist()
        text = server.inference.metrics_exposition()[0].decode()
        runs = next(line for line in text.splitlines() if line.startswith("enclaveml_serving_batch_size_count"))
        assert float(runs.rsplit(" ", 1)[1]) < 16  # fewer model runs than requests


# -- worker processes --------------------------------------------------------------------------------------


@pytest.fixture
def pf_models(tmp_path: Path, sklearn_model_bytes: bytes, pf_wrap_key: bytes) -> tuple[dict[str, Path], Path]:
    root = tmp_path / "models" / "sklearn"
    publish_pf_model(root, 1, sklearn_model_bytes, pf_wrap_key)
    key_file = tmp_path / "wrap_key"
    key_file.write_bytes(pf_wrap_key)
    return {"sklearn": root}, key_file


def test_two_worker_processes_share_the_ports_and_both_answer(pf_models: tuple[dict[str, Path], Path]) -> None:
    models, key_file = pf_models
    config = ServeConfig(models, WrapKeyFile(key_file), grpc_port=0, rest_port=0, workers=2)
    with ModelServer(config) as server:
        ready_workers: set[str] = set()
        for _ in range(200):  # fresh connections: the kernel spreads them over both workers
            answer = httpx.get(f"http://127.0.0.1:{server.rest_port}/v2/health/ready")
            if answer.status_code == 200:
                ready_workers.add(answer.headers["enclaveml-worker"])
            if ready_workers == {"1", "2"}:
                break
        assert ready_workers == {"1", "2"}
        for _ in range(6):
            with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                assert predict(channel).model_spec.version.value == 1
        assert server._workers is not None
        processes = list(server._workers.processes)
        assert len({p.pid for p in processes}) == 2
    assert all(p.exitcode is not None for p in processes)


def test_a_worker_that_cannot_start_stops_the_server_with_its_reason(
    pf_models: tuple[dict[str, Path], Path], tmp_path: Path
) -> None:
    models, _key_file = pf_models
    broken = functools.partial(read_wrap_key_file, tmp_path / "missing")  # raises in each worker
    config = ServeConfig(models, broken, grpc_port=0, rest_port=0, workers=2)
    with pytest.raises(ConfigError, match=r"worker \d did not start: cannot read the wrap key file"):
        ModelServer(config).start()


def test_a_key_source_that_cannot_travel_to_workers_is_named(pf_models: tuple[dict[str, Path], Path]) -> None:
    models, key_file = pf_models
    config = ServeConfig(models, lambda: WrapKeyFile(key_file), grpc_port=0, rest_port=0, workers=2)
    with pytest.raises(ConfigError, match="cannot start worker 1") as refused:
        ModelServer(config).start()
    assert "picklable" in refused.value.hint


# -- configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"models": {}}, "no models to serve"),
        ({"grpc_port": 9000, "rest_port": 9000}, "both 9000"),
        ({"ra_tls": True}, "RA-TLS needs the TEE"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"max_request_bytes": 10}, "too small"),
    ],
)
def test_bad_configurations_are_refused_before_anything_listens(
    local: dict[str, Any], overrides: dict[str, Any], message: str
) -> None:
    arguments = {"models": local["models"], "keys": local["keys"], **overrides}
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**arguments)


def test_grpc_calls_get_a_thread_per_core_and_with_batching_one_per_row_of_a_full_batch(
    local: dict[str, Any],
) -> None:
    per_core = max(2, os.cpu_count() or 1)
    assert grpc_threads() == per_core
    assert grpc_threads(ServeConfig(local["models"], local["keys"])) == per_core
    batching = ServeConfig(local["models"], local["keys"], enable_batching=True, max_batch_size=per_core + 40)
    assert grpc_threads(batching) == per_core + 40


# -- the CLI ---------------------------------------------------------------------------------------------------


def test_serve_help_has_an_example() -> None:
    result = CliRunner().invoke(serve, ["--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "--keys-from" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keys-from", "vault"], "unknown key source 'vault'"),
        (["--keys-from", "broker=https://broker:8443"], "--keys-from broker needs the keys to receive"),
        (["--keys-from", "secret-prov=broker"], "not HOST:PORT"),
        (["--keys-from", "wrap-key"], "--keys-from wrap-key needs FILE"),
        (["--keys-from", "wrap-key=a", "--keys-from", "secret-prov=h:1"], "two --keys-from for PF files"),
        (["--tls-cert", "server.crt"], "give both --tls-cert and --tls-key"),
        (["--client-ca", "ca.crt"], "needs the server's own certificate"),
        (["--ra-tls", "--tls-cert", "a", "--tls-key", "b"], "--ra-tls makes the server's certificate itself"),
    ],
)
def test_serve_refuses_contradictory_options_before_listening(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(serve, ["--model", "m=models/m", *args], obj=App(tmp_path, debug=False))
    assert isinstance(result.exception, ConfigError)
    assert message in result.exception.what


SERVE = [str(Path(sys.executable).with_name("enclaveml"))]


@pytest.fixture
def cli_env(local_kms: LocalKms) -> dict[str, str]:
    return {**os.environ, "ENCLAVEML_HOME": str(local_kms.store_path.parent), "ENCLAVEML_PASSPHRASE": PASSPHRASE}


def _lines(stream: Any) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def _until(lines: queue.Queue[str], text: str, seen: list[str]) -> str:
    while True:
        line = lines.get(timeout=60)
        seen.append(line)
        if text in line:
            return line


def test_enclaveml_serve_prints_where_it_listens_and_what_it_loaded_then_stops_on_sigterm(
    model_repo_dir: Path, cli_env: dict[str, str]
) -> None:
    process = subprocess.Popen(
        [*SERVE, "serve", "--model", f"sklearn={model_repo_dir / 'sklearn'}", "--grpc-port", "0", "--rest-port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=cli_env,
    )
    seen: list[str] = []
    try:
        assert process.stderr is not None
        lines = _lines(process.stderr)
        listening = _until(lines, "serving sklearn:", seen)
        assert "(plaintext)" in listening
        rest_port = int(listening.split("REST http://127.0.0.1:")[1].split(" ")[0])
        loaded = _until(lines, "model sklearn version 1 available", seen)
        assert "decrypt" in loaded
        answer = httpx.post(f"http://127.0.0.1:{rest_port}/v1/models/sklearn:predict", json={"instances": ROW.tolist()})
        assert answer.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, seen
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_enclaveml_serve_refuses_a_malformed_model_option(cli_env: dict[str, str]) -> None:
    done = subprocess.run([*SERVE, "serve", "--model", "sklearn"], capture_output=True, text=True, env=cli_env)
    assert done.returncode == 2
    assert "--model 'sklearn' is not NAME=PATH" in done.stderr
