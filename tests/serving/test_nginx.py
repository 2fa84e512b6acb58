"""nginx in front of model-server replicas: the rendered configuration, checked by a real nginx.

First the renderer (``serving/nginx.py`` over ``deploy/nginx/grpc-lb.conf.template``): every
placeholder filled, TLS blocks only when asked, unsafe values refused; ``nginx -t`` accepts
what it writes. Then the story of the issue's part 7: two real ``enclaveml serve`` replicas
behind a real nginx, the load client through it, one replica killed with SIGKILL in the middle
of a run, and not one request lost.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from enclaveml.errors import ConfigError
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.serving.certs import CertPaths, issue_oneway, issue_twoway
from enclaveml.serving.load_client import LoadConfig, run_load
from enclaveml.serving.nginx import TEMPLATE, GrpcLoadBalancer, render_grpc_lb_config, write_grpc_lb_config
from enclaveml.serving.repository import publish_eml_model

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")


def _standalone(tmp_path: Path, **overrides: object) -> GrpcLoadBalancer:
    settings: dict[str, object] = {
        "backends": ("127.0.0.1:18500", "127.0.0.1:18501"),
        "listen": "127.0.0.1:18400",
        "runtime_dir": tmp_path,
        "error_log": str(tmp_path / "error.log"),
        "access_log": str(tmp_path / "access.log"),
        "master_process": False,
        "worker_processes": "1",
    }
    return GrpcLoadBalancer(**{**settings, **overrides})  # type: ignore[arg-type]


def _nginx_test(config_file: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    assert NGINX is not None
    return subprocess.run(
        [NGINX, "-t", "-q", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config_file)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


# -- rendering -------------------------------------------------------------------------------


def test_plain_config_balances_over_every_backend_with_retries(tmp_path: Path) -> None:
    text = render_grpc_lb_config(_standalone(tmp_path))

    assert re.search(r"\$\{[A-Z_]+\}", text) is None
    assert "server 127.0.0.1:18500 max_fails=1 fail_timeout=10s;" in text
    assert "server 127.0.0.1:18501 max_fails=1 fail_timeout=10s;" in text
    assert "listen 127.0.0.1:18400 http2;" in text
    assert "grpc_pass grpc://enclaveml_model_servers;" in text
    assert "grpc_next_upstream error timeout http_502 http_503 http_504 non_idempotent;" in text
    assert "master_process off;" in text
    assert f"pid {tmp_path}/nginx.pid;" in text
    assert "ssl_certificate" not in text
    assert "grpc_ssl" not in text
    assert "$upstream_addr" in text  # nginx variables are not placeholders


def test_tls_to_clients_and_reencryption_to_backends(tmp_path: Path) -> None:
    certs = issue_twoway("lb.example", tmp_path / "pki", now=datetime.now(UTC))
    config = _standalone(
        tmp_path,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        client_ca=certs.ca_cert,
        backend_tls=True,
        backend_ca=certs.ca_cert,
        backend_server_name="localhost",
        backend_client_cert=certs.client_cert,
        backend_client_key=certs.client_key,
    )
    text = render_grpc_lb_config(config)

    assert "listen 127.0.0.1:18400 ssl http2;" in text
    assert f"ssl_certificate {certs.server_cert};" in text
    assert "ssl_verify_client on;" in text
    assert "grpc_pass grpcs://enclaveml_model_servers;" in text
    assert f"grpc_ssl_trusted_certificate {certs.ca_cert};" in text
    assert "grpc_ssl_verify on;" in text
    assert "grpc_ssl_name localhost;" in text
    assert f"grpc_ssl_certificate {certs.client_cert};" in text


@needs_nginx
def test_nginx_accepts_the_plain_config(tmp_path: Path) -> None:
    path = write_grpc_lb_config(_standalone(tmp_path), tmp_path / "nginx.conf")
    result = _nginx_test(path, tmp_path)
    assert result.returncode == 0, result.stderr


@needs_nginx
def test_nginx_accepts_the_tls_config_and_loads_its_certificates(tmp_path: Path) -> None:
    certs = issue_oneway("lb.example", tmp_path / "pki", now=datetime.now(UTC))
    config = _standalone(
        tmp_path, tls_cert=certs.server_cert, tls_key=certs.server_key, backend_tls=True, backend_ca=certs.ca_cert
    )
    path = write_grpc_lb_config(config, tmp_path / "nginx.conf")
    result = _nginx_test(path, tmp_path)
    assert result.returncode == 0, result.stderr


@needs_nginx
def test_nginx_rejects_a_missing_certificate(tmp_path: Path) -> None:
    config = _standalone(tmp_path, tls_cert=tmp_path / "absent.crt", tls_key=tmp_path / "absent.key")
    result = _nginx_test(write_grpc_lb_config(config, tmp_path / "nginx.conf"), tmp_path)
    assert result.returncode != 0
    assert "absent.crt" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"backends": ()}, "no backends"),
        ({"backends": ("10.0.0.5",)}, "not HOST:PORT"),
        ({"backends": ("10.0.0.5:8500; include /etc/passwd",)}, "not HOST:PORT"),
        ({"listen": "0.0.0.0:8500 ssl"}, "not \\[ADDR:\\]PORT"),
        ({"tls_cert": Path("/tls/cert.pem")}, "both tls_cert and tls_key"),
        ({"client_ca": Path("/tls/ca.pem")}, "needs TLS to clients"),
        ({"backend_ca": Path("/tls/ca.pem")}, "backend_tls is off"),
        ({"access_log": "/var/log/a.log; daemon on"}, "cannot go into an nginx directive"),
        ({"runtime_dir": Path("/tmp/with space")}, "cannot go into an nginx directive"),
        ({"next_upstream_tries": 0}, "out of range"),
    ],
)
def test_unsafe_or_incomplete_settings_are_refused(tmp_path: Path, overrides: dict[str, object], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        _standalone(tmp_path, **overrides)


def test_an_unknown_placeholder_in_the_template_is_an_error(tmp_path: Path) -> None:
    template = tmp_path / "broken.template"
    template.write_text(TEMPLATE.read_text() + "\n# ${NEW_SETTING}\n")
    with pytest.raises(ConfigError, match="NEW_SETTING"):
        render_grpc_lb_config(_standalone(tmp_path), template=template)


def test_written_config_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "nginx.conf"
    target.write_text("old")
    write_grpc_lb_config(_standalone(tmp_path), target)
    assert target.read_text().startswith("# nginx in front of enclaveml model-server replicas")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("nginx.conf")] == ["nginx.conf"]


# -- scale-out: two real replicas behind a real nginx ------------------------------------------

PASSPHRASE = "nginx scale-out test"
ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
_LISTENING = re.compile(r"gRPC [\d.]+:(\d+), REST https?://[\d.]+:(\d+)")
STARTUP_SECONDS = 60.0


@dataclass
class Replica:
    process: subprocess.Popen[str]
    grpc_port: int
    rest_port: int
    scheme: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def served(self, verify: ssl.SSLContext | bool = False) -> float:
        """Successful requests this replica counted (its Prometheus ``/metrics``)."""
        url = f"{self.scheme}://127.0.0.1:{self.rest_port}/metrics"
        text = httpx.get(url, verify=verify, timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("enclaveml_serving_requests_total{") and 'code="OK"' in line
        )


def _launch_replica(
    home: Path, models: Path, tls: CertPaths | None
) -> tuple[subprocess.Popen[str], queue.Queue[str | None]]:
    """``enclaveml serve`` on free ports, its stderr lines into a queue."""
    args = ["serve", "--model", f"sklearn={models / 'sklearn'}", "--grpc-port", "0", "--rest-port", "0"]
    if tls is not None:
        args += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)]
    env = {**os.environ, "ENCLAVEML_HOME": str(home), "ENCLAVEML_PASSPHRASE": PASSPHRASE}
    process = subprocess.Popen(
        [ENCLAVEML, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # keeps draining stderr for the replica's whole life
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return process, lines


def _until_available(process: subprocess.Popen[str], lines: queue.Queue[str | None], tls: bool) -> Replica:
    """Read the replica's stderr until it says the model is available; its ports from its first line."""
    deadline, ports, seen = time.monotonic() + STARTUP_SECONDS, None, []
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line is None:
            raise AssertionError("the replica exited: " + "".join(seen))
        seen.append(line)
        if ports is None and (match := _LISTENING.search(line)):
            ports = int(match.group(1)), int(match.group(2))
        if "model sklearn version 1 available" in line and ports is not None:
            return Replica(process, *ports, "https" if tls else "http")


@contextlib.contextmanager
def _replicas(tmp_path: Path, count: int, tls: CertPaths | None = None) -> Iterator[list[Replica]]:
    home, models = tmp_path / "home", tmp_path / "models"
    home.mkdir()
    kms = LocalKms.init(home / "keystore.json", PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    kms.create_key("models")
    from enclaveml.serving.sample_models import sklearn_classifier_onnx

    publish_eml_model(models / "sklearn", 1, sklearn_classifier_onnx(), kms, "models")
    launched = [_launch_replica(home, models, tls) for _ in range(count)]  # they start in parallel
    try:
        yield [_until_available(process, lines, tls is not None) for process, lines in launched]
    finally:
        for process, _lines in launched:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _lines in launched:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=15)
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _nginx(config: GrpcLoadBalancer, prefix: Path) -> Iterator[str]:
    """A foreground nginx with ``config``; yields its HOST:PORT once it accepts connections."""
    assert NGINX is not None
    path = write_grpc_lb_config(config, prefix / "nginx.conf")
    process = subprocess.Popen(
        [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    host, _sep, port = config.listen.rpartition(":")
    try:
        deadline = time.monotonic() + 10
        while True:  # bounded: nginx binds within milliseconds, or exits with its reason
            if process.poll() is not None:
                raise AssertionError(f"nginx exited: {process.stderr.read() if process.stderr else ''}")
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield config.listen
    finally:
        process.terminate()
        process.wait(timeout=10)


def _upstreams(access_log: Path) -> list[str]:
    return re.findall(r"upstream=(\S+(?:, \S+)*) upstream_status", access_log.read_text())


@needs_nginx
def test_nginx_spreads_load_over_replicas_and_survives_one_being_killed(tmp_path: Path) -> None:
    with _replicas(tmp_path, 2) as (first, second):
        lb = GrpcLoadBalancer(
            backends=(first.address, second.address),
            listen=f"127.0.0.1:{_free_port()}",
            runtime_dir=tmp_path,
            error_log=str(tmp_path / "error.log"),
            access_log=str(tmp_path / "access.log"),
            master_process=False,
            worker_processes="1",
        )
        with _nginx(lb, tmp_path) as url:
            # 1. Both replicas answer through nginx.
            warm = run_load(LoadConfig(url=url, model="sklearn", cnum=4, loop=25, warmup=1))
            assert (warm.succeeded, warm.failed) == (100, 0)
            before = first.served(), second.served()
            assert before[0] > 0
            assert before[1] > 0
            assert sum(before) == 4 * (25 + 1)
            assert {first.address, second.address} <= set(_upstreams(tmp_path / "access.log"))

            # 2. SIGKILL one replica after 100 of 400 responses: nothing may be lost.
            def kill_first_replica(finished: int) -> None:
                if finished == 100:
                    first.process.send_signal(signal.SIGKILL)

            report = run_load(
                LoadConfig(
                    url=url, model="sklearn", cnum=4, loop=100, warmup=0, retries=2, on_response=kill_first_replica
                )
            )
            assert first.process.wait(timeout=10) == -signal.SIGKILL
            assert (report.requests, report.succeeded, report.failed) == (400, 400, 0), report.first_error
            assert report.errors == {}
            assert second.served() - before[1] >= 300  # everything after the kill, at least
            # The requests in flight on the killed replica had been streamed to it: nginx cannot
            # replay them and answers 502, which gRPC reads as UNAVAILABLE; the client retried each.
            log = (tmp_path / "access.log").read_text()
            assert report.retried == log.count('" 502 ')
            assert report.retried <= 4  # at most the cnum requests in flight


@needs_nginx
def test_tls_from_the_client_to_nginx_and_from_nginx_to_the_replicas(tmp_path: Path) -> None:
    certs = issue_oneway("localhost", tmp_path / "pki", now=datetime.now(UTC))
    with _replicas(tmp_path, 2, tls=certs) as (first, second):
        lb = GrpcLoadBalancer(
            backends=(first.address, second.address),
            listen=f"127.0.0.1:{_free_port()}",
            runtime_dir=tmp_path,
            error_log=str(tmp_path / "error.log"),
            access_log=str(tmp_path / "access.log"),
            master_process=False,
            worker_processes="1",
            tls_cert=certs.server_cert,
            tls_key=certs.server_key,
            backend_tls=True,
            backend_ca=certs.ca_cert,  # nginx verifies each replica's certificate
            backend_server_name="localhost",
        )
        with _nginx(lb, tmp_path) as url:
            report = run_load(LoadConfig(url=url, model="sklearn", cnum=4, loop=10, crt=certs.ca_cert))
            with pytest.raises(ConfigError, match="UNAVAILABLE"):  # plaintext to a TLS listener
                run_load(LoadConfig(url=url, model="sklearn", cnum=1, loop=1, timeout=5))
        assert (report.succeeded, report.failed) == (40, 0)
        trust = ssl.create_default_context(cafile=str(certs.ca_cert))
        assert first.served(verify=trust) > 0
        assert second.served(verify=trust) > 0
