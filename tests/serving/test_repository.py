"""The model repository: encrypted versions in TF Serving's layout, hot reload, and why a model is not ready.

Every model file is sealed for real (EML with a ``LocalKms``, Gramine protected files with a
wrap key), every attack is a real modification of the file on disk, and the repository is
read back through its public methods only.
"""

from __future__ import annotations

import logging
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from enclaveml.crypto import encrypt_bytes
from enclaveml.errors import ConfigError
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.serving.errors import ModelNotFound, ModelNotReady
from enclaveml.serving.keys import LocalKeys
from enclaveml.serving.metrics import ServingMetrics
from enclaveml.serving.repository import (
    ModelRepository,
    ModelState,
    VersionStatus,
    pf_bound_path,
    publish_eml_model,
    publish_pf_model,
)
from enclaveml.serving.runtime import ModelRuntime, OnnxModel
from enclaveml.serving.sample_models import sklearn_classifier_onnx

KEY = "models"
ROWS = np.random.default_rng(7).standard_normal((6, 4), dtype=np.float32)


def probabilities(runtime: ModelRuntime) -> np.ndarray:
    return runtime.run({"input": ROWS}, ["probabilities"])["probabilities"]


def expected_probabilities(model_bytes: bytes) -> np.ndarray:
    return probabilities(OnnxModel(model_bytes))


def repository(models: Path, kms: LocalKms, **kwargs: object) -> ModelRepository:
    return ModelRepository({"sklearn": models / "sklearn"}, LocalKeys(kms), **kwargs)  # type: ignore[arg-type]


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


# -- loading and serving ----------------------------------------------------------------------


def test_serves_the_eml_model_and_reports_it_available(
    model_repo_dir: Path, local_kms: LocalKms, sklearn_model_bytes: bytes
) -> None:
    with repository(model_repo_dir, local_kms) as repo:
        assert repo.ready()
        assert repo.not_ready_reasons() == {}
        assert repo.names() == ["sklearn"]
        served = repo.get("sklearn")
        assert (served.name, served.version, served.source_format) == ("sklearn", 1, "eml")
        assert served.decrypt_seconds > 0
        assert served.load_seconds > 0
        assert served.path == model_repo_dir / "sklearn" / "1" / "model.onnx.eml"
        assert repo.get("sklearn", 1) is served
        assert repo.status("sklearn") == [VersionStatus(1, ModelState.AVAILABLE, None)]
        np.testing.assert_array_equal(probabilities(served.runtime), expected_probabilities(sklearn_model_bytes))


def test_unknown_models_and_versions_are_not_found(model_repo_dir: Path, local_kms: LocalKms) -> None:
    with repository(model_repo_dir, local_kms) as repo:
        with pytest.raises(ModelNotFound, match="no model named 'resnet50'") as caught:
            repo.get("resnet50")
        assert caught.value.http_status == 404
        assert "served models: sklearn" in caught.value.diagnostics()
        with pytest.raises(ModelNotFound, match=r"model 'sklearn' has no available version 2 \(available: 1\)"):
            repo.get("sklearn", 2)
        with pytest.raises(ModelNotFound):
            repo.status("resnet50")


def test_plaintext_model_bytes_never_touch_the_disk(
    model_repo_dir: Path, local_kms: LocalKms, sklearn_model_bytes: bytes
) -> None:
    before = {p: p.read_bytes() for p in model_repo_dir.rglob("*") if p.is_file()}
    with repository(model_repo_dir, local_kms) as repo:
        repo.get("sklearn")
        after = {p: p.read_bytes() for p in model_repo_dir.parent.rglob("*") if p.is_file()}
    assert {p: after[p] for p in before} == before
    assert set(after) == set(before)
    assert not any(sklearn_model_bytes[:64] in data for data in after.values())


# -- hot reload -------------------------------------------------------------------------------


def test_a_new_version_replaces_the_old_one_on_reload(model_repo_dir: Path, local_kms: LocalKms) -> None:
    v2_bytes = sklearn_classifier_onnx(seed=1)
    with repository(model_repo_dir, local_kms) as repo:
        v1 = repo.get("sklearn")
        publish_eml_model(model_repo_dir / "sklearn", 2, v2_bytes, local_kms, KEY)
        assert repo.get("sklearn") is v1  # nothing changes before a reload
        repo.reload()
        v2 = repo.get("sklearn")
        assert v2.version == 2
        np.testing.assert_array_equal(probabilities(v2.runtime), expected_probabilities(v2_bytes))
        assert repo.status("sklearn") == [
            VersionStatus(1, ModelState.END, None),
            VersionStatus(2, ModelState.AVAILABLE, None),
        ]
        with pytest.raises(ModelNotFound, match="no available version 1"):
            repo.get("sklearn", 1)
        # A request that already holds version 1 still finishes with it.
        assert probabilities(v1.runtime).shape == (6, 3)


class GatedRuntime:
    """Builds ``OnnxModel``s, but the build of version 2's bytes waits until the test opens the gate."""

    def __init__(self, gated_bytes: bytes) -> None:
        self.gated_bytes = gated_bytes
        self.loading = threading.Event()
        self.gate = threading.Event()

    def __call__(self, model_bytes: bytes) -> ModelRuntime:
        if model_bytes == self.gated_bytes:
            self.loading.set()
            assert self.gate.wait(30)
        return OnnxModel(model_bytes)


def test_the_old_version_serves_until_the_new_one_is_available(model_repo_dir: Path, local_kms: LocalKms) -> None:
    v2_bytes = sklearn_classifier_onnx(seed=1)
    factory = GatedRuntime(v2_bytes)
    with repository(model_repo_dir, local_kms, runtime_factory=factory) as repo:
        publish_eml_model(model_repo_dir / "sklearn", 2, v2_bytes, local_kms, KEY)
        reloading = threading.Thread(target=repo.reload)
        reloading.start()
        assert factory.loading.wait(30)
        assert repo.get("sklearn").version == 1  # get() does not wait for the load
        assert repo.ready()
        assert [(s.version, s.state) for s in repo.status("sklearn")] == [
            (1, ModelState.AVAILABLE),
            (2, ModelState.LOADING),
        ]
        factory.gate.set()
        reloading.join(30)
        assert repo.get("sklearn").version == 2


class CountingRepository(ModelRepository):
    """Counts finished reloads, so a test waits for the poller without sleeping."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reloads = 0
        self.reloaded = threading.Condition()

    def reload(self) -> None:
        super().reload()
        with self.reloaded:
            self.reloads += 1
            self.reloaded.notify_all()

    def wait_for_reloads(self, count: int) -> None:
        with self.reloaded:
            target = self.reloads + count
            assert self.reloaded.wait_for(lambda: self.reloads >= target, timeout=30)


def test_the_poller_picks_up_a_new_version_by_itself(model_repo_dir: Path, local_kms: LocalKms) -> None:
    repo = CountingRepository({"sklearn": model_repo_dir / "sklearn"}, LocalKeys(local_kms), poll_seconds=0.02)
    with repo:
        publish_eml_model(model_repo_dir / "sklearn", 2, sklearn_classifier_onnx(seed=1), local_kms, KEY)
        repo.wait_for_reloads(2)  # one may have scanned before the publish
        assert repo.get("sklearn").version == 2
    assert repo.status("sklearn")[-1].state is ModelState.END  # close() unloads
    with pytest.raises(ModelNotReady):
        repo.get("sklearn")


def test_removed_versions_are_unloaded(model_repo_dir: Path, local_kms: LocalKms) -> None:
    publish_eml_model(model_repo_dir / "sklearn", 2, sklearn_classifier_onnx(seed=1), local_kms, KEY)
    with repository(model_repo_dir, local_kms) as repo:
        assert repo.get("sklearn").version == 2
        shutil.rmtree(model_repo_dir / "sklearn" / "2")
        repo.reload()
        assert repo.get("sklearn").version == 1  # the newest left on disk
        assert repo.status("sklearn")[-1] == VersionStatus(2, ModelState.END, None)
        shutil.rmtree(model_repo_dir / "sklearn")
        repo.reload()
        assert not repo.ready()
        assert repo.not_ready_reasons() == {"sklearn": f"{model_repo_dir / 'sklearn'}: no such directory"}
        with pytest.raises(ModelNotReady, match="no such directory") as caught:
            repo.get("sklearn")
        assert caught.value.grpc_code == "UNAVAILABLE"


def test_publishing_never_replaces_a_version(
    model_repo_dir: Path, local_kms: LocalKms, sklearn_model_bytes: bytes
) -> None:
    with pytest.raises(ConfigError, match="already exists"):
        publish_eml_model(model_repo_dir / "sklearn", 1, sklearn_model_bytes, local_kms, KEY)
    assert sorted(p.name for p in (model_repo_dir / "sklearn").iterdir()) == ["1"]


# -- attacks and mistakes: the model stays not ready and says why ---------------------------------


def test_a_tampered_model_file_is_not_served(model_repo_dir: Path, local_kms: LocalKms) -> None:
    flip_byte(model_repo_dir / "sklearn" / "1" / "model.onnx.eml")
    with repository(model_repo_dir, local_kms) as repo:
        assert not repo.ready()
        reason = repo.not_ready_reasons()["sklearn"]
        assert reason.startswith("version 1: model.onnx.eml: segment 0 failed authentication")
        assert "modified" in reason
        assert "\n" not in reason
        [status] = repo.status("sklearn")
        assert status.state is ModelState.END
        assert status.error is not None
        assert reason.endswith(status.error)
        with pytest.raises(ModelNotReady, match="segment 0 failed authentication"):
            repo.get("sklearn")


def test_a_tampered_new_version_leaves_the_previous_one_serving(model_repo_dir: Path, local_kms: LocalKms) -> None:
    with repository(model_repo_dir, local_kms) as repo:
        path = publish_eml_model(model_repo_dir / "sklearn", 2, sklearn_classifier_onnx(seed=1), local_kms, KEY)
        flip_byte(path)
        repo.reload()
        assert repo.ready()
        assert repo.get("sklearn").version == 1
        v2 = repo.status("sklearn")[-1]
        assert (v2.version, v2.state) == (2, ModelState.END)
        assert v2.error is not None
        assert "failed authentication" in v2.error
        # Replacing the file with a good one is noticed on the next reload.
        path.unlink()
        path.parent.rmdir()
        publish_eml_model(model_repo_dir / "sklearn", 2, sklearn_classifier_onnx(seed=1), local_kms, KEY)
        repo.reload()
        assert repo.get("sklearn").version == 2


def test_a_model_sealed_under_another_key_store_is_not_served(
    model_repo_dir: Path, tmp_path: Path, sklearn_model_bytes: bytes
) -> None:
    other = LocalKms.init(tmp_path / "other.json", "other", kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    other.create_key(KEY)  # same name, different key
    with repository(model_repo_dir, other) as repo:
        assert not repo.ready()
        reason = repo.not_ready_reasons()["sklearn"]
        assert reason.startswith("version 1: model.onnx.eml: ")
        assert "k-" in reason  # names the key id it needed, never key bytes


def test_a_file_copied_into_another_version_is_refused(model_repo_dir: Path, local_kms: LocalKms) -> None:
    # Rolling back by copying the sealed version 1 into 3/: its authenticated header says version 1.
    (model_repo_dir / "sklearn" / "3").mkdir()
    shutil.copy(model_repo_dir / "sklearn" / "1" / "model.onnx.eml", model_repo_dir / "sklearn" / "3")
    with repository(model_repo_dir, local_kms) as repo:
        reason = repo.not_ready_reasons()["sklearn"]
        assert "sealed as model 'sklearn' version 1, but it is in 'sklearn' version 3" in reason


def test_another_models_file_is_refused(model_repo_dir: Path, local_kms: LocalKms, sklearn_model_bytes: bytes) -> None:
    publish_eml_model(model_repo_dir / "fraud", 1, sklearn_model_bytes, local_kms, KEY)
    shutil.rmtree(model_repo_dir / "sklearn" / "1")
    shutil.copytree(model_repo_dir / "fraud" / "1", model_repo_dir / "sklearn" / "1")
    with repository(model_repo_dir, local_kms) as repo:
        assert (
            "sealed as model 'fraud' version 1, but it is in 'sklearn' version 1" in repo.not_ready_reasons()["sklearn"]
        )


def test_a_sealed_file_that_is_not_onnx_is_refused(model_repo_dir: Path, local_kms: LocalKms) -> None:
    path = model_repo_dir / "sklearn" / "1" / "model.onnx.eml"
    context = {
        "format": "onnx",
        "model_name": "sklearn",
        "model_version": "1",
        "model_inputs": "[]",
        "model_outputs": "[]",
    }
    path.write_bytes(encrypt_bytes(b"#!/bin/sh\necho pickled\n", local_kms, KEY, context=context))
    with repository(model_repo_dir, local_kms) as repo:
        assert repo.not_ready_reasons()["sklearn"].startswith("version 1: model.onnx.eml: not a valid ONNX model")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"model.onnx": b"\x08\x08plaintext"},
            "no encrypted model file (model.onnx.eml or model.onnx.pf) "
            "(found model.onnx: plaintext models are never served)",
        ),
        ({}, "no encrypted model file"),
    ],
    ids=["plaintext", "empty"],
)
def test_a_version_without_an_encrypted_model_is_refused(
    tmp_path: Path, local_kms: LocalKms, files: dict[str, bytes], message: str
) -> None:
    version = tmp_path / "models" / "sklearn" / "1"
    version.mkdir(parents=True)
    for name, data in files.items():
        (version / name).write_bytes(data)
    with repository(tmp_path / "models", local_kms) as repo:
        assert message in repo.not_ready_reasons()["sklearn"]


def test_two_model_files_in_one_version_are_refused(model_repo_dir: Path, local_kms: LocalKms) -> None:
    version = model_repo_dir / "sklearn" / "1"
    shutil.copy(version / "model.onnx.eml", version / "other.eml")
    with repository(model_repo_dir, local_kms) as repo:
        assert (
            "2 model files (model.onnx.eml, other.eml); a version holds exactly one"
            in repo.not_ready_reasons()["sklearn"]
        )


def test_a_model_root_without_versions_says_so(tmp_path: Path, local_kms: LocalKms) -> None:
    (tmp_path / "models" / "sklearn" / "latest").mkdir(parents=True)
    with repository(tmp_path / "models", local_kms) as repo:
        assert repo.not_ready_reasons()["sklearn"].endswith("no version directories (1/, 2/, ...)")


# -- Gramine protected files --------------------------------------------------------------------


@pytest.fixture
def wrap_key_file(tmp_path: Path, pf_wrap_key: bytes) -> Path:
    path = tmp_path / "wrap_key"
    path.write_bytes(pf_wrap_key)
    return path


def test_serves_a_gramine_protected_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_kms: LocalKms, pf_wrap_key: bytes, wrap_key_file: Path,
    sklearn_model_bytes: bytes,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    path = publish_pf_model(Path("models/sklearn"), 1, sklearn_model_bytes, pf_wrap_key)
    assert path.read_bytes().startswith(b"GRAFS_PF")
    assert pf_bound_path("./models//sklearn", 1, "model.onnx.pf") == "models/sklearn/1/model.onnx.pf"
    keys = LocalKeys(local_kms, pf_wrap_key_file=wrap_key_file)
    with ModelRepository({"sklearn": Path("models/sklearn")}, keys) as repo:
        served = repo.get("sklearn")
        assert (served.version, served.source_format) == (1, "gramine-pf")
        np.testing.assert_array_equal(probabilities(served.runtime), expected_probabilities(sklearn_model_bytes))


def test_a_protected_file_is_bound_to_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_kms: LocalKms, pf_wrap_key: bytes, wrap_key_file: Path,
    sklearn_model_bytes: bytes,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    # Encrypted for a Gramine manifest's uri "file:models/resnet50-v15-fp32/1/model.onnx.pf", served from elsewhere.
    publish_pf_model(Path("served/sklearn"), 1, sklearn_model_bytes, pf_wrap_key, bound_root="models/resnet50-v15-fp32")
    keys = LocalKeys(local_kms, pf_wrap_key_file=wrap_key_file)
    with ModelRepository({"sklearn": Path("served/sklearn")}, keys) as repo:
        assert "bound to a different path than 'served/sklearn/1/model.onnx.pf'" in repo.not_ready_reasons()["sklearn"]
    prefix = {"sklearn": "models/resnet50-v15-fp32"}
    with ModelRepository({"sklearn": Path("served/sklearn")}, keys, pf_path_prefix=prefix) as repo:
        assert repo.get("sklearn").source_format == "gramine-pf"


def test_a_protected_file_under_another_wrap_key_or_tampered_is_not_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_kms: LocalKms, pf_wrap_key: bytes, wrap_key_file: Path,
    sklearn_model_bytes: bytes,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    path = publish_pf_model(Path("models/sklearn"), 1, sklearn_model_bytes, bytes(16))
    keys = LocalKeys(local_kms, pf_wrap_key_file=wrap_key_file)
    with ModelRepository({"sklearn": Path("models/sklearn")}, keys) as repo:
        assert repo.not_ready_reasons()["sklearn"].startswith("version 1: model.onnx.pf: ")
    path.unlink()
    path.parent.rmdir()
    path = publish_pf_model(Path("models/sklearn"), 1, sklearn_model_bytes, pf_wrap_key)
    flip_byte(path, offset_from_end=path.stat().st_size - 200)  # inside the encrypted metadata
    with ModelRepository({"sklearn": Path("models/sklearn")}, keys) as repo:
        assert not repo.ready()
        assert "model.onnx.pf" in repo.not_ready_reasons()["sklearn"]


def test_a_protected_model_without_a_wrap_key_says_which_source_to_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_kms: LocalKms, pf_wrap_key: bytes, sklearn_model_bytes: bytes
) -> None:
    monkeypatch.chdir(tmp_path)
    publish_pf_model(Path("models/sklearn"), 1, sklearn_model_bytes, pf_wrap_key)
    with ModelRepository({"sklearn": Path("models/sklearn")}, LocalKeys(local_kms)) as repo:
        reason = repo.not_ready_reasons()["sklearn"]
        assert "need a 16-byte wrap key" in reason
        assert "pf_wrap_key_file" in reason


# -- ResNet-50, metrics, logs ---------------------------------------------------------------------


def test_resnet50_loads_from_an_eml_file(tmp_path: Path, local_kms: LocalKms, resnet50_model_bytes: bytes) -> None:
    publish_eml_model(tmp_path / "resnet50", 1, resnet50_model_bytes, local_kms, KEY)
    with ModelRepository({"resnet50": tmp_path / "resnet50"}, LocalKeys(local_kms)) as repo:
        served = repo.get("resnet50")
        assert served.runtime.inputs[0].shape == (-1, 224, 224, 3)
        image = np.zeros((1, 224, 224, 3), np.float32)
        assert served.runtime.run({"input": image})["probabilities"].shape == (1, 1000)


def test_metrics_report_readiness_and_load_times(model_repo_dir: Path, local_kms: LocalKms) -> None:
    with repository(model_repo_dir, local_kms) as repo:
        metrics = ServingMetrics(repository=repo)
        metrics.record_request("sklearn", "kserve-rest", 200, 0.004)
        metrics.record_request("no-such-model", "kserve-rest", 404, 0.001)
        body, content_type = metrics.render()
        text = body.decode()
        assert content_type.startswith("text/plain")
        assert 'enclaveml_serving_model_ready{model="sklearn"} 1.0' in text
        assert 'enclaveml_serving_model_load_seconds{model="sklearn",version="1"}' in text
        assert 'enclaveml_serving_model_decrypt_seconds{model="sklearn",version="1"}' in text
        assert 'enclaveml_serving_requests_total{code="200",model="sklearn",protocol="kserve-rest"} 1.0' in text
        assert 'enclaveml_serving_requests_total{code="404",model="_unknown",protocol="kserve-rest"} 1.0' in text
        assert 'enclaveml_serving_request_seconds_count{model="sklearn",protocol="kserve-rest"} 1.0' in text
        shutil.rmtree(model_repo_dir / "sklearn" / "1")
        repo.reload()
        text = metrics.render()[0].decode()
        assert 'enclaveml_serving_model_ready{model="sklearn"} 0.0' in text
        assert "enclaveml_serving_model_load_seconds{" not in text  # no stale series for an unloaded version


def test_loading_logs_no_key_material(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, local_kms: LocalKms,
    pf_wrap_key: bytes, wrap_key_file: Path, sklearn_model_bytes: bytes,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    publish_pf_model(Path("models/good"), 1, sklearn_model_bytes, pf_wrap_key)
    publish_pf_model(Path("models/bad"), 1, sklearn_model_bytes, bytes(range(16)))
    keys = LocalKeys(local_kms, pf_wrap_key_file=wrap_key_file)
    models = {"good": Path("models/good"), "bad": Path("models/bad")}
    with caplog.at_level(logging.DEBUG, logger="enclaveml"), ModelRepository(models, keys) as repo:
        assert list(repo.not_ready_reasons()) == ["bad"]
        statuses = [repo.status(name) for name in repo.names()]
    exposed = caplog.text + repr(statuses) + repr(keys)
    for secret in (pf_wrap_key, bytes(range(16))):
        assert secret.hex() not in exposed
        assert repr(secret) not in exposed
    assert "model good version 1 available" in caplog.text
    assert "model bad version 1 not loaded" in caplog.text


class BrokenKeys:
    """A key source with a bug: its exception text must not reach the status or a client."""

    def key_wrapper_for_eml(self) -> LocalKms:
        raise RuntimeError("internal detail 0xdeadbeef")

    def pf_wrap_key(self) -> bytes:
        raise RuntimeError("internal detail 0xdeadbeef")


def test_an_unexpected_failure_is_recorded_without_its_details(model_repo_dir: Path) -> None:
    with ModelRepository({"sklearn": model_repo_dir / "sklearn"}, BrokenKeys()) as repo:
        [status] = repo.status("sklearn")
        assert status == VersionStatus(1, ModelState.END, "unexpected RuntimeError")
        assert "deadbeef" not in repo.not_ready_reasons()["sklearn"]
