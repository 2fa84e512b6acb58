"""`enclaveml enclave ...` as a builder runs it: real subprocesses, real files, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclaveml.cli.enclave_cmds import enclave

ENCLAVEML = [str(Path(sys.executable).with_name("enclaveml"))]
MR_ENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


def run(cwd: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*ENCLAVEML, "enclave", *args], cwd=cwd, capture_output=True, text=True, check=False, env=_env()
    )
    assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
    return done


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200"}


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def mrsigner_by_spec(pem: bytes) -> str:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return hashlib.sha256(key.public_key().public_numbers().n.to_bytes(384, "little")).hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build directory holding enclave-key.pem, made once by `enclave keygen`."""
    directory = tmp_path_factory.mktemp("build")
    run(directory, "keygen", "-o", "enclave-key.pem")
    return directory


@pytest.fixture(scope="module")
def app_sig(workdir: Path) -> Path:
    run(
        workdir, "sign", "--key", "enclave-key.pem", "--mr-enclave", MR_ENCLAVE,
        "--isv-prod-id", "7", "--isv-svn", "3", "--date", "20250619", "-o", "app.sig",
    )  # fmt: skip
    return workdir / "app.sig"


@pytest.mark.parametrize("command", ["", *enclave.commands], ids=lambda name: name or "enclave")
def test_every_command_has_help_with_an_example(command: str, tmp_path: Path) -> None:
    shown = run(tmp_path, *command.split(), "--help").stdout
    assert "Example:" in shown
    assert "enclaveml enclave " in shown.split("Example:")[1]


def test_keygen_writes_a_private_key_only_its_owner_can_read(workdir: Path) -> None:
    key_file = workdir / "enclave-key.pem"
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert isinstance(key, rsa.RSAPrivateKey)
    assert (key.key_size, key.public_key().public_numbers().e) == (3072, 3)


def test_keygen_prints_the_mrsigner_and_refuses_to_overwrite(tmp_path: Path) -> None:
    printed = run(tmp_path, "keygen", "-o", "k.pem").stdout
    before = (tmp_path / "k.pem").read_bytes()
    assert printed.split() == ["mr_signer", mrsigner_by_spec(before)]

    line = error_line(run(tmp_path, "keygen", "-o", "k.pem", expect=2))

    assert "already exists" in line
    assert (tmp_path / "k.pem").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]


def test_mrsigner_of_the_private_and_the_public_key_agree(workdir: Path) -> None:
    pem = (workdir / "enclave-key.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (workdir / "enclave-pub.pem").write_bytes(public_pem)

    from_private = run(workdir, "mrsigner", "enclave-key.pem").stdout.strip()
    from_public = run(workdir, "mrsigner", "enclave-pub.pem").stdout.strip()

    assert from_private == from_public == mrsigner_by_spec(pem)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mrsigner_accepts_a_key_from_openssl(tmp_path: Path) -> None:
    subprocess.run(["openssl", "genrsa", "-3", "-out", "k.pem", "3072"], cwd=tmp_path, check=True, capture_output=True)
    assert run(tmp_path, "mrsigner", "k.pem").stdout.strip() == mrsigner_by_spec((tmp_path / "k.pem").read_bytes())


def test_sign_prints_the_measurements_to_register(workdir: Path, app_sig: Path) -> None:
    printed = run(
        workdir, "sign", "--key", "enclave-key.pem", "--mr-enclave", MR_ENCLAVE,
        "--isv-prod-id", "7", "--isv-svn", "3", "--date", "20250619", "-o", "again.sig",
    ).stdout.split()  # fmt: skip
    mr_signer = mrsigner_by_spec((workdir / "enclave-key.pem").read_bytes())

    assert printed == ["mr_enclave", MR_ENCLAVE, "mr_signer", mr_signer]
    assert app_sig.stat().st_size == 1808
    # PKCS#1 v1.5 is deterministic: the same inputs sign to the same bytes
    assert (workdir / "again.sig").read_bytes() == app_sig.read_bytes()


def test_sig_info_shows_and_checks_a_signed_enclave(workdir: Path, app_sig: Path) -> None:
    shown = json.loads(run(workdir, "sig-info", "app.sig", "--json").stdout)

    assert shown["mr_enclave"] == MR_ENCLAVE
    assert shown["mr_signer"] == mrsigner_by_spec((workdir / "enclave-key.pem").read_bytes())
    assert (shown["isv_prod_id"], shown["isv_svn"]) == (7, 3)
    assert shown["attribute_flags"] == ["MODE64BIT"]
    assert shown["debug"] is False
    assert shown["date"] == "2025-06-19"
    assert shown["signature_valid"] is True
    assert shown["failure"] is None
    text = run(workdir, "sig-info", "app.sig").stdout
    assert f"mr_enclave       {MR_ENCLAVE}" in text
    assert "debug            no" in text
    assert "signature_valid  yes" in text


def test_sign_debug_sets_the_debug_flag(workdir: Path) -> None:
    run(
        workdir, "sign", "--key", "enclave-key.pem", "--mr-enclave", MR_ENCLAVE, "--isv-prod-id", "1",
        "--isv-svn", "1", "--debug", "--attributes", "04000000000000000700000000000000", "-o", "debug.sig",
    )  # fmt: skip
    shown = json.loads(run(workdir, "sig-info", "debug.sig", "--json").stdout)

    assert shown["attribute_flags"] == ["DEBUG", "MODE64BIT"]
    assert shown["xfrm"] == "0x7"
    assert shown["debug"] is True


def test_a_tampered_sig_file_shows_its_fields_and_exits_3(workdir: Path, app_sig: Path) -> None:
    tampered = bytearray(app_sig.read_bytes())
    tampered[1026] ^= 0x01  # ISVSVN 3 -> 2: a rollback attempt
    (workdir / "tampered.sig").write_bytes(bytes(tampered))

    done = run(workdir, "sig-info", "tampered.sig", expect=3)

    assert "isv_svn          2" in done.stdout
    assert "signature_valid  NO" in done.stdout
    assert "sigstruct_signature_invalid" in done.stdout
    assert "tampered.sig: SIGSTRUCT signature does not verify" in error_line(done)
    shown = json.loads(run(workdir, "sig-info", "tampered.sig", "--json", expect=3).stdout)
    assert shown["failure"]["reason"] == "sigstruct_signature_invalid"


def test_changed_q1_exits_3(workdir: Path, app_sig: Path) -> None:
    tampered = bytearray(app_sig.read_bytes())
    tampered[1100] ^= 0x80
    (workdir / "q1.sig").write_bytes(bytes(tampered))

    assert "Q1/Q2 do not match" in error_line(run(workdir, "sig-info", "q1.sig", expect=3))


def test_a_truncated_sig_file_exits_3(workdir: Path, app_sig: Path) -> None:
    (workdir / "short.sig").write_bytes(app_sig.read_bytes()[:1000])

    line = error_line(run(workdir, "sig-info", "short.sig", expect=3))

    assert "short.sig: SIGSTRUCT is 1000 bytes, expected 1808" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--key", "enclave-pub.pem"), "signing needs the private key"),
        (("--key", "missing.pem"), "No such file"),
        (("--key", "weak.pem"), "RSA-2048 with e=65537"),
        (("--key", "enclave-key.pem", "--mr-enclave", "abc"), "not hex"),
        (("--key", "enclave-key.pem", "--mr-enclave", "00" * 31), "needs 32 bytes"),
        (("--key", "enclave-key.pem", "--isv-svn", "70000"), "70000"),
        (("--key", "enclave-key.pem", "--date", "2025-06-19"), "YYYYMMDD|%Y%m%d"),
    ],
    ids=["public-key", "missing-key", "weak-key", "bad-hex", "short-mr-enclave", "svn-too-big", "bad-date"],
)
def test_sign_refuses_bad_input_with_exit_2(workdir: Path, args: tuple[str, ...], message: str) -> None:
    weak = rsa.generate_private_key(65537, 2048)
    (workdir / "weak.pem").write_bytes(
        weak.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key = serialization.load_pem_private_key((workdir / "enclave-key.pem").read_bytes(), password=None)
    (workdir / "enclave-pub.pem").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    defaults = {"--mr-enclave": MR_ENCLAVE, "--isv-prod-id": "1", "--isv-svn": "1"}
    given = dict(zip(args[::2], args[1::2], strict=True))
    options = [item for name, value in {**defaults, **given}.items() for item in (name, value)]

    line = error_line(run(workdir, "sign", *options, "-o", "refused.sig", expect=2))

    assert any(part in line for part in message.split("|")), line
    assert not (workdir / "refused.sig").exists()
