"""`enclaveml model ...` as an owner runs it: seal a model, look at it, get it back, get refused.

Until the group is registered in cli/main.py, each test adds it to the real root command
for the duration of the test (``monkeypatch.setitem``) and runs the real ``main()`` with
its error mapping; one test runs the same in a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enclaveml.cli.main import main
from enclaveml.crypto.gramine_pf import KEY_SIZE, pf_version, read_pf_file
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms

PASSPHRASE = "model cli test passphrase"
VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "gramine_pf"
BIG_PATH = "models/resnet50-v15-fp32/1/saved_model.pb"
BIG_SHA256 = "2fd0c31c7630358876e966b8bdc21802612f62083eea19ff9b2090bcc66a9f90"
ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))


def tiny_onnx() -> bytes:
    """y = x + [1, 2]: one input, one output, checked by onnx."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor("bias", TensorProto.FLOAT, [2], [1.0, 2.0])],
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(built)
    return built.SerializeToString()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENCLAVEML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ENCLAVEML_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("ENCLAVEML_KMS", raising=False)
    store = LocalKms.init(
        tmp_path / "home" / "keystore.json", PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC)
    )
    store.create_key("models")
    (tmp_path / "tiny.onnx").write_bytes(tiny_onnx())
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *args: str, expect: int = 0) -> tuple[str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == expect, err
    return out, err


def fails(capsys: pytest.CaptureFixture[str], *args: str, expect: int) -> str:
    """The one error line of a failing command."""
    _, err = run(capsys, *args, expect=expect)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["", "encrypt", "wrap-key", "inspect", "decrypt"])
def test_every_model_command_has_help_with_an_example(
    workdir: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out, _ = run(capsys, "model", *command.split(), "--help")
    assert "Example:" in out
    assert "enclaveml model " in out.split("Example:")[1]


# -- Gramine protected files ------------------------------------------------------------


def test_a_wrap_key_is_made_once_and_kept_private(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "model", "wrap-key", "-o", "wrap.key")
    key = (workdir / "wrap.key").read_bytes()
    assert len(key) == KEY_SIZE
    assert stat.S_IMODE((workdir / "wrap.key").stat().st_mode) == 0o600
    assert "wrap.key already exists" in fails(capsys, "model", "wrap-key", "-o", "wrap.key", expect=2)
    assert (workdir / "wrap.key").read_bytes() == key


def test_seal_for_gramine_print_the_manifest_line_and_get_it_back(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "saved_model.pb").write_bytes(os.urandom(500_000))
    run(capsys, "model", "wrap-key", "-o", "wrap.key")
    out, err = run(
        capsys, "model", "encrypt", "saved_model.pb", "-o", "./models/resnet/1/saved_model.pb",
        "--format", "gramine-pf", "--wrap-key", "wrap.key", "--pf-version", "1",
    )  # fmt: skip
    assert "Gramine protected file v1, bound to path 'models/resnet/1/saved_model.pb'" in err
    assert out.strip() == (
        '{ path = "/models/resnet/1/saved_model.pb", uri = "file:models/resnet/1/saved_model.pb", type = "encrypted" }'
    )
    sealed = workdir / "models/resnet/1/saved_model.pb"
    assert pf_version(sealed.read_bytes()) == 1
    key = (workdir / "wrap.key").read_bytes()
    assert read_pf_file(sealed, key, "models/resnet/1/saved_model.pb") == (workdir / "saved_model.pb").read_bytes()
    run(capsys, "model", "decrypt", "models/resnet/1/saved_model.pb", "-o", "back.pb", "--wrap-key", "wrap.key")
    assert (workdir / "back.pb").read_bytes() == (workdir / "saved_model.pb").read_bytes()
    assert stat.S_IMODE((workdir / "back.pb").stat().st_mode) == 0o600


def test_the_wrap_key_derived_from_a_kms_key_seals_a_protected_file(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "saved_model.pb").write_bytes(os.urandom(10_000))
    out, _ = run(capsys, "kms", "gramine-pf-key", "models", "-o", "wrap.key")
    assert "16 bytes, mode 0600" in out
    key = (workdir / "wrap.key").read_bytes()
    assert key == LocalKms(workdir / "home" / "keystore.json", PASSPHRASE).gramine_pf_key("models")
    assert stat.S_IMODE((workdir / "wrap.key").stat().st_mode) == 0o600
    run(capsys, "model", "encrypt", "saved_model.pb", "-o", "m.pb", "--format", "gramine-pf", "--wrap-key", "wrap.key")
    assert read_pf_file(workdir / "m.pb", key, "m.pb") == (workdir / "saved_model.pb").read_bytes()
    assert "already exists" in fails(capsys, "kms", "gramine-pf-key", "models", "-o", "wrap.key", expect=2)
    assert "no key 'nope'" in fails(capsys, "kms", "gramine-pf-key", "nope", "-o", "other.key", expect=5)
    assert not (workdir / "other.key").exists()


def test_an_explicit_pf_path_is_bound_and_a_wrong_one_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "ssl.cfg.plain").write_text("client_verify: false\n")
    run(capsys, "model", "wrap-key", "-o", "wrap.key")
    out, _ = run(
        capsys, "model", "encrypt", "ssl.cfg.plain", "-o", "sealed/ssl.cfg", "--format", "gramine-pf",
        "--wrap-key", "wrap.key", "--pf-path", "ssl.cfg",
    )  # fmt: skip
    assert 'uri = "file:ssl.cfg"' in out
    line = fails(
        capsys, "model", "decrypt", "sealed/ssl.cfg", "-o", "out.cfg", "--wrap-key", "wrap.key", expect=4
    )  # the default is the file's own path, sealed/ssl.cfg
    assert "bound to a different path than 'sealed/ssl.cfg'" in line
    assert not (workdir / "out.cfg").exists()
    run(capsys, "model", "decrypt", "sealed/ssl.cfg", "-o", "out.cfg", "--wrap-key", "wrap.key", "--pf-path", "ssl.cfg")
    assert (workdir / "out.cfg").read_text() == "client_verify: false\n"


def test_a_file_gramine_wrote_for_cczoo_is_inspected_and_decrypted(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shown, _ = run(capsys, "model", "inspect", str(VECTORS / "pf_v1_big.pf"))
    assert "gramine-pf v1" in shown
    assert "nodes           104" in shown
    assert "412673..416768 (exact size is encrypted)" in shown
    as_json = json.loads(run(capsys, "model", "inspect", str(VECTORS / "pf_v2_big.pf"), "--json")[0])
    assert (as_json["format"], as_json["readers"], as_json["pending_write"]) == (
        "gramine-pf v2",
        "Gramine >= 1.9",
        False,
    )
    kdk = str(VECTORS / "kdk_cczoo_wrap_key.bin")
    pb = str(VECTORS / "pf_v1_big.pf")
    run(capsys, "model", "decrypt", pb, "-o", "saved_model.pb", "--wrap-key", kdk, "--pf-path", BIG_PATH)
    assert hashlib.sha256((workdir / "saved_model.pb").read_bytes()).hexdigest() == BIG_SHA256


def test_a_tampered_protected_file_leaves_no_output(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray((VECTORS / "pf_v2_big.pf").read_bytes())
    data[50 * 4096 + 9] ^= 1
    (workdir / "tampered.pb").write_bytes(data)
    kdk = str(VECTORS / "kdk_cczoo_wrap_key.bin")
    line = fails(
        capsys, "model", "decrypt", "tampered.pb", "-o", "out.pb", "--wrap-key", kdk, "--pf-path", BIG_PATH, expect=4
    )
    assert "tampered.pb: node 50 of the Gramine protected file failed authentication" in line
    assert not (workdir / "out.pb").exists()


def test_a_wrap_key_of_the_wrong_size_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "wrap.hex").write_text("dda09c7c52359c9bc4e51982b97dd7fe\n")
    line = fails(
        capsys, "model", "encrypt", "tiny.onnx", "-o", "x.pb", "--format", "gramine-pf", "--wrap-key", "wrap.hex",
        expect=2,
    )  # fmt: skip
    assert "holds 33 bytes, not a 16-byte wrap key" in line
    assert "xxd -r -p" in line
    assert "dda09c7c" not in line
    assert not (workdir / "x.pb").exists()


# -- EML model files ---------------------------------------------------------------------


def test_seal_an_onnx_model_for_serving_inspect_it_and_get_it_back(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, err = run(capsys, "model", "encrypt", "tiny.onnx", "-o", "models/tiny/3/model.onnx.eml", "--key", "models")
    assert "model tiny version 3, key models, 1 inputs, 1 outputs" in err
    shown, _ = run(capsys, "model", "inspect", "models/tiny/3/model.onnx.eml")
    assert "format          eml" in shown
    assert "model_name      tiny" in shown
    assert "model_version   3" in shown
    assert "inputs          x FLOAT [-1, 2]" in shown
    assert "unauthenticated" in shown
    run(capsys, "model", "decrypt", "models/tiny/3/model.onnx.eml", "-o", "back.onnx", "--key-from-kms")
    assert (workdir / "back.onnx").read_bytes() == (workdir / "tiny.onnx").read_bytes()


def test_name_and_version_can_be_given_and_must_be_known(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, "model", "encrypt", "tiny.onnx", "-o", "tiny.eml", "--key", "models", expect=2)
    assert "cannot tell the model name and version from tiny.eml" in line
    assert "--name and --version" in line
    assert not (workdir / "tiny.eml").exists()
    run(
        capsys,
        "model",
        "encrypt",
        "tiny.onnx",
        "-o",
        "tiny.eml",
        "--key",
        "models",
        "--name",
        "adder",
        "--version",
        "7",
    )
    meta = json.loads(run(capsys, "model", "inspect", "tiny.eml", "--json")[0])
    assert (meta["model_name"], meta["model_version"], meta["kms"]) == ("adder", 7, "local")


def test_a_file_that_is_not_onnx_is_not_sealed_as_a_model(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "notes.txt").write_text("not a model")
    line = fails(capsys, "model", "encrypt", "notes.txt", "-o", "m/notes/1/x.eml", "--key", "models", expect=4)
    assert "not a valid ONNX model" in line
    assert not (workdir / "m").exists()


def test_a_tampered_model_file_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "model", "encrypt", "tiny.onnx", "-o", "models/tiny/1/model.onnx.eml", "--key", "models")
    sealed = workdir / "models/tiny/1/model.onnx.eml"
    data = bytearray(sealed.read_bytes())
    data[-3] ^= 1
    sealed.write_bytes(data)
    line = fails(capsys, "model", "decrypt", str(sealed), "-o", "back.onnx", "--key-from-kms", expect=4)
    assert "model.onnx.eml" in line
    assert not (workdir / "back.onnx").exists()


def test_options_of_the_other_format_are_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "model", "wrap-key", "-o", "wrap.key")
    run(capsys, "model", "encrypt", "tiny.onnx", "-o", "models/tiny/1/model.onnx.eml", "--key", "models")
    run(capsys, "model", "encrypt", "tiny.onnx", "-o", "tiny.pf", "--format", "gramine-pf", "--wrap-key", "wrap.key")
    eml, pf = "models/tiny/1/model.onnx.eml", "tiny.pf"
    cases = [
        (("encrypt", "tiny.onnx", "-o", "x", "--format", "gramine-pf"), "needs --wrap-key"),
        (("encrypt", "tiny.onnx", "-o", "x", "--format", "gramine-pf", "--wrap-key", "wrap.key", "--key", "models"),
         "--key, --name and --version are for --format eml"),
        (("encrypt", "tiny.onnx", "-o", "m/a/1/x"), "--format eml needs --key"),
        (("encrypt", "tiny.onnx", "-o", "m/a/1/x", "--key", "models", "--wrap-key", "wrap.key"),
         "--wrap-key and --pf-path are for --format gramine-pf"),
        (("decrypt", eml, "-o", "out"), "is an EML model file (decrypt it with --key-from-kms)"),
        (("decrypt", eml, "-o", "out", "--wrap-key", "wrap.key"), "is an EML model file"),
        (("decrypt", pf, "-o", "out", "--key-from-kms"), "is a Gramine protected file (decrypt it with --wrap-key"),
        (("decrypt", "tiny.onnx", "-o", "out", "--key-from-kms"), "neither an EML model file nor a Gramine"),
        (("inspect", "tiny.onnx"), "neither an EML model file nor a Gramine"),
    ]  # fmt: skip
    for args, message in cases:
        expect = 4 if "neither" in message else 2
        assert message in fails(capsys, "model", *args, expect=expect)
    assert not (workdir / "out").exists()
    assert not (workdir / "x").exists()
    assert not (workdir / "m").exists()


def test_the_commands_in_a_real_process(workdir: Path) -> None:
    def enclaveml(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([ENCLAVEML, *args], capture_output=True, text=True, check=False, cwd=workdir)
        assert done.returncode == expect, done.stderr
        return done

    enclaveml("model", "wrap-key", "-o", "wrap.key")
    sealed = enclaveml(
        "model", "encrypt", "tiny.onnx", "-o", "tiny.pf", "--format", "gramine-pf", "--wrap-key", "wrap.key"
    )
    assert 'uri = "file:tiny.pf"' in sealed.stdout
    refused = enclaveml("model", "decrypt", "tiny.pf", "-o", "o", "--wrap-key", "wrap.key", "--pf-path", "x", expect=4)
    assert refused.stderr.startswith("error: tiny.pf: the Gramine protected file is bound to a different path than 'x'")
