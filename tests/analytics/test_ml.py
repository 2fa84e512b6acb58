"""Trusted ML: train on encrypted people.csv, export to ONNX, seal the model, load it back.

Real objects throughout: a real local key store, real EML files read through a real
``TrustedContext``, real scikit-learn / XGBoost fits, real onnxruntime sessions, and for the
attested mode a real key bundle in an inherited pipe, as ``enclaveml run`` hands it over.
Data sets are 5 000 rows and forests 10 trees, so the whole file runs in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from analytics_data import assert_no_plaintext

from enclaveml.analytics import TrustedContext
from enclaveml.analytics.ml import (
    Features,
    ModelMetadata,
    TensorSpec,
    evaluate,
    export_onnx,
    features,
    load_encrypted_model,
    predict_onnx,
    read_model_metadata,
    save_encrypted_model,
    split,
    train,
)
from enclaveml.crypto import encrypt_bytes, encrypt_file
from enclaveml.errors import ConfigError, ContextMismatch, FormatError, IntegrityError, KeyNotFound
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.runtime.session import SESSION_FD_ENV, ReleasedKey, Session, encode_bundle

ROWS = 5_000
FEATURES = ["age", "job", "city"]
REGRESSION = "SELECT age, job, city, salary FROM people"
CLASSIFICATION = "SELECT age, job, city, salary > 100000 AS high_salary FROM people"
SMALL = {"linear": {}, "random_forest": {"n_estimators": 10, "n_jobs": 1}, "xgboost": {"n_estimators": 20, "n_jobs": 1}}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_model.py"
RELEASED = ReleasedKey("customers", "k-00000000000000aa", 1, bytes(range(32)))
# Bytes every serialized skl2onnx model contains; none may appear in a sealed model file.
ONNX_MARKERS = (b"skl2onnx", b"ai.onnx.ml", b"OneHotEncoder")


@pytest.fixture
def small_people_csv(tmp_path: Path) -> Path:
    from enclaveml.datagen.people import write_people_csv

    (tmp_path / "plain").mkdir()
    path = tmp_path / "plain" / "people.csv"
    write_people_csv(path, ROWS)
    return path


@pytest.fixture
def small_people_eml(small_people_csv: Path, work: Path, kms: LocalKms) -> Path:
    path = work / "people.csv.eml"
    encrypt_file(small_people_csv, path, kms, "customers")
    return path


def load(path: Path, kms: LocalKms, query: str, target: str, *, plain: bool = False) -> Features:
    with TrustedContext(engine="duckdb", kms=kms) as ctx:
        ctx.read(path, format="csv", name="people", allow_plain=plain)
        return features(ctx.sql(query), FEATURES, target)


@pytest.fixture
def regression_data(small_people_eml: Path, kms: LocalKms) -> Features:
    return load(small_people_eml, kms, REGRESSION, "salary")


@pytest.fixture
def sealed_model(regression_data: Features, work: Path, kms: LocalKms) -> tuple[Path, bytes]:
    onnx_bytes = export_onnx(train("linear", regression_data), regression_data)
    path = work / "model.onnx.eml"
    save_encrypted_model(
        onnx_bytes, path, kms, "customers", metadata=ModelMetadata.from_onnx(onnx_bytes, name="salary", version=3)
    )
    return path, onnx_bytes


# -- features and training --------------------------------------------------------------


def test_features_describe_numbers_as_float_inputs_and_strings_as_categories(regression_data: Features) -> None:
    assert regression_data.inputs == (
        TensorSpec("age", "FLOAT"),
        TensorSpec("job", "STRING"),
        TensorSpec("city", "STRING"),
    )
    assert regression_data.task == "regression"
    assert regression_data.x.shape == (ROWS, 3)
    assert regression_data.y is not None
    assert regression_data.y.dtype == np.float64


def test_a_boolean_target_makes_a_classification_task(small_people_eml: Path, kms: LocalKms) -> None:
    data = load(small_people_eml, kms, CLASSIFICATION, "high_salary")

    assert data.task == "classification"
    assert data.y is not None
    assert set(np.unique(data.y)) == {0, 1}


def test_null_features_are_refused(kms: LocalKms) -> None:
    import pyarrow as pa

    table = pa.table({"age": [30, None], "salary": [1.0, 2.0]})

    with pytest.raises(ConfigError, match="column 'age' has 1 nulls"):
        features(table, ["age"], "salary")


@pytest.mark.parametrize("kind", ["linear", "xgboost"])
def test_training_on_encrypted_input_gives_the_same_model_as_on_plaintext(
    kind: str, small_people_eml: Path, small_people_csv: Path, kms: LocalKms
) -> None:
    encrypted = split(load(small_people_eml, kms, REGRESSION, "salary"), seed=7)
    plain = split(load(small_people_csv, kms, REGRESSION, "salary", plain=True), seed=7)

    models = [train(kind, train_set, seed=7, **SMALL[kind]) for train_set, _ in (encrypted, plain)]  # type: ignore[arg-type]

    assert np.array_equal(models[0].predict(encrypted[1].x), models[1].predict(plain[1].x))
    assert evaluate(models[0], encrypted[1]) == evaluate(models[1], plain[1])
    assert evaluate(models[0], encrypted[1])["r2"] > 0.8


def test_unknown_kind_is_a_config_error(regression_data: Features) -> None:
    with pytest.raises(ConfigError, match="unknown model kind 'svm'"):
        train("svm", regression_data)  # type: ignore[arg-type]


# -- ONNX parity --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "random_forest", "xgboost"])
def test_onnx_regressor_predicts_what_scikit_learn_predicts(kind: str, regression_data: Features) -> None:
    train_set, holdout = split(regression_data, seed=1)
    model = train(kind, train_set, seed=1, **SMALL[kind])  # type: ignore[arg-type]

    (onnx_out,) = predict_onnx(export_onnx(model, regression_data), holdout)

    assert onnx_out.shape == (len(holdout), 1)
    np.testing.assert_allclose(onnx_out.ravel(), model.predict(holdout.x), rtol=1e-5, atol=1.0)


@pytest.mark.parametrize("kind", ["linear", "random_forest", "xgboost"])
def test_onnx_classifier_gives_scikit_learns_labels_and_probabilities(
    kind: str, small_people_eml: Path, kms: LocalKms
) -> None:
    data = load(small_people_eml, kms, CLASSIFICATION, "high_salary")
    train_set, holdout = split(data, seed=1)
    model = train(kind, train_set, seed=1, **SMALL[kind])  # type: ignore[arg-type]

    labels, probabilities = predict_onnx(export_onnx(model, data), holdout)

    assert np.array_equal(labels, model.predict(holdout.x))
    np.testing.assert_allclose(probabilities, model.predict_proba(holdout.x), rtol=1e-5, atol=1e-5)
    assert evaluate(model, holdout)["accuracy"] > 0.8


def test_onnx_inputs_are_one_tensor_per_column(regression_data: Features) -> None:
    onnx_bytes = export_onnx(train("linear", regression_data), regression_data)

    metadata = ModelMetadata.from_onnx(onnx_bytes, name="salary")

    assert metadata.inputs == (
        TensorSpec("age", "FLOAT", (-1, 1)),
        TensorSpec("job", "STRING", (-1, 1)),
        TensorSpec("city", "STRING", (-1, 1)),
    )
    assert metadata.outputs == (TensorSpec("variable", "FLOAT", (-1, 1)),)


def test_an_unseen_category_predicts_instead_of_failing(regression_data: Features) -> None:
    onnx_bytes = export_onnx(train("linear", regression_data), regression_data)
    feeds = {
        "age": np.array([[30.0]], dtype=np.float32),
        "job": np.array([["Astronaut"]]),
        "city": np.array([["Atlantis"]]),
    }

    (out,) = predict_onnx(onnx_bytes, feeds)

    assert out.shape == (1, 1)
    assert np.isfinite(out).all()


# -- encrypted model files --------------------------------------------------------------


def test_sealed_model_round_trips_and_its_header_tells_the_server_what_to_feed(
    sealed_model: tuple[Path, bytes], kms: LocalKms
) -> None:
    path, onnx_bytes = sealed_model

    metadata = read_model_metadata(path)  # no key needed
    loaded = load_encrypted_model(path, kms, expected=metadata)

    assert loaded == onnx_bytes
    assert (metadata.format, metadata.name, metadata.version) == ("onnx", "salary", 3)
    assert [(t.name, t.type) for t in metadata.inputs] == [("age", "FLOAT"), ("job", "STRING"), ("city", "STRING")]
    assert (path.stat().st_mode & 0o777) == 0o600
    sealed = path.read_bytes()
    assert not [m for m in ONNX_MARKERS if m in sealed]


def test_released_keys_seal_and_open_a_model(regression_data: Features, work: Path) -> None:
    session = Session("broker", [RELEASED], {"tee": "sim"})
    onnx_bytes = export_onnx(train("linear", regression_data), regression_data)
    path = work / "model.onnx.eml"

    save_encrypted_model(
        onnx_bytes, path, session, "customers", metadata=ModelMetadata.from_onnx(onnx_bytes, name="salary")
    )

    assert load_encrypted_model(path, session) == onnx_bytes


@pytest.mark.parametrize("where", ["payload", "last byte", "model name in the header"])
def test_tampered_model_file_is_an_integrity_error(where: str, sealed_model: tuple[Path, bytes], kms: LocalKms) -> None:
    path, _ = sealed_model
    data = bytearray(path.read_bytes())
    if where == "payload":
        data[len(data) // 2] ^= 0x01
    elif where == "last byte":
        data[-1] ^= 0x80
    else:
        at = data.index(b"salary")
        data[at : at + 6] = b"salarz"
    path.write_bytes(bytes(data))

    with pytest.raises(IntegrityError, match=r"model\.onnx\.eml: "):
        load_encrypted_model(path, kms)


def test_truncated_model_file_is_an_integrity_error(sealed_model: tuple[Path, bytes], kms: LocalKms) -> None:
    path, _ = sealed_model
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(IntegrityError):
        load_encrypted_model(path, kms)


def test_another_key_store_is_told_it_does_not_hold_the_key(sealed_model: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = sealed_model
    other = LocalKms.init(tmp_path / "other" / "keystore.json", "another passphrase", kdf=SCRYPT_FAST_FOR_TESTS)
    other.create_key("customers")

    with pytest.raises(KeyNotFound, match=r"model\.onnx\.eml: key k-\S+ is not in key store"):
        load_encrypted_model(path, other)


def test_the_right_key_id_with_the_wrong_key_material_is_an_integrity_error(
    regression_data: Features, work: Path
) -> None:
    onnx_bytes = export_onnx(train("linear", regression_data), regression_data)
    path = work / "model.onnx.eml"
    released = Session("broker", [RELEASED], {})
    save_encrypted_model(
        onnx_bytes, path, released, "customers", metadata=ModelMetadata.from_onnx(onnx_bytes, name="salary")
    )
    impostor = Session("broker", [ReleasedKey("customers", RELEASED.key_id, 1, bytes(32))], {})

    with pytest.raises(IntegrityError):
        load_encrypted_model(path, impostor)


def test_expected_metadata_must_match_the_authenticated_header(sealed_model: tuple[Path, bytes], kms: LocalKms) -> None:
    path, _ = sealed_model
    metadata = read_model_metadata(path)
    newer = ModelMetadata(metadata.name, 4, metadata.inputs, metadata.outputs)

    with pytest.raises(ContextMismatch, match="differs from the expected metadata"):
        load_encrypted_model(path, kms, expected=newer)


def test_an_encrypted_data_file_is_not_a_model(small_people_eml: Path, kms: LocalKms) -> None:
    with pytest.raises(FormatError, match="not an ONNX model file"):
        load_encrypted_model(small_people_eml, kms)


def test_a_sealed_non_onnx_payload_is_refused(work: Path, kms: LocalKms) -> None:
    context = ModelMetadata("x", 1, (TensorSpec("a", "FLOAT"),), (TensorSpec("b", "FLOAT"),)).to_context()
    path = work / "fake.onnx.eml"
    path.write_bytes(encrypt_bytes(b"\x80\x04 not a protobuf", kms, "customers", context=context))

    with pytest.raises(FormatError, match="not a valid ONNX model"):
        load_encrypted_model(path, kms)


def test_failed_save_leaves_no_file_at_all(regression_data: Features, work: Path, kms: LocalKms) -> None:
    onnx_bytes = export_onnx(train("linear", regression_data), regression_data)
    metadata = ModelMetadata.from_onnx(onnx_bytes, name="salary")
    before = sorted(work.iterdir())

    with pytest.raises(KeyNotFound):
        save_encrypted_model(onnx_bytes, work / "model.onnx.eml", kms, "no-such-key", metadata=metadata)

    assert sorted(work.iterdir()) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "bad name!"}, "invalid model name"),
        ({"version": 0}, "invalid model version"),
        ({"inputs": (TensorSpec("age", "FLOAT"),)}, "differ from the ONNX graph"),
        ({"inputs": tuple(TensorSpec(f"column_{i:03d}_" + "x" * 40, "FLOAT") for i in range(30))}, "over the header"),
        ({"format": "pickle"}, "unknown model format 'pickle'"),
    ],
)
def test_bad_metadata_is_refused_before_the_kms_is_asked(
    change: dict[str, Any], message: str, regression_data: Features, work: Path
) -> None:
    onnx_bytes = export_onnx(train("linear", regression_data), regression_data)
    good = ModelMetadata.from_onnx(onnx_bytes, name="salary")
    metadata = ModelMetadata(**{**good.__dict__, **change})

    with pytest.raises(ConfigError, match=message):
        save_encrypted_model(onnx_bytes, work / "model.onnx.eml", _NoKms(), "customers", metadata=metadata)

    assert not (work / "model.onnx.eml").exists()


class _NoKms:
    """A KMS that must not be reached: metadata is validated first (``Any`` where the protocol needs it)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the KMS was asked ({name}) before the metadata was checked")


# -- the example -----------------------------------------------------------------------


def _run_example(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=120, **kwargs
    )


def test_train_model_example_locally_and_with_released_keys(
    small_people_csv: Path, small_people_eml: Path, work: Path, kms: LocalKms
) -> None:
    local_env = {
        **os.environ,
        "ENCLAVEML_HOME": str(kms.store_path.parent),
        "ENCLAVEML_PASSPHRASE": "correct horse battery staple",
    }
    local_env.pop(SESSION_FD_ENV, None)
    local = _run_example(
        [str(small_people_eml), str(work / "local.onnx.eml"), "--kms", "local", "--trees", "10", "--name", "income"],
        local_env,
    )

    # Inside `enclaveml run`: the key bundle arrives through an inherited pipe.
    broker_file = work / "people-broker.csv.eml"
    encrypt_file(small_people_csv, broker_file, Session("broker", [RELEASED], {}), "customers")
    read_end, write_end = os.pipe()
    os.write(write_end, encode_bundle("broker", [RELEASED], {"tee": "sim"}))
    os.close(write_end)
    job_env = {k: v for k, v in os.environ.items() if k != "ENCLAVEML_PASSPHRASE"}
    job_env[SESSION_FD_ENV] = str(read_end)
    args = [str(broker_file), str(work / "attested.onnx.eml"), "--kms", "session", "--trees", "10", "--name", "income"]
    attested = _run_example(args, job_env, pass_fds=(read_end,))
    os.close(read_end)

    for run in (local, attested):
        assert run.returncode == 0, run.stderr
        assert "holdout: r2 0.9" in run.stdout
        assert "onnx parity: max |onnxruntime - scikit-learn|" in run.stdout
    assert local.stdout == attested.stdout.replace("attested.onnx.eml", "local.onnx.eml")
    attested_model = load_encrypted_model(work / "attested.onnx.eml", Session("broker", [RELEASED], {}))
    local_model = load_encrypted_model(work / "local.onnx.eml", kms)
    assert attested_model == local_model  # same data, same seed: the same ONNX bytes, in two processes
    assert read_model_metadata(work / "attested.onnx.eml") == read_model_metadata(work / "local.onnx.eml")
    assert_no_plaintext(work)  # the header is public: it holds the model's name and input names only
    assert not [p for p in work.iterdir() if any(m in p.read_bytes() for m in ONNX_MARKERS)]


def test_train_model_example_with_a_wrong_key_prints_one_line(small_people_eml: Path, work: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != SESSION_FD_ENV}
    read_end, write_end = os.pipe()
    os.write(write_end, encode_bundle("broker", [RELEASED], {"tee": "sim"}))
    os.close(write_end)
    env[SESSION_FD_ENV] = str(read_end)

    run = _run_example([str(small_people_eml), str(work / "m.onnx.eml"), "--kms", "session"], env, pass_fds=(read_end,))
    os.close(read_end)

    assert run.returncode == 5
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith("error: ")
    assert not (work / "m.onnx.eml").exists()
