"""The load client against a real model server: what CCZoo's client does, plus statistics and retries.

A real ``ModelServer`` on loopback serves the sklearn classifier sealed with a local KMS
(``model_repo_dir``). The client learns the input from the server's metadata, sends
``cnum x loop`` requests over TF Serving's or KServe's gRPC API, in plaintext, one-way TLS
(CCZoo's ``-crt``), mutual TLS (``-ca -crt -key``) or RA-TLS, and reports every outcome;
the CLI keeps CCZoo's single-dash options and summary line.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from enclaveml.attestation.policy import Policy
from enclaveml.attestation.sim import SimulationKey
from enclaveml.attestation.tee import SimulatedTee
from enclaveml.cli.serve_client_cmds import serve_client
from enclaveml.errors import ConfigError, EnclaveMLError
from enclaveml.kms import LocalKms
from enclaveml.serving.certs import CertPaths, issue_oneway, issue_twoway
from enclaveml.serving.keys import LocalKeys
from enclaveml.serving.load_client import LoadConfig, parse_shape, run_load
from enclaveml.serving.server import ModelServer, ServeConfig
from enclaveml.serving.tls import ServerTls

SUMMARY = re.compile(
    r"^summary: cnum (\d+), batch (\d+), e2e time\(s\) [\d.]+, average latency\(ms\) [\d.]+, tps: [\d.]+$", re.M
)
MEASUREMENT = bytes.fromhex("7a" * 48)


def _serve(models: Path, kms: LocalKms, **settings: object) -> ModelServer:
    config = ServeConfig(
        models={"sklearn": models / "sklearn"}, keys=LocalKeys(kms), grpc_port=0, rest_port=0, **settings
    )  # type: ignore[arg-type]
    server = ModelServer(config).start()
    assert server.wait_until_loaded(30)
    return server


@pytest.fixture
def server(model_repo_dir: Path, local_kms: LocalKms) -> Iterator[ModelServer]:
    running = _serve(model_repo_dir, local_kms)
    yield running
    running.stop()


def url_of(server: ModelServer) -> str:
    return f"127.0.0.1:{server.grpc_port}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the load and its report -----------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["tfserving", "kserve"])
def test_every_request_is_answered_and_measured(server: ModelServer, protocol: str) -> None:
    report = run_load(
        LoadConfig(url=url_of(server), model="sklearn", batch=4, cnum=3, loop=10, warmup=2, protocol=protocol)  # type: ignore[arg-type]
    )

    assert (report.requests, report.succeeded, report.failed, report.retried) == (30, 30, 0, 0)
    assert report.errors == {}
    assert report.ok
    assert [(i.name, str(i.dtype), i.shape) for i in report.inputs] == [("input", "float32", (-1, 4))]
    assert report.latency.count == 30
    assert 0 < report.latency.p50_ms <= report.latency.p95_ms <= report.latency.p99_ms <= report.latency.max_ms
    assert report.samples_per_second == pytest.approx(4 * report.requests_per_second)
    assert report.samples_per_second == pytest.approx(30 * 4 / report.e2e_seconds)  # CCZoo's tps
    match = SUMMARY.fullmatch(report.summary_line())
    assert match is not None
    assert match.groups() == ("3", "4")


def test_the_server_counted_warm_up_and_measured_requests(server: ModelServer) -> None:
    run_load(LoadConfig(url=url_of(server), model="sklearn", cnum=2, loop=5, warmup=3))
    assert server.inference is not None
    exposition, _type = server.inference.metrics_exposition()
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in exposition.decode().splitlines()
        if line.startswith("enclaveml_serving_requests_total{") and 'code="OK"' in line
    ]
    assert sum(counted) == 2 * (5 + 3)


def test_progress_callback_sees_each_measured_request_once(server: ModelServer) -> None:
    seen: list[int] = []
    run_load(LoadConfig(url=url_of(server), model="sklearn", cnum=2, loop=6, on_response=seen.append))
    assert seen == list(range(1, 13))


def test_loop_zero_runs_until_the_duration_ends(server: ModelServer) -> None:
    report = run_load(LoadConfig(url=url_of(server), model="sklearn", cnum=2, loop=0, duration=0.3))
    assert report.requests > 0
    assert report.ok
    assert 0.3 <= report.e2e_seconds < 5


def test_requests_the_server_refuses_are_failures_by_status(server: ModelServer) -> None:
    # The metadata call is skipped (name and shape given), so the wrong shape reaches the server.
    report = run_load(
        LoadConfig(url=url_of(server), model="sklearn", cnum=2, loop=4, input_name="input", input_shape=(5,))
    )
    assert (report.succeeded, report.failed, report.retried) == (0, 8, 0)
    assert report.errors == {"INVALID_ARGUMENT": 8}
    assert report.warmup_failed == 2 * 5
    assert not report.ok
    assert report.first_error is not None
    assert report.first_error.startswith("INVALID_ARGUMENT: ")
    assert "input" in report.first_error


def test_unavailable_requests_are_retried_then_counted(model_repo_dir: Path, tmp_path: Path) -> None:
    # A server whose KMS lacks the model's key never has the model ready: UNAVAILABLE.
    other = LocalKms.init(tmp_path / "other.json", "pw", kdf=_fast(), now=datetime.now(UTC))
    not_ready = _serve(model_repo_dir, other)
    try:
        report = run_load(
            LoadConfig(
                url=url_of(not_ready),
                model="sklearn",
                cnum=1,
                loop=3,
                warmup=0,
                retries=2,
                input_name="input",
                input_shape=(4,),
            )
        )
    finally:
        not_ready.stop()
    assert (report.failed, report.retried) == (3, 3)
    assert report.errors == {"UNAVAILABLE": 3}


def _fast() -> object:
    from enclaveml.kms import SCRYPT_FAST_FOR_TESTS

    return SCRYPT_FAST_FOR_TESTS


# -- before any load: clear errors -----------------------------------------------------------


def test_an_unknown_model_is_a_config_error(server: ModelServer) -> None:
    with pytest.raises(ConfigError, match="has no model 'nope'"):
        run_load(LoadConfig(url=url_of(server), model="nope", cnum=1, loop=1))


def test_nothing_listening_is_a_config_error_naming_the_address() -> None:
    port = _free_port()
    with pytest.raises(ConfigError, match=f"cannot read the model metadata from 127.0.0.1:{port}: UNAVAILABLE"):
        run_load(LoadConfig(url=f"127.0.0.1:{port}", model="sklearn", cnum=1, loop=1, timeout=5))


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"cnum": 0}, "cnum must be at least 1"),
        ({"batch": 0}, "batch must be at least 1"),
        ({"loop": -1}, "loop must not be negative"),
        ({"url": "localhost"}, "is not HOST:PORT"),
        ({"url": "grpc://localhost:8500"}, "is not HOST:PORT"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"ra_tls_policy": Path("p.toml"), "ca": Path("ca.crt")}, "RA-TLS pins the attested server certificate"),
    ],
)
def test_bad_settings_are_refused_before_connecting(settings: dict[str, object], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        LoadConfig(**settings)  # type: ignore[arg-type]


def test_input_shapes_parse_like_the_cli_writes_them() -> None:
    assert parse_shape("224,224,3") == (224, 224, 3)
    assert parse_shape("224x224x3") == (224, 224, 3)
    with pytest.raises(ConfigError, match="not comma-separated integers"):
        parse_shape("224,a")


# -- TLS, as CCZoo's -ca / -crt / -key ---------------------------------------------------------


def _tls_server(model_repo_dir: Path, kms: LocalKms, tls: ServerTls) -> ModelServer:
    return _serve(model_repo_dir, kms, tls=tls)


def test_one_way_tls_trusts_the_certificate_given_as_crt(
    model_repo_dir: Path, local_kms: LocalKms, tmp_path: Path
) -> None:
    certs = issue_oneway("serving.example", tmp_path / "pki", now=datetime.now(UTC))
    server = _tls_server(model_repo_dir, local_kms, certs.server_tls())
    try:
        for root in (certs.server_cert, certs.ca_cert):  # CCZoo: -crt is the server's certificate
            report = run_load(LoadConfig(url=url_of(server), model="sklearn", cnum=1, loop=3, crt=root))
            assert report.succeeded == 3
        stranger = issue_oneway("serving.example", tmp_path / "stranger", now=datetime.now(UTC))
        with pytest.raises(ConfigError, match="CERTIFICATE_VERIFY_FAILED"):
            run_load(LoadConfig(url=url_of(server), model="sklearn", cnum=1, loop=1, crt=stranger.ca_cert, timeout=5))
        with pytest.raises(ConfigError, match="UNAVAILABLE"):  # plaintext against a TLS port
            run_load(LoadConfig(url=url_of(server), model="sklearn", cnum=1, loop=1, timeout=5))
    finally:
        server.stop()


def test_mutual_tls_needs_the_client_certificate(model_repo_dir: Path, local_kms: LocalKms, tmp_path: Path) -> None:
    certs: CertPaths = issue_twoway("serving.example", tmp_path / "pki", now=datetime.now(UTC))
    server = _tls_server(model_repo_dir, local_kms, certs.server_tls())
    try:
        report = run_load(
            LoadConfig(
                url=url_of(server),
                model="sklearn",
                cnum=2,
                loop=3,
                ca=certs.ca_cert,
                crt=certs.client_cert,
                key=certs.client_key,
            )
        )
        assert report.succeeded == 6
        with pytest.raises(ConfigError, match="UNAVAILABLE"):
            run_load(LoadConfig(url=url_of(server), model="sklearn", cnum=1, loop=1, ca=certs.ca_cert, timeout=5))
    finally:
        server.stop()


def test_ra_tls_verifies_the_server_attestation_before_any_request(
    model_repo_dir: Path, local_kms: LocalKms, tmp_path: Path
) -> None:
    tee = SimulatedTee(SimulationKey.generate(), MEASUREMENT, b"")
    server = _serve(model_repo_dir, local_kms, ra_tls=True, tee=tee)
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(Policy(name="dev", allow_simulation=True, mr_enclave=(MEASUREMENT,)).to_toml())
    bad.write_text(Policy(name="dev", allow_simulation=True, mr_enclave=(bytes(48),)).to_toml())
    try:
        report = run_load(LoadConfig(url=url_of(server), model="sklearn", cnum=2, loop=3, ra_tls_policy=good))
        assert report.succeeded == 6
        with pytest.raises(EnclaveMLError) as refused:
            run_load(LoadConfig(url=url_of(server), model="sklearn", cnum=1, loop=1, ra_tls_policy=bad))
        assert refused.value.exit_code == 3
    finally:
        server.stop()


# -- the command, with CCZoo's options ---------------------------------------------------------


def test_cli_takes_the_cczoo_single_dash_options_and_prints_the_summary(server: ModelServer) -> None:
    args = ["-url", url_of(server), "--model", "sklearn", "-batch", "2", "-cnum", "2", "-loop", "5"]
    result = CliRunner().invoke(serve_client, args)

    assert result.exit_code == 0, result.output
    match = SUMMARY.search(result.stdout)
    assert match is not None
    assert match.groups() == ("2", "2")
    assert "requests: 10 (succeeded 10, failed 0, retried 0, warm-up failed 0)" in result.stdout
    assert "input float32 [-1, 4]" in result.stdout


def test_cli_json_report_and_exit_code_on_failed_requests(server: ModelServer) -> None:
    ok = CliRunner().invoke(
        serve_client, ["-url", url_of(server), "--model", "sklearn", "-cnum", "1", "-loop", "3", "--json"]
    )
    assert ok.exit_code == 0, ok.output
    document = json.loads(ok.stdout)
    assert (document["requests"], document["failed"], document["errors"]) == (3, 0, {})
    assert set(document["latency"]) == {"count", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms"}

    bad = ["-url", url_of(server), "--model", "sklearn", "-loop", "2", "-cnum", "1", "--input-name", "input"]
    failed = CliRunner().invoke(serve_client, [*bad, "--input-shape", "7", "--json"])
    assert failed.exit_code == 1
    assert json.loads(failed.stdout)["errors"] == {"INVALID_ARGUMENT": 2}


def test_cli_ra_tls_needs_a_policy() -> None:
    result = CliRunner().invoke(serve_client, ["-url", "127.0.0.1:1", "--ra-tls"])
    assert isinstance(result.exception, ConfigError)
    assert "--ra-tls and --policy go together" in str(result.exception)


def test_cli_ra_tls_trusts_only_the_given_simulation_key(
    model_repo_dir: Path, local_kms: LocalKms, tmp_path: Path
) -> None:
    signer, stranger = SimulationKey.generate(), SimulationKey.generate()
    (tmp_path / "signer.pub.pem").write_bytes(signer.public_pem())
    (tmp_path / "stranger.pub.pem").write_bytes(stranger.public_pem())
    policy = tmp_path / "policy.toml"
    policy.write_text(Policy(name="dev", allow_simulation=True, mr_enclave=(MEASUREMENT,)).to_toml())
    server = _serve(model_repo_dir, local_kms, ra_tls=True, tee=SimulatedTee(signer, MEASUREMENT, b""))
    base = [
        "-url",
        url_of(server),
        "--model",
        "sklearn",
        "-cnum",
        "1",
        "-loop",
        "2",
        "--ra-tls",
        "--policy",
        str(policy),
    ]
    try:
        trusted = CliRunner().invoke(serve_client, [*base, "--trusted-sim-key", str(tmp_path / "signer.pub.pem")])
        refused = CliRunner().invoke(serve_client, [*base, "--trusted-sim-key", str(tmp_path / "stranger.pub.pem")])
    finally:
        server.stop()
    assert trusted.exit_code == 0, trusted.output
    assert "requests: 2 (succeeded 2" in trusted.stdout
    assert isinstance(refused.exception, EnclaveMLError)
    assert refused.exception.exit_code == 3
    assert "requests:" not in refused.stdout  # nothing was sent to an unverified server
