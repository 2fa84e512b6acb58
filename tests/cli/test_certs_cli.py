"""`enclaveml certs ...` as an operator runs it: files, modes, refusals, and certificates that work."""

from __future__ import annotations

import stat
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from enclaveml.cli.certs_cmds import certs
from enclaveml.errors import ConfigError
from enclaveml.serving.tls import ServerTls, channel_credentials, grpc_server_credentials

ENCLAVEML = [str(Path(sys.executable).with_name("enclaveml"))]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(certs, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_oneway_writes_the_files_with_mode_0600(tmp_path: Path) -> None:
    out = invoke("oneway", "--cn", "serving.example.com", "-o", str(tmp_path / "certs"))

    names = ["ca.crt", "ca.key", "server.crt", "server.key", "ssl.cfg"]
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == names
    for name in names:
        assert stat.S_IMODE((tmp_path / "certs" / name).stat().st_mode) == 0o600
        assert f"  {name}" in out
    assert "one-way TLS" in out
    assert "-----BEGIN" not in out


def test_twoway_adds_the_client_files(tmp_path: Path) -> None:
    invoke("twoway", "--cn", "serving.example.com", "--client-cn", "analyst", "--key-type", "rsa", "-o", str(tmp_path))

    assert {p.name for p in tmp_path.iterdir()} >= {"client.crt", "client.key"}
    assert stat.S_IMODE((tmp_path / "client.key").stat().st_mode) == 0o600
    assert ServerTls.from_ssl_config(tmp_path / "ssl.cfg").mutual


def test_the_files_it_writes_secure_a_real_grpc_call(tmp_path: Path) -> None:
    invoke("twoway", "--cn", "serving.example.com", "--san", "IP:10.0.0.5", "-o", str(tmp_path))

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"echo:" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),)
    )
    port = server.add_secure_port(
        "127.0.0.1:0", grpc_server_credentials(ServerTls.from_ssl_config(tmp_path / "ssl.cfg"))
    )
    server.start()
    try:
        files = {name: (tmp_path / name).read_bytes() for name in ("ca.crt", "client.crt", "client.key")}
        credentials = channel_credentials(ca=files["ca.crt"], crt=files["client.crt"], key=files["client.key"])
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            assert channel.unary_unary("/test.Echo/Echo")(b"hi", timeout=5) == b"echo:hi"
        no_client_cert = channel_credentials(ca=files["ca.crt"], crt=None, key=None)
        with grpc.secure_channel(f"127.0.0.1:{port}", no_client_cert) as channel, pytest.raises(grpc.RpcError):
            channel.unary_unary("/test.Echo/Echo")(b"hi", timeout=5)
    finally:
        server.stop(grace=None)


def test_existing_files_are_refused_without_force(tmp_path: Path) -> None:
    invoke("oneway", "--cn", "serving.example.com", "-o", str(tmp_path))
    ca_before = (tmp_path / "ca.crt").read_bytes()

    with pytest.raises(ConfigError, match="already exist"):
        CliRunner().invoke(
            certs, ["oneway", "--cn", "serving.example.com", "-o", str(tmp_path)], catch_exceptions=False
        )
    assert (tmp_path / "ca.crt").read_bytes() == ca_before

    invoke("oneway", "--cn", "serving.example.com", "-o", str(tmp_path), "--force")
    assert (tmp_path / "ca.crt").read_bytes() != ca_before


def test_a_refusal_is_one_error_line_and_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "ca.key").write_bytes(b"precious")
    done = subprocess.run(
        [*ENCLAVEML, "certs", "oneway", "--cn", "serving.example.com", "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "ca.key already exist" in lines[0]
    assert "--force" in lines[0]
    assert (tmp_path / "ca.key").read_bytes() == b"precious"


def test_a_bad_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not an IP address"):
        CliRunner().invoke(
            certs,
            ["oneway", "--cn", "serving.example.com", "--san", "IP:nope", "-o", str(tmp_path)],
            catch_exceptions=False,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [[], ["oneway"], ["twoway"]], ids=["certs", "oneway", "twoway"])
def test_help_has_an_example(command: list[str]) -> None:
    result = CliRunner().invoke(certs, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "enclaveml certs " in result.output.split("Example:")[1]
