"""The `enclaveml` command as a user runs it: real subprocesses, real files, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from enclaveml.cli.main import cli

ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
PASSPHRASE = "cli test passphrase 7f3a"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environment = {
        **os.environ,
        "ENCLAVEML_HOME": str(tmp_path / "home"),
        "ENCLAVEML_PASSPHRASE": PASSPHRASE,
        "COLUMNS": "200",
    }
    run(environment, tmp_path, "kms", "init", "--scrypt-log-n", "12")
    run(environment, tmp_path, "kms", "create-key", "customers")
    return environment


def run(
    env: dict[str, str], cwd: Path, *args: str, expect: int = 0, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([ENCLAVEML, *args], env=env, cwd=cwd, input=stdin, capture_output=True, check=False)
    assert done.returncode == expect, (done.returncode, done.stderr.decode())
    return done


def error_line(done: subprocess.CompletedProcess[bytes]) -> str:
    text = done.stderr.decode()
    lines = text.strip().splitlines()
    assert len(lines) == 1, text  # one line a person can act on
    assert "Traceback" not in text
    assert PASSPHRASE not in text
    assert lines[0].startswith("error: ")
    return lines[0]


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


@pytest.mark.parametrize("command", all_commands(cli), ids=" ".join)
def test_every_command_has_help_with_an_example(command: tuple[str, ...]) -> None:
    done = subprocess.run([ENCLAVEML, *command, "--help"], capture_output=True, text=True, check=True)
    assert "Example:" in done.stdout
    assert "enclaveml " in done.stdout.split("Example:")[1]


def test_version() -> None:
    done = subprocess.run([ENCLAVEML, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("enclaveml, version ")


def test_the_quickstart_flow(env: dict[str, str], tmp_path: Path) -> None:
    run(env, tmp_path, "datagen", "people", "--rows", "5000", "-o", "people.csv")
    run(env, tmp_path, "encrypt", "people.csv", "people.csv.eml", "--key", "customers", "--context", "tenant=acme")
    shown = run(env, tmp_path, "inspect", "people.csv.eml").stdout.decode()
    assert "key_version     1" in shown
    assert "tenant=acme" in shown
    run(env, tmp_path, "decrypt", "people.csv.eml", "out.csv", "--context", "tenant=acme")
    assert (tmp_path / "out.csv").read_bytes() == (tmp_path / "people.csv").read_bytes()
    run(env, tmp_path, "kms", "rotate", "customers")
    rewrapped = run(env, tmp_path, "rewrap", "people.csv.eml", "--key", "customers").stdout.decode()
    assert "v1 -> v2" in rewrapped
    assert "key_version     2" in run(env, tmp_path, "inspect", "people.csv.eml").stdout.decode()
    run(env, tmp_path, "decrypt", "people.csv.eml", "again.csv", "--context", "tenant=acme")
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "people.csv").read_bytes()


def test_inspect_never_shows_a_secret(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_bytes(b"top secret plaintext")
    run(env, tmp_path, "encrypt", "s.txt", "--key", "customers")
    shown = run(env, tmp_path, "inspect", "s.txt.eml", "--json").stdout.decode()
    assert "top secret" not in shown
    assert PASSPHRASE not in shown
    blob = (tmp_path / "s.txt.eml").read_bytes()
    wrapped = blob[-(20 + 16 + 60) : -(20 + 16)]
    assert wrapped.hex() not in shown


def test_tampered_file_exits_4_and_leaves_no_output(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(os.urandom(600_000))
    run(env, tmp_path, "encrypt", "d.bin", "d.eml", "--key", "customers", "--segment-size", "64KiB")
    blob = bytearray((tmp_path / "d.eml").read_bytes())
    blob[-100] ^= 0x40  # the last segment: earlier segments verify first
    (tmp_path / "d.eml").write_bytes(bytes(blob))
    line = error_line(run(env, tmp_path, "decrypt", "d.eml", "out.bin", expect=4))
    assert "failed authentication" in line
    assert not (tmp_path / "out.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.eml", "home"]


def test_truncated_file_exits_4(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(os.urandom(3000))
    run(env, tmp_path, "encrypt", "d.bin", "d.eml", "--key", "customers", "--segment-size", "1KiB")
    (tmp_path / "d.eml").write_bytes((tmp_path / "d.eml").read_bytes()[: -(952 + 16)])
    error_line(run(env, tmp_path, "decrypt", "d.eml", "out.bin", expect=4))
    assert not (tmp_path / "out.bin").exists()


def test_wrong_context_exits_4(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(b"rows")
    run(env, tmp_path, "encrypt", "d.bin", "--key", "customers", "--context", "tenant=acme")
    line = error_line(run(env, tmp_path, "decrypt", "d.bin.eml", "o.bin", "--context", "tenant=globex", expect=4))
    assert "encryption context does not match" in line
    assert "acme" not in line


def test_wrong_passphrase_exits_5(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(b"rows")
    run(env, tmp_path, "encrypt", "d.bin", "--key", "customers")
    wrong = {**env, "ENCLAVEML_PASSPHRASE": "not the passphrase"}
    line = error_line(run(wrong, tmp_path, "decrypt", "d.bin.eml", "o.bin", expect=5))
    assert "wrong passphrase" in line
    assert "not the passphrase" not in line
    assert not (tmp_path / "o.bin").exists()


def test_corrupted_key_store_exits_5(env: dict[str, str], tmp_path: Path) -> None:
    store = tmp_path / "home" / "keystore.json"
    store.write_text(store.read_text().replace('"sealed": "', '"sealed": "AAAA'))
    assert "integrity check" in error_line(run(env, tmp_path, "kms", "list", expect=5))


def test_unknown_key_exits_5(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(b"rows")
    line = error_line(run(env, tmp_path, "encrypt", "d.bin", "--key", "nope", expect=5))
    assert "nope" in line
    assert not (tmp_path / "d.bin.eml").exists()


def test_destroyed_version_exits_5(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "d.bin").write_bytes(b"rows")
    run(env, tmp_path, "encrypt", "d.bin", "--key", "customers")
    run(env, tmp_path, "kms", "rotate", "customers")
    error_line(run(env, tmp_path, "kms", "destroy-version", "customers", "1", expect=2))  # needs --yes
    run(env, tmp_path, "kms", "destroy-version", "customers", "1", "--yes")
    assert "destroyed" in error_line(run(env, tmp_path, "decrypt", "d.bin.eml", "o.bin", expect=5))


def test_missing_store_and_bad_usage_exit_2(tmp_path: Path) -> None:
    bare = {**os.environ, "ENCLAVEML_HOME": str(tmp_path / "none"), "ENCLAVEML_PASSPHRASE": "x"}
    (tmp_path / "d.bin").write_bytes(b"rows")
    assert "kms init" in error_line(run(bare, tmp_path, "encrypt", "d.bin", "--key", "k", expect=2))
    assert "--key" in error_line(run(bare, tmp_path, "encrypt", "d.bin", expect=2))
    assert "does not exist" in error_line(run(bare, tmp_path, "inspect", "missing.eml", expect=2))
    assert "KEY=VALUE" in error_line(run(bare, tmp_path, "encrypt", "d.bin", "-k", "k", "--context", "x", expect=2))


def test_missing_input_file_exits_2(env: dict[str, str], tmp_path: Path) -> None:
    line = error_line(run(env, tmp_path, "decrypt", "missing.eml", "out.csv", expect=2))
    assert "No such file or directory: missing.eml" in line
    assert not (tmp_path / "out.csv").exists()


def test_no_passphrase_without_a_terminal_exits_2(env: dict[str, str], tmp_path: Path) -> None:
    no_pass = {k: v for k, v in env.items() if k != "ENCLAVEML_PASSPHRASE"}
    assert "ENCLAVEML_PASSPHRASE" in error_line(run(no_pass, tmp_path, "kms", "list", expect=2))


def test_not_an_eml_file_exits_4(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "plain.csv.eml").write_bytes(b"name,age\n" * 100)
    assert "not an EML file" in error_line(run(env, tmp_path, "decrypt", "plain.csv.eml", expect=4))
    assert not (tmp_path / "plain.csv").exists()


def test_debug_shows_the_traceback(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "x.eml").write_bytes(b"garbage" * 10)
    done = run(env, tmp_path, "--debug", "decrypt", "x.eml", "x.out", expect=4)
    assert "Traceback" in done.stderr.decode()


def test_stdin_to_stdout_round_trip(env: dict[str, str], tmp_path: Path) -> None:
    data = os.urandom(700_000)
    sealed = run(env, tmp_path, "encrypt", "-", "-", "--key", "customers", stdin=data).stdout
    assert sealed[:4] == b"\x89EML"
    assert run(env, tmp_path, "decrypt", "-", "-", stdin=sealed).stdout == data


def test_tampered_stream_to_stdout_exits_4_and_says_output_is_unauthenticated(
    env: dict[str, str], tmp_path: Path
) -> None:
    sealed = bytearray(run(env, tmp_path, "encrypt", "-", "-", "--key", "customers", stdin=os.urandom(600_000)).stdout)
    sealed[-50] ^= 1
    done = run(env, tmp_path, "decrypt", "-", "-", stdin=bytes(sealed), expect=4)
    assert "unauthenticated" in error_line(done)


def test_directories_recursively(env: dict[str, str], tmp_path: Path) -> None:
    src = tmp_path / "data"
    (src / "a" / "b").mkdir(parents=True)
    files = {"top.csv": b"1,2\n", "a/mid.json": b"{}", "a/b/deep.bin": os.urandom(300_000)}
    for name, content in files.items():
        (src / name).write_bytes(content)
    run(env, tmp_path, "encrypt", "data", "enc", "--key", "customers")
    assert sorted(str(p.relative_to(tmp_path / "enc")) for p in (tmp_path / "enc").rglob("*.eml")) == sorted(
        f"{name}.eml" for name in files
    )
    run(env, tmp_path, "decrypt", "enc", "plain")
    for name, content in files.items():
        assert (tmp_path / "plain" / name).read_bytes() == content


def test_datagen_is_deterministic(tmp_path: Path) -> None:
    outputs = [
        subprocess.run(
            [ENCLAVEML, "datagen", "people", "--rows", "2000", "--seed", "7"], capture_output=True, check=True
        )
        for _ in range(2)
    ]
    assert outputs[0].stdout == outputs[1].stdout
    assert outputs[0].stdout.startswith(b"name,age,job,city,salary\n")
    assert outputs[0].stdout.count(b"\n") == 2001
