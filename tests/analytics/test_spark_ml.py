"""Spark ML on encrypted people.csv: train in the hardened Spark, export to ONNX, seal the model, load it back.

Real parts only: a real local key store, EML input read through ``TrustedContext(engine="spark")``
on the module's one ``local[2]`` SparkSession (conftest's ``spark``), real ``pyspark.ml`` fits,
onnxmltools' converter, onnxruntime. The two models (regression and classification) are fitted
once per module and shared; the attacks run on their own data. After every story the work
directory and Spark's private local directory hold no plaintext.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from analytics_data import assert_no_plaintext

from enclaveml.analytics import TrustedContext, spark_ml
from enclaveml.analytics.ml import (
    ModelMetadata,
    TensorSpec,
    load_encrypted_model,
    predict_onnx,
    read_model_metadata,
    save_encrypted_model,
)
from enclaveml.crypto import encrypt_file
from enclaveml.datagen.people import write_people_csv
from enclaveml.errors import ConfigError, IntegrityError
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.runtime.session import SESSION_FD_ENV, ReleasedKey, Session

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="the Spark engine needs a Java runtime (java not on PATH)"),
    pytest.mark.skipif(
        importlib.util.find_spec("pandas") is None,
        reason="onnxmltools' Spark ML converters import pandas (add it to the spark extra)",
    ),
]

ROWS = 5_000
FEATURES = ["age", "job", "city"]
REGRESSION = "SELECT age, job, city, salary FROM people"
CLASSIFICATION = "SELECT age, job, city, salary > 100000 AS high_salary FROM people"
PASSPHRASE = "correct horse battery staple"
RELEASED = ReleasedKey("customers", "k-00000000000000aa", 1, bytes(range(32)))
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_model.py"
# Bytes every serialized Spark ONNX model holds; none may appear in a sealed model file.
ONNX_MARKERS = (b"LabelEncoder", b"ai.onnx.ml", b"eml__features")
# The model's public header names it; "salary" would be a plaintext marker (analytics_data).
NAME = "income"


@dataclass(frozen=True)
class Trained:
    data: spark_ml.SparkFeatures
    model: Any
    holdout: spark_ml.SparkPredictions
    onnx_bytes: bytes


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``plain/people.csv`` (the only plaintext), ``work/people.csv.eml`` and the key store ``home/``."""
    root = tmp_path_factory.mktemp("spark-ml")
    for name in ("plain", "work", "home"):
        (root / name).mkdir()
    write_people_csv(root / "plain" / "people.csv", ROWS)
    return root


@pytest.fixture(scope="module")
def kms(base: Path) -> LocalKms:
    store = LocalKms.init(base / "home" / "keystore.json", PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS)
    store.create_key("customers")
    encrypt_file(base / "plain" / "people.csv", base / "work" / "people.csv.eml", store, "customers")
    return store


@pytest.fixture(scope="module")
def sctx(kms: LocalKms, spark: object, base: Path) -> Iterator[TrustedContext]:
    with TrustedContext(engine="spark", kms=kms, spark_session=spark) as context:
        context.read(base / "work" / "people.csv.eml", format="csv", name="people")
        yield context


def fit(sctx: TrustedContext, query: str, target: str, **params: Any) -> Trained:
    data = spark_ml.features(sctx.sql(query), FEATURES, target)
    train_set, holdout = spark_ml.split(data, 0.2, seed=1)
    model = spark_ml.train("linear", train_set, **params)
    return Trained(data, model, spark_ml.predict(model, holdout), spark_ml.export_onnx(model, data))


@pytest.fixture(scope="module")
def regression(sctx: TrustedContext) -> Trained:
    return fit(sctx, REGRESSION, "salary")


@pytest.fixture(scope="module")
def classification(sctx: TrustedContext) -> Trained:
    return fit(sctx, CLASSIFICATION, "high_salary", maxIter=10)  # L-BFGS: one Spark job per iteration


@pytest.fixture
def output(tmp_path: Path) -> Path:
    """Where a test writes models; must never hold plaintext."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


# -- training and ONNX parity -----------------------------------------------------------


def test_regression_on_encrypted_people_exports_to_onnx_that_predicts_what_spark_predicts(
    regression: Trained, sctx: TrustedContext, base: Path
) -> None:
    metrics = spark_ml.evaluate(regression.holdout)
    (onnx_out,) = predict_onnx(regression.onnx_bytes, regression.holdout.rows)

    assert regression.data.task == "regression"
    assert regression.data.inputs == (
        TensorSpec("age", "FLOAT"),
        TensorSpec("job", "STRING"),
        TensorSpec("city", "STRING"),
    )
    assert set(metrics) == {"r2", "mae"}
    assert metrics["r2"] > 0.85
    assert onnx_out.shape == (len(regression.holdout), 1)
    np.testing.assert_allclose(onnx_out.ravel(), regression.holdout.prediction, rtol=1e-5, atol=1.0)
    assert spark_ml.check_onnx_parity(regression.onnx_bytes, regression.holdout) < 1.0
    assert spark_ml.export_onnx(regression.model, regression.data) == regression.onnx_bytes  # reproducible
    assert_no_plaintext(base / "work", sctx.temp_directory)


def test_classifier_exports_spark_s_labels_exactly_and_its_probabilities_closely(classification: Trained) -> None:
    labels, probabilities = predict_onnx(classification.onnx_bytes, classification.holdout.rows)

    assert classification.data.task == "classification"
    assert np.array_equal(labels, classification.holdout.prediction)
    assert classification.holdout.probabilities is not None
    np.testing.assert_allclose(probabilities, classification.holdout.probabilities, rtol=1e-5, atol=1e-5)
    metrics = spark_ml.evaluate(classification.holdout)
    assert metrics["accuracy"] > 0.85
    assert metrics["roc_auc"] > 0.9


def test_the_onnx_contract_is_the_same_as_scikit_learn_models(regression: Trained, classification: Trained) -> None:
    types = ["FLOAT", "STRING", "STRING"]
    inputs = tuple(TensorSpec(name, kind, (-1, 1)) for name, kind in zip(FEATURES, types, strict=True))

    assert ModelMetadata.from_onnx(regression.onnx_bytes, name=NAME) == ModelMetadata(
        NAME, 1, inputs, (TensorSpec("variable", "FLOAT", (-1, 1)),)
    )
    assert ModelMetadata.from_onnx(classification.onnx_bytes, name=NAME).outputs == (
        TensorSpec("label", "INT64", (-1,)),
        TensorSpec("probabilities", "FLOAT", (-1, 2)),
    )


def test_unseen_categories_predict_the_same_in_spark_and_onnx(regression: Trained, sctx: TrustedContext) -> None:
    rows = {
        "age": [30.0, 45.0, 52.0],
        "job": ["Astronaut", "Nurse", "Astronaut"],
        "city": ["Atlantis", "Atlantis", "Paris"],
        "salary": [1.0, 1.0, 1.0],
    }
    frame = sctx.spark.createDataFrame(pa.table(rows))

    unseen = spark_ml.predict(regression.model, spark_ml.features(frame, FEATURES, "salary"))

    (onnx_out,) = predict_onnx(regression.onnx_bytes, unseen.rows)
    np.testing.assert_allclose(onnx_out.ravel(), unseen.prediction, rtol=1e-5, atol=1.0)


# -- the sealed model -------------------------------------------------------------------


def test_the_sealed_model_loads_and_its_header_tells_a_server_what_to_feed(
    regression: Trained, kms: LocalKms, output: Path, sctx: TrustedContext
) -> None:
    path = output / "model.onnx.eml"
    metadata = ModelMetadata.from_onnx(regression.onnx_bytes, name=NAME, version=2)

    save_encrypted_model(regression.onnx_bytes, path, kms, "customers", metadata=metadata)

    header = read_model_metadata(path)  # no key needed
    assert header == metadata
    assert load_encrypted_model(path, kms, expected=header) == regression.onnx_bytes
    assert (path.stat().st_mode & 0o777) == 0o600
    assert not [m for m in ONNX_MARKERS if m in path.read_bytes()]
    assert_no_plaintext(output, sctx.temp_directory)


def test_the_model_under_the_wrong_key_material_is_an_integrity_error(regression: Trained, output: Path) -> None:
    path = output / "model.onnx.eml"
    metadata = ModelMetadata.from_onnx(regression.onnx_bytes, name=NAME)
    save_encrypted_model(regression.onnx_bytes, path, Session("broker", [RELEASED], {}), "customers", metadata=metadata)
    impostor = Session("broker", [ReleasedKey("customers", RELEASED.key_id, 1, bytes(32))], {})

    with pytest.raises(IntegrityError, match=r"model\.onnx\.eml: "):
        load_encrypted_model(path, impostor)


# -- attacks on the input -----------------------------------------------------------------


def test_input_under_the_wrong_key_fails_before_training_and_writes_no_model(
    spark: object, base: Path, output: Path
) -> None:
    encrypted = output / "people-broker.csv.eml"
    encrypt_file(base / "plain" / "people.csv", encrypted, Session("broker", [RELEASED], {}), "customers")
    impostor = Session("broker", [ReleasedKey("customers", RELEASED.key_id, 1, bytes(32))], {})

    with (
        TrustedContext(engine="spark", kms=impostor, spark_session=spark) as ctx,
        pytest.raises(IntegrityError),
    ):
        ctx.read(encrypted, format="csv", name="people")
    assert sorted(p.name for p in output.iterdir()) == ["people-broker.csv.eml"]


def test_a_tampered_parquet_page_fails_before_a_model_exists(sctx: TrustedContext, output: Path) -> None:
    table = output / "people.parquet"
    sctx.write(sctx.sql(REGRESSION), table, format="parquet", key="customers")  # only the columns trained on
    data = bytearray(table.read_bytes())
    data[len(data) // 3] ^= 0x01
    table.write_bytes(bytes(data))
    sctx.read(table, format="parquet", name="tampered")  # the footer is intact: pages are read lazily
    tampered = sctx.sql("SELECT cast(age AS float) AS age, job, city, cast(salary AS double) AS salary FROM tampered")
    unchecked = spark_ml.SparkFeatures(
        tampered.dataframe,  # type: ignore[attr-defined]
        (TensorSpec("age", "FLOAT"), TensorSpec("job", "STRING"), TensorSpec("city", "STRING")),
        "salary",
        "regression",
    )

    with pytest.raises(IntegrityError, match="cannot be decrypted"):
        spark_ml.features(sctx.sql("SELECT * FROM tampered"), FEATURES, "salary")
    with pytest.raises(IntegrityError, match="cannot be decrypted"):
        spark_ml.train("linear", unchecked)  # even without the check, Spark's own job fails cleanly

    assert sorted(p.name for p in output.iterdir()) == ["people.parquet"]
    assert_no_plaintext(output, sctx.temp_directory)


# -- what cannot be exported ------------------------------------------------------------------


def test_tree_models_are_refused_with_what_works_instead(regression: Trained, sctx: TrustedContext) -> None:
    from pyspark.ml import PipelineModel
    from pyspark.ml.feature import Binarizer
    from pyspark.ml.regression import DecisionTreeRegressor

    with pytest.raises(ConfigError, match="'random_forest' cannot be trained and exported on Spark") as caught:
        spark_ml.train("random_forest", regression.data)  # type: ignore[arg-type]
    assert "plaintext" in caught.value.hint
    assert "enclaveml.analytics.ml" in caught.value.hint

    tree = DecisionTreeRegressor(featuresCol="eml__features", labelCol="salary", maxDepth=2)
    assembled = regression.model.stages[:-1]
    with_tree = PipelineModel([*assembled, tree.fit(PipelineModel(assembled).transform(regression.data.frame))])
    refused = r"stage 3 \(DecisionTreeRegressionModel\) cannot be exported without writing it to disk"
    with pytest.raises(ConfigError, match=refused) as caught:
        spark_ml.export_onnx(with_tree, regression.data)
    assert "plaintext" in caught.value.hint

    with pytest.raises(ConfigError, match=r"stage 0 \(Binarizer\) is not a stage this export supports"):
        spark_ml.export_onnx(PipelineModel([Binarizer(inputCol="age", outputCol="old")]), regression.data)


def test_nulls_and_labels_other_than_0_and_1_are_refused(sctx: TrustedContext) -> None:
    frame = sctx.spark.createDataFrame(pa.table({"age": [30, None], "job": ["Nurse", "Nurse"], "grade": [2, 1]}))

    with pytest.raises(ConfigError, match="column 'age' has 1 nulls"):
        spark_ml.features(frame, ["age", "job"], "grade")
    with pytest.raises(ConfigError, match="values other than 0 and 1"):
        spark_ml.features(frame.where("age IS NOT NULL"), ["age", "job"], "grade", task="classification")
    with pytest.raises(ConfigError, match="the target 'job' has type string"):
        spark_ml.features(frame, ["age"], "job")


# -- the example -----------------------------------------------------------------------


def run_example(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``examples/train_model.py`` in this process: it reuses the module's running SparkSession (as under
    spark-submit) instead of starting a JVM of its own, and leaves it running."""
    spec = importlib.util.spec_from_file_location("train_model_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    code = example.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def local_store_env(base: Path, kms: LocalKms, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example finds the module's key store (and its encrypted people.csv) through the environment."""
    monkeypatch.setenv("ENCLAVEML_HOME", str(base / "home"))
    monkeypatch.setenv("ENCLAVEML_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv(SESSION_FD_ENV, raising=False)


@pytest.mark.usefixtures("local_store_env", "spark")
def test_train_model_example_on_spark_end_to_end(
    base: Path, kms: LocalKms, output: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = output / "spark.onnx.eml"
    args = [str(base / "work" / "people.csv.eml"), str(model), "--kms", "local", "--engine", "spark", "--name", NAME]

    code, out, err = run_example(args, capsys)

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].endswith("holdout; model: spark linear regression")
    assert re.fullmatch(r"holdout: r2 0\.(8|9)\d+, mae \d+\.\d+", lines[1])
    assert lines[2].startswith("onnx parity: max |onnxruntime - spark| = ")
    onnx_bytes = load_encrypted_model(model, kms)
    assert read_model_metadata(model) == ModelMetadata.from_onnx(onnx_bytes, name=NAME)
    assert sorted(p.name for p in output.iterdir()) == ["spark.onnx.eml"]
    assert_no_plaintext(output)


@pytest.mark.parametrize(
    ("attack", "code", "message"),
    [
        ("a flipped byte", 4, "failed authentication"),
        ("another key store's key", 5, r"key k-[0-9a-f]+ is not in key store"),
    ],
    ids=["tampered", "wrong-key"],
)
@pytest.mark.usefixtures("local_store_env", "spark")
def test_train_model_example_on_spark_fails_in_one_line_and_writes_nothing(
    attack: str, code: int, message: str, base: Path, output: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    people = output / "people.csv.eml"
    if attack == "a flipped byte":
        data = bytearray((base / "work" / "people.csv.eml").read_bytes())
        data[len(data) // 2] ^= 0x01
        people.write_bytes(bytes(data))
    else:
        other = LocalKms.init(output / "other" / "keystore.json", "another passphrase", kdf=SCRYPT_FAST_FOR_TESTS)
        other.create_key("customers")
        encrypt_file(base / "plain" / "people.csv", people, other, "customers")
        shutil.rmtree(output / "other")

    result = run_example([str(people), str(output / "m.onnx.eml"), "--kms", "local", "--engine", "spark"], capsys)

    assert result[0] == code
    assert result[1] == ""
    assert result[2].count("\n") == 1
    assert re.match(rf"error: .*{message}", result[2])
    assert sorted(p.name for p in output.iterdir()) == ["people.csv.eml"]
