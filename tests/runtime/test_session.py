"""A job reads its released keys from the inherited pipe and decrypts with them only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from enclaveml.crypto import encrypt_file
from enclaveml.errors import ConfigError, KeyNotFound
from enclaveml.runtime.session import SESSION_FD_ENV, ReleasedKey, Session, encode_bundle

V1 = ReleasedKey("customers", "k-00000000000000aa", 1, bytes(range(32)))
V2 = ReleasedKey("customers", "k-00000000000000aa", 2, bytes(range(32, 64)))

JOB = """
import sys, enclaveml.runtime.session as s
with s.session() as session:
    session.decrypt_file(sys.argv[1], sys.argv[2], context={"tenant": "acme"})
    print(session.key_names(), repr(session))
import os; print("fd env left:", s.SESSION_FD_ENV in os.environ)
"""


def run_job(tmp_path: Path, bundle: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    env = {**os.environ, SESSION_FD_ENV: str(read_end)}
    child = subprocess.Popen(
        [sys.executable, "-c", JOB, *args],
        pass_fds=(read_end,),
        env=env,
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    os.close(read_end)
    with os.fdopen(write_end, "wb") as pipe:
        pipe.write(bundle)
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_job_decrypts_with_released_keys(tmp_path: Path) -> None:
    owner = Session("broker", [V1, V2], {})
    (tmp_path / "data.csv").write_bytes(b"name,salary\nann,100\n")
    encrypt_file(tmp_path / "data.csv", tmp_path / "data.csv.eml", owner, "customers", context={"tenant": "acme"})
    done = run_job(tmp_path, encode_bundle("broker", [V1, V2], {"tee": "sim"}), "data.csv.eml", "out.csv")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.csv").read_bytes() == b"name,salary\nann,100\n"
    assert "['customers']" in done.stdout
    assert "fd env left: False" in done.stdout
    assert V2.material.hex() not in done.stdout + done.stderr


def test_a_key_version_not_released_is_refused(tmp_path: Path) -> None:
    owner = Session("broker", [V1, V2], {})
    (tmp_path / "d").write_bytes(b"x")
    encrypt_file(tmp_path / "d", tmp_path / "d.eml", owner, "customers", context={"tenant": "acme"})  # wrapped by v2
    job = Session("broker", [V1], {})
    with pytest.raises(KeyNotFound, match="version 2 was not released"):
        job.decrypt_file(tmp_path / "d.eml", tmp_path / "out", context={"tenant": "acme"})
    assert not (tmp_path / "out").exists()


def test_keys_never_show_in_repr() -> None:
    assert V1.material.hex() not in repr(V1)
    assert "material" not in repr(Session("broker", [V1], {}))


def test_without_enclaveml_run_there_is_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    import enclaveml.runtime.session as module

    monkeypatch.delenv(SESSION_FD_ENV, raising=False)
    monkeypatch.setattr(module, "_current", None)
    with pytest.raises(ConfigError, match="not started by `enclaveml run`"):
        module.session()


def test_malformed_bundle() -> None:
    with pytest.raises(ConfigError, match="malformed"):
        Session.from_bundle(b'{"keys": [{"name": 1}]}')
