"""TensorFlow SavedModels as sealed models: packed whole, sealed, served from memory where TensorFlow is.

TensorFlow never enters this venv. Here: the archive (deterministic packing, every hostile
member refused), the header (read from ``saved_model.pb`` with the serving extra's protos),
the CLI, and a repository that says why it cannot serve a SavedModel without TensorFlow.
The SavedModels here are real ``SavedModel`` protobufs with a signature, written with those
protos (TensorFlow cannot run them, and nothing here tries).

In the TensorFlow venv (``.venv/tfclient``), ``tf_savedmodel_check.py`` builds a real model
with ``tf.Module``, seals and serves it through ``ModelRepository`` and ``TfSavedModel``, and
reports what it saw as one JSON line; one subprocess for the whole module.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

from enclaveml.analytics.ml import (
    SAVEDMODEL_FORMAT,
    ModelMetadata,
    TensorSpec,
    load_encrypted_model,
    read_model_metadata,
    save_encrypted_model,
)
from enclaveml.cli.main import main
from enclaveml.crypto import encrypt_bytes
from enclaveml.errors import ConfigError, FormatError
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.serving import runtime_tf
from enclaveml.serving.keys import LocalKeys
from enclaveml.serving.repository import ModelRepository, ModelState, publish_eml_model, publish_savedmodel
from enclaveml.serving.runtime_tf import (
    TF_MISSING,
    pack_savedmodel,
    savedmodel_members,
    savedmodel_signature,
    tensorflow_available,
)

REPO = Path(__file__).resolve().parents[2]
TF_PYTHON = REPO / ".venv" / "tfclient" / "bin" / "python"
SCRIPT = Path(__file__).with_name("tf_savedmodel_check.py")
KEY = "models"
PASSPHRASE = "savedmodel test passphrase"
ROWS = np.random.default_rng(3).standard_normal((5, 4), dtype=np.float32)


def signature_graph(signature: str = "serving_default") -> bytes:
    """A ``saved_model.pb`` with ``signature``: x float32 [?, 4] → scores float32 [?, 3], label int64 [?]."""
    model = saved_model_pb2.SavedModel(saved_model_schema_version=1)
    graph = model.meta_graphs.add()
    graph.meta_info_def.tags.append("serve")
    found = graph.signature_def[signature]
    found.method_name = "tensorflow/serving/predict"
    for tensors, key, dtype, dims in (
        (found.inputs, "x", types_pb2.DT_FLOAT, (-1, 4)),
        (found.outputs, "scores", types_pb2.DT_FLOAT, (-1, 3)),
        (found.outputs, "label", types_pb2.DT_INT64, (-1,)),
    ):
        tensors[key].name = f"{key}:0"
        tensors[key].dtype = dtype
        for size in dims:
            tensors[key].tensor_shape.dim.add(size=size)
    return model.SerializeToString()


@pytest.fixture
def savedmodel_dir(tmp_path: Path) -> Path:
    saved = tmp_path / "export"
    (saved / "variables").mkdir(parents=True)
    (saved / "assets").mkdir()
    (saved / "saved_model.pb").write_bytes(signature_graph())
    (saved / "variables" / "variables.index").write_bytes(b"\x00index")
    (saved / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(4096))
    (saved / "assets" / "vocab.txt").write_text("a\nb\n")
    return saved


# -- the archive ------------------------------------------------------------------------------


def test_a_savedmodel_directory_packs_to_the_same_bytes_every_time(savedmodel_dir: Path) -> None:
    first = pack_savedmodel(savedmodel_dir)
    os.utime(savedmodel_dir / "saved_model.pb", (1, 1))
    (savedmodel_dir / "assets" / "vocab.txt").chmod(0o600)

    assert pack_savedmodel(savedmodel_dir) == first
    members = savedmodel_members(first)
    assert list(members) == [
        "assets",
        "saved_model.pb",
        "variables",
        "assets/vocab.txt",
        "variables/variables.data-00000-of-00001",
        "variables/variables.index",
    ]
    assert members["variables"] is None
    assert members["saved_model.pb"] == (savedmodel_dir / "saved_model.pb").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar} == {(0, 0, 0, "", "")}


def test_only_a_plain_savedmodel_directory_is_packed(savedmodel_dir: Path) -> None:
    with pytest.raises(ConfigError, match="is not a SavedModel directory"):
        pack_savedmodel(savedmodel_dir / "variables")

    (savedmodel_dir / "assets" / "secrets").symlink_to("/etc/hostname")
    with pytest.raises(ConfigError, match="secrets: a link or special file in the SavedModel directory"):
        pack_savedmodel(savedmodel_dir)


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return out.getvalue()


def member(name: str, data: bytes | None = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[Any, Any]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, data if kind == tarfile.REGTYPE else None


GRAPH = member("saved_model.pb", b"graph")


@pytest.mark.parametrize(
    ("archive", "reason"),
    [
        pytest.param(tar_of(GRAPH, member("/etc/cron.d/job")), "'/etc/cron.d/job' has an absolute name", id="absolute"),
        pytest.param(tar_of(GRAPH, member("variables/../../escape")), "leaves the SavedModel directory", id="dot-dot"),
        pytest.param(
            tar_of(GRAPH, member("assets/x", kind=tarfile.SYMTYPE, link="/etc/shadow")),
            "'assets/x' is a symbolic link",
            id="symlink",
        ),
        pytest.param(
            tar_of(GRAPH, member("assets/y", kind=tarfile.LNKTYPE, link="saved_model.pb")),
            "'assets/y' is a hard link",
            id="hardlink",
        ),
        pytest.param(tar_of(GRAPH, member("dev", kind=tarfile.CHRTYPE)), "'dev' is a device", id="device"),
        pytest.param(tar_of(GRAPH, member("pipe", kind=tarfile.FIFOTYPE)), "'pipe' is a FIFO", id="fifo"),
        pytest.param(tar_of(GRAPH, member("./saved_model.pb", b"other")), "'saved_model.pb' appears twice", id="twice"),
        pytest.param(tar_of(member("variables", None, tarfile.DIRTYPE)), "no saved_model.pb at its top", id="no-graph"),
        pytest.param(gzip.compress(tar_of(GRAPH), mtime=0), "not a SavedModel archive", id="compressed"),
        pytest.param(signature_graph(), "not a SavedModel archive", id="not-a-tar"),
    ],
)
def test_a_hostile_or_malformed_archive_is_refused_naming_the_member(archive: bytes, reason: str) -> None:
    with pytest.raises(FormatError, match=reason):
        savedmodel_members(archive)


def test_an_archive_with_too_many_members_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_tf, "MAX_MEMBERS", 3)
    archive = tar_of(GRAPH, *(member(f"assets/{i}") for i in range(3)))

    with pytest.raises(FormatError, match="over 3 members"):
        savedmodel_members(archive)


# -- the header -------------------------------------------------------------------------------


def test_the_signature_is_read_from_the_graph_without_tensorflow(savedmodel_dir: Path) -> None:
    inputs, outputs = savedmodel_signature(pack_savedmodel(savedmodel_dir)) or ((), ())

    assert inputs == (TensorSpec("x", "FLOAT", (-1, 4)),)
    assert outputs == (TensorSpec("label", "INT64", (-1,)), TensorSpec("scores", "FLOAT", (-1, 3)))
    (savedmodel_dir / "saved_model.pb").write_bytes(signature_graph("predict"))
    with pytest.raises(ConfigError, match=r"no signature 'serving_default' \(signatures: predict\)"):
        savedmodel_signature(pack_savedmodel(savedmodel_dir))


def test_onnx_headers_stay_as_they_were_and_savedmodels_may_leave_the_tensors_out() -> None:
    tensors = (TensorSpec("x", "FLOAT", (-1, 4)),), (TensorSpec("y", "FLOAT", (-1, 3)),)
    onnx = ModelMetadata("iris", 2, *tensors)
    assert onnx.to_context() == {
        "format": "onnx",
        "model_name": "iris",
        "model_version": "2",
        "model_inputs": '[{"name":"x","type":"FLOAT","shape":[-1,4]}]',
        "model_outputs": '[{"name":"y","type":"FLOAT","shape":[-1,3]}]',
    }
    assert list(onnx.to_context()) == ["format", "model_name", "model_version", "model_inputs", "model_outputs"]

    unknown = ModelMetadata("tfm", 1, (), (), SAVEDMODEL_FORMAT)
    assert unknown.to_context() == {"format": "tf-savedmodel", "model_name": "tfm", "model_version": "1"}
    assert ModelMetadata.from_context(unknown.to_context()) == unknown
    assert not unknown.signature_known
    known = ModelMetadata("tfm", 1, *tensors, SAVEDMODEL_FORMAT)
    assert ModelMetadata.from_context(known.to_context()) == known
    with pytest.raises(FormatError, match="incomplete or malformed"):
        ModelMetadata.from_context({k: v for k, v in onnx.to_context().items() if k != "model_inputs"})


def test_onnx_only_callers_refuse_a_savedmodel_file(tmp_path: Path, local_kms: LocalKms) -> None:
    path = tmp_path / "model.savedmodel.eml"
    metadata = ModelMetadata("tfm", 1, (), (), SAVEDMODEL_FORMAT)
    path.write_bytes(encrypt_bytes(b"archive", local_kms, KEY, context=metadata.to_context()))

    with pytest.raises(FormatError, match="holds format 'tf-savedmodel', not onnx"):
        load_encrypted_model(path, local_kms)
    with pytest.raises(ConfigError, match="seals ONNX models, not 'tf-savedmodel'"):
        save_encrypted_model(b"", tmp_path / "x.eml", local_kms, KEY, metadata=metadata)


# -- serving without TensorFlow ---------------------------------------------------------------


@pytest.mark.skipif(tensorflow_available(), reason="TensorFlow is installed here")
def test_without_tensorflow_a_savedmodel_is_not_ready_and_says_why(
    tmp_path: Path, local_kms: LocalKms, savedmodel_dir: Path, sklearn_model_bytes: bytes
) -> None:
    models = tmp_path / "models"
    publish_savedmodel(models / "tfm", 1, savedmodel_dir, local_kms, KEY)
    publish_eml_model(models / "sklearn", 1, sklearn_model_bytes, local_kms, KEY)

    with ModelRepository({"tfm": models / "tfm", "sklearn": models / "sklearn"}, LocalKeys(local_kms)) as repo:
        assert repo.get("sklearn").model_format == "onnx"  # ONNX models beside it serve as before
        reason = repo.not_ready_reasons()["tfm"]
        assert reason.startswith(f"version 1: model.savedmodel.eml: {TF_MISSING} (install tensorflow")
        [status] = repo.status("tfm")
        assert (status.state, status.error) == (ModelState.END, reason.removeprefix("version 1: "))
    assert "tensorflow.python" not in sys.modules


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENCLAVEML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ENCLAVEML_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("ENCLAVEML_KMS", raising=False)
    store = LocalKms.init(
        tmp_path / "home" / "keystore.json", PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC)
    )
    store.create_key(KEY)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *args: str, expect: int = 0) -> tuple[str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == expect, err
    return out, err


def test_the_cli_seals_a_savedmodel_directory_and_gives_its_archive_back(
    owner: Path, savedmodel_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sealed = "models/tfm/3/model.savedmodel.eml"
    _, err = run(capsys, "model", "encrypt", str(savedmodel_dir), "-o", sealed, "--key", KEY)
    assert "TensorFlow SavedModel, model tfm version 3, key models, 1 inputs, 2 outputs" in err

    out, _ = run(capsys, "model", "inspect", sealed, "--json")
    shown = json.loads(out)
    assert (shown["format"], shown["model_format"], shown["model_name"], shown["model_version"]) == (
        "eml",
        "tf-savedmodel",
        "tfm",
        3,
    )
    assert shown["inputs"] == [{"name": "x", "type": "FLOAT", "shape": [-1, 4]}]
    run(capsys, "model", "decrypt", sealed, "-o", "back.tar", "--key-from-kms")
    assert (owner / "back.tar").read_bytes() == pack_savedmodel(savedmodel_dir)


def test_a_savedmodel_whose_signature_cannot_be_read_is_sealed_with_unknown_tensors(
    owner: Path, savedmodel_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (savedmodel_dir / "saved_model.pb").rename(savedmodel_dir / "saved_model.pbtxt")  # no text parser here
    _, err = run(
        capsys, "model", "encrypt", str(savedmodel_dir), "-o", "m.eml", "--name", "tfm", "--version", "1", "-k", KEY
    )
    assert "inputs and outputs unknown" in err

    out, _ = run(capsys, "model", "inspect", "m.eml")
    assert "inputs          unknown (sealed without reading the signature" in out
    assert read_model_metadata(owner / "m.eml") == ModelMetadata("tfm", 1, (), (), SAVEDMODEL_FORMAT)


@pytest.mark.skipif(tensorflow_available(), reason="TensorFlow is installed here")
def test_a_protected_file_holding_a_savedmodel_is_recognised_as_one(
    owner: Path, savedmodel_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "model", "wrap-key", "-o", "wrap.key")
    output = "models/tfm/1/model.savedmodel.pf"
    _, err = run(
        capsys,
        "model",
        "encrypt",
        str(savedmodel_dir),
        "-o",
        output,
        "--format",
        "gramine-pf",
        "--wrap-key",
        "wrap.key",
    )
    assert "holding a SavedModel archive, bound to path 'models/tfm/1/model.savedmodel.pf'" in err

    keys = LocalKeys(LocalKms(owner / "home" / "keystore.json", PASSPHRASE), pf_wrap_key_file=owner / "wrap.key")
    with ModelRepository({"tfm": Path("models/tfm")}, keys) as repo:
        assert TF_MISSING in repo.not_ready_reasons()["tfm"]  # decrypted, then routed to the SavedModel runtime


# -- in the TensorFlow venv -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    if not TF_PYTHON.exists():
        pytest.skip("run make install")
    work = tmp_path_factory.mktemp("tf-savedmodel")
    temp = tmp_path_factory.mktemp("tf-temp")  # the check looks for files TensorFlow writes while loading
    (work / "spec.json").write_text(json.dumps({"work": str(work), "rows": ROWS.tolist()}))
    run = subprocess.run(
        [str(TF_PYTHON), str(SCRIPT), str(work / "spec.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin", "TMPDIR": str(temp), "HOME": str(work)},
    )
    hint = "run make install (enclaveml goes into .venv/tfclient too)" if "No module named" in run.stderr else ""
    assert run.returncode == 0, hint + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), work


def test_tensorflow_serves_the_sealed_savedmodel_as_tensorflow_itself_answers(
    tf_report: tuple[dict[str, Any], Path],
) -> None:
    report, _ = tf_report
    assert report["tf_version"].startswith("2.")
    assert report["model_format"] == "tf-savedmodel"
    assert report["inputs"] == [["x", "float32", [-1, 4]]]
    assert report["outputs"] == [["label", "int64", [-1]], ["scores", "float32", [-1, 3]]]
    assert report["scores_diff"] == 0.0
    assert report["labels_equal"]
    assert report["label_dtype"] == "int64"
    assert report["pf"] == ["gramine-pf", "tf-savedmodel"]
    assert report["pf_scores_diff"] == 0.0
    assert report["header"] == {
        "format": "tf-savedmodel",
        "inputs": [["x", "FLOAT", [-1, 4]]],
        "outputs": [["label", "INT64", [-1]], ["scores", "FLOAT", [-1, 3]]],
    }
    assert report["repr"] == "TfSavedModel(signature='serving_default', inputs=['x'], outputs=['label', 'scores'])"


def test_tampered_and_escaping_savedmodels_are_not_ready_with_the_reason(
    tf_report: tuple[dict[str, Any], Path],
) -> None:
    report, _ = tf_report
    assert not report["ready"]
    assert set(report["not_ready"]) == {"tampered", "evil"}
    assert "version 1: model.savedmodel.eml: segment 0 failed authentication" in report["not_ready"]["tampered"]
    assert (
        "version 1: model.savedmodel.eml: archive member 'variables/../../escape' leaves the SavedModel directory"
        in report["not_ready"]["evil"]
    )


def test_the_plaintext_stays_in_memory_and_tensorflow_stays_out_until_needed(
    tf_report: tuple[dict[str, Any], Path],
) -> None:
    report, _ = tf_report
    assert report["tf_imported_by_enclaveml"] is False
    assert report["temp_files_written"] == []
    assert report["ram_dirs_while_served"] == 2  # linear and pf: only their assets/ stay
    assert report["ram_files_while_served"] == ["assets", "assets"]
    assert report["ram_dirs_after_close"] == 0


def test_a_request_in_the_wrong_dtype_is_refused_before_tensorflow_sees_it(
    tf_report: tuple[dict[str, Any], Path],
) -> None:
    report, _ = tf_report
    assert report["refused"].startswith("input 'x' expects dtype float32, got float64")


def test_a_failure_inside_the_graph_names_the_node_but_never_the_tensor_values(
    tf_report: tuple[dict[str, Any], Path],
) -> None:
    report, _ = tf_report
    assert report["assertion"].startswith("the model refused the request: TensorFlow InvalidArgumentError at node '")
    assert "assert_less" in report["assertion"]
    assert "12345678" not in report["assertion"]
    assert "1.234" not in report["assertion"]


def test_the_header_of_a_real_savedmodel_is_read_here_without_tensorflow(
    tf_report: tuple[dict[str, Any], Path], owner: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, work = tf_report
    run(capsys, "model", "encrypt", str(work / "saved"), "-o", "models/linear/1/model.savedmodel.eml", "-k", KEY)

    metadata = read_model_metadata(owner / "models/linear/1/model.savedmodel.eml")
    assert metadata.inputs == (TensorSpec("x", "FLOAT", (-1, 4)),)
    assert metadata.outputs == (TensorSpec("label", "INT64", (-1,)), TensorSpec("scores", "FLOAT", (-1, 3)))
    assert pack_savedmodel(work / "saved") == pack_savedmodel(work / "saved")
