"""Spark ML on encrypted DataFrames: fit a ``pyspark.ml`` pipeline in the runtime, export it to ONNX, seal it.

The Spark twin of ``ml`` (scikit-learn / XGBoost). The data comes from
``TrustedContext(engine="spark")``: its reads decrypt in the driver or in parquet-mr, and the
hardened session (``spark_engine``) encrypts RPC, shuffle and spill. The fitted
``PipelineModel`` lives in the JVM's memory; it leaves only as ONNX bytes (onnxmltools'
``convert_sparkml``) sealed by ``ml.save_encrypted_model``. **Spark's own ``model.save()`` /
``model.write()`` is never called: it writes the model as plaintext Parquet and JSON files.**

=========================  ================================================================
call                       does
=========================  ================================================================
``features``               a Spark query answer → ``SparkFeatures``: numeric columns cast to
                           float (the values ONNX's float input carries), string columns as
                           categories, the target as double; nulls refused (one Spark job)
``split``                  a seeded ``randomSplit`` holdout
``train``                  ``Pipeline([StringIndexer, OneHotEncoder, VectorAssembler, model])``
                           with ``LinearRegression`` or binary ``LogisticRegression``
``predict``                the holdout's rows and Spark's predictions, collected over Arrow
``evaluate``               ``r2`` / ``mae``, or ``accuracy`` / ``roc_auc`` (``ml``'s names)
``export_onnx``            ``convert_sparkml``; one input per column, ``ml``'s output names
``check_onnx_parity``      onnxruntime on the collected rows == Spark's predictions?
=========================  ================================================================

What onnxmltools 1.16 can and cannot do here (checked, not assumed):

- Supported and exported: ``StringIndexerModel`` (→ ``LabelEncoder``), ``OneHotEncoderModel``
  with ``handleInvalid``/``dropLast`` of ``keep``/``True`` or ``error``/``False``,
  ``VectorAssembler`` (→ ``Concat``), ``LinearRegressionModel``, ``LogisticRegressionModel``
  with two classes. Opset 15 at most.
- Tree models (``RandomForest*``, ``DecisionTree*``, ``GBT*``) are refused: the converter
  reads their trees by *saving the model to disk in plaintext* (``model.write().save`` into
  the temp or Spark local directory, never removed) and turns categorical splits on one-hot features into
  thresholds (a 10-tree forest was off by up to 79 000 on salaries). Train forests with
  ``ml.train`` on ``result.to_arrow()`` instead.
- Multi-class ``LogisticRegression`` is refused: the converter computes normalised sigmoids
  where Spark computes a softmax.
- ``onnxmltools.convert.sparkml`` imports pandas (for its Word2Vec converter): a dependency
  of this module's export.
- Its ``LogisticRegression`` converter pretty-prints the coefficients to stdout;
  ``export_onnx`` swallows that output (``contextlib.redirect_stdout``, process-wide for the call).
- The graph it emits imports both ``""`` and ``"ai.onnx"`` (the same domain), which
  ``onnx.checker`` rejects; ``export_onnx`` folds them into ``""`` at the higher version and
  renames the outputs to ``ml``'s (``variable``; ``label``, ``probabilities``), so a server
  sees one contract whichever engine trained the model.

Unseen categories: ``StringIndexer(handleInvalid="keep")`` gives them one extra index whose
one-hot column is all zeros in training, so its coefficient is 0; ONNX's ``LabelEncoder``
maps them to -1, which one-hot encodes as zeros. Both predict the same.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from enclaveml.analytics.context import Result
from enclaveml.analytics.ml import Features, Task, TensorSpec, predict_onnx
from enclaveml.analytics.ml import features as arrow_features
from enclaveml.analytics.spark_engine import SparkResult, _spark_errors
from enclaveml.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.ml import PipelineModel
    from pyspark.sql import DataFrame

__all__ = [
    "ONNX_OPSET",
    "PARITY_TOLERANCE",
    "SparkFeatures",
    "SparkKind",
    "SparkPredictions",
    "check_onnx_parity",
    "evaluate",
    "export_onnx",
    "features",
    "predict",
    "split",
    "train",
]

SparkKind = Literal["linear"]

ONNX_OPSET = 15
"""The highest ``ai.onnx`` opset onnxmltools 1.16's Spark ML converters accept."""

PARITY_TOLERANCE = 1e-5
"""``check_onnx_parity``: relative tolerance; absolute too, scaled by the largest regression prediction."""

# Spark columns the pipeline adds; a prefix no SQL alias is likely to take.
_PREFIX = "eml__"
_PREDICTION = f"{_PREFIX}prediction"
_PROBABILITY = f"{_PREFIX}probability"
_FEATURES = f"{_PREFIX}features"
_INPUT_SUBJECT = "the training data's encrypted input"
_FOREST_HINT = (
    "onnxmltools exports Spark tree models only by saving them to disk in plaintext; train trees with "
    "enclaveml.analytics.ml (scikit-learn / XGBoost) on result.to_arrow(), or use kind 'linear' on Spark"
)
_SUPPORTED_STAGES = (
    "StringIndexerModel",
    "OneHotEncoderModel",
    "VectorAssembler",
    "LinearRegressionModel",
    "LogisticRegressionModel",
)


@dataclass(frozen=True)
class SparkFeatures:
    """Training data as a Spark DataFrame: the ``inputs`` columns (float or string) and ``target`` (double)."""

    frame: DataFrame
    inputs: tuple[TensorSpec, ...]
    target: str
    task: Task

    def count(self) -> int:
        """The number of rows (runs a Spark job)."""
        with _spark_errors(_INPUT_SUBJECT):
            return int(self.frame.count())


@dataclass(frozen=True)
class SparkPredictions:
    """Rows collected from Spark with its answers: ``rows`` (``ml.Features``, the ONNX feeds) and the predictions.

    ``prediction`` is float64 (regression) or int64 labels; ``probabilities`` is
    ``(rows, 2)`` float64 for classification, else ``None``.
    """

    rows: Features
    prediction: npt.NDArray[Any]
    probabilities: npt.NDArray[np.float64] | None

    def __len__(self) -> int:
        return len(self.rows)


def features(
    data: Result | DataFrame, columns: Sequence[str], target: str, *, task: Task | None = None
) -> SparkFeatures:
    """``columns`` of the Spark query answer ``data`` as inputs, ``target`` as what to predict.

    Numeric and boolean columns become ``FLOAT`` inputs (cast to float, so Spark trains on
    exactly the values the ONNX float input will carry); string columns become ``STRING``
    inputs. ``task`` defaults to ``classification`` for a boolean target, ``regression``
    for a numeric one; classification takes a boolean or 0/1 target. Nulls are a
    ``ConfigError`` (filter or fill them in SQL). One Spark job checks nulls and labels,
    so a tampered or undecryptable input fails here (``IntegrityError``), before training.
    """
    from pyspark.sql import functions as sf
    from pyspark.sql import types as st

    if isinstance(data, SparkResult):
        frame = data.dataframe
    elif isinstance(data, Result):
        raise ConfigError("this is a DuckDB result", "use enclaveml.analytics.ml, or TrustedContext(engine='spark')")
    else:
        frame = data
    if not columns:
        raise ConfigError("no feature columns given", "name at least one column")
    if target in columns:
        raise ConfigError(f"the target {target!r} is also a feature column", "leave it out of the columns")
    types = {field.name: field.dataType for field in frame.schema.fields}
    missing = [c for c in (*columns, target) if c not in types]
    if missing:
        raise ConfigError(f"no column {missing[0]!r} in the data", f"columns: {', '.join(types)}")
    selected: list[Any] = []
    inputs: list[TensorSpec] = []
    for name in columns:
        kind = types[name]
        if isinstance(kind, st.StringType):
            selected.append(sf.col(name))
            inputs.append(TensorSpec(name, "STRING"))
        elif isinstance(kind, st.NumericType | st.BooleanType):
            selected.append(sf.col(name).cast("float").alias(name))
            inputs.append(TensorSpec(name, "FLOAT"))
        else:
            raise ConfigError(
                f"column {name!r} has type {kind.simpleString()}", "cast it to a number or a string in SQL"
            )
    target_type = types[target]
    chosen: Task = task or ("classification" if isinstance(target_type, st.BooleanType) else "regression")
    if not isinstance(target_type, st.NumericType | st.BooleanType):
        raise ConfigError(
            f"the target {target!r} has type {target_type.simpleString()}",
            "Spark ML takes a numeric target, or for classification a boolean or 0/1 (CASE WHEN ... in SQL)",
        )
    label = sf.col(target).cast("double")
    prepared = frame.select(*selected, label.alias(target))
    _check_values(prepared, [spec.name for spec in inputs], target, chosen)
    return SparkFeatures(prepared, tuple(inputs), target, chosen)


def _check_values(frame: DataFrame, columns: list[str], target: str, task: Task) -> None:
    """Nulls in any column, or labels other than 0/1: ``ConfigError``. One aggregate job."""
    from pyspark.sql import functions as sf

    counts = [sf.sum(sf.col(c).isNull().cast("long")).alias(c) for c in (*columns, target)]
    counts.append(sf.sum((~sf.col(target).isin(0.0, 1.0)).cast("long")).alias(f"{_PREFIX}bad_labels"))
    with _spark_errors(_INPUT_SUBJECT):
        row = frame.agg(*counts).collect()[0]
    for name in (*columns, target):
        if row[name]:
            raise ConfigError(f"column {name!r} has {row[name]} nulls", "filter or fill them in SQL")
    if task == "classification" and row[f"{_PREFIX}bad_labels"]:
        raise ConfigError(
            f"the target {target!r} has values other than 0 and 1",
            "Spark ML classification here is binary: a boolean or 0/1 target (CASE WHEN ... in SQL)",
        )


def split(data: SparkFeatures, test_fraction: float = 0.2, *, seed: int = 0) -> tuple[SparkFeatures, SparkFeatures]:
    """A seeded ``randomSplit``: about ``1 - test_fraction`` of the rows to train on, the rest to hold out."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be between 0 and 1")
    train_frame, test_frame = data.frame.randomSplit([1.0 - test_fraction, test_fraction], seed=seed)
    return (
        SparkFeatures(train_frame, data.inputs, data.target, data.task),
        SparkFeatures(test_frame, data.inputs, data.target, data.task),
    )


# -- training ---------------------------------------------------------------------------


def train(kind: SparkKind, data: SparkFeatures, **params: Any) -> PipelineModel:
    """Fit ``Pipeline([StringIndexer, OneHotEncoder, VectorAssembler, model])`` on ``data``.

    ``kind`` is ``linear``: ``LinearRegression(regParam=0.01)`` (standardised internally) or
    ``LogisticRegression(family="binomial")``; ``params`` go to the estimator. String inputs
    are indexed (``handleInvalid="keep"``) and one-hot encoded (``handleInvalid="keep"``,
    ``dropLast=True``): every category keeps its own column, and an unseen one predicts like
    ONNX does (module docstring). The model stays in memory.
    """
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import OneHotEncoder, StringIndexer, VectorAssembler
    from pyspark.ml.regression import LinearRegression

    if kind != "linear":
        hint = _FOREST_HINT if kind in ("random_forest", "xgboost") else "use kind 'linear'"
        raise ConfigError(f"model kind {kind!r} cannot be trained and exported on Spark", hint)
    strings = [spec.name for spec in data.inputs if spec.type == "STRING"]
    stages: list[Any] = []
    if strings:
        indexed = [f"{_PREFIX}index_{name}" for name in strings]
        stages.append(StringIndexer(inputCols=strings, outputCols=indexed, handleInvalid="keep"))
        stages.append(
            OneHotEncoder(
                inputCols=indexed,
                outputCols=[f"{_PREFIX}onehot_{name}" for name in strings],
                handleInvalid="keep",
                dropLast=True,
            )
        )
    assembled = [f"{_PREFIX}onehot_{s.name}" if s.type == "STRING" else s.name for s in data.inputs]
    stages.append(VectorAssembler(inputCols=assembled, outputCol=_FEATURES))
    common = {"featuresCol": _FEATURES, "labelCol": data.target, "predictionCol": _PREDICTION}
    if data.task == "regression":
        # A touch of L2: a one-hot column per category next to the intercept is collinear, and
        # without it Spark's Cholesky solve fails and it retries with slower quasi-Newton.
        stages.append(LinearRegression(**{**common, "regParam": 0.01, **params}))
    else:
        model = {**common, "probabilityCol": _PROBABILITY, "rawPredictionCol": f"{_PREFIX}raw", "family": "binomial"}
        stages.append(LogisticRegression(**{**model, **params}))
    with _spark_errors(_INPUT_SUBJECT):
        return Pipeline(stages=stages).fit(data.frame)


def predict(model: PipelineModel, data: SparkFeatures) -> SparkPredictions:
    """Spark's predictions for the rows of ``data`` (a holdout), collected with the rows themselves (one job)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as sf

    names = [spec.name for spec in data.inputs]
    answer = model.transform(data.frame)
    columns = [*names, data.target, _PREDICTION]
    if data.task == "classification":
        answer = answer.withColumn(_PROBABILITY, vector_to_array(sf.col(_PROBABILITY)))
        columns.append(_PROBABILITY)
    with _spark_errors(_INPUT_SUBJECT):
        table = answer.select(*columns).toArrow()  # over pyspark's socket, not a file
    collected = arrow_features(table, names)
    y = table.column(data.target).to_numpy()
    prediction = table.column(_PREDICTION).to_numpy()
    probabilities = None
    if data.task == "classification":
        y, prediction = y.astype(np.int64), prediction.astype(np.int64)
        values = table.column(_PROBABILITY).combine_chunks().flatten().to_numpy()
        probabilities = np.asarray(values, dtype=np.float64).reshape(table.num_rows, -1)
    rows = Features(collected.x, y, collected.inputs, data.target, data.task)
    return SparkPredictions(rows, prediction, probabilities)


def evaluate(predictions: SparkPredictions) -> dict[str, float]:
    """``r2`` and ``mae``, or ``accuracy`` (and ``roc_auc`` when both classes occur), as ``ml.evaluate`` names them."""
    from sklearn import metrics  # type: ignore[import-untyped]

    y = predictions.rows.y
    if predictions.rows.task == "regression":
        return {
            "r2": float(metrics.r2_score(y, predictions.prediction)),
            "mae": float(metrics.mean_absolute_error(y, predictions.prediction)),
        }
    scores = {"accuracy": float(metrics.accuracy_score(y, predictions.prediction))}
    if predictions.probabilities is not None and len(np.unique(np.asarray(y))) == 2:
        scores["roc_auc"] = float(metrics.roc_auc_score(y, predictions.probabilities[:, 1]))
    return scores


# -- ONNX -------------------------------------------------------------------------------


def _check_stages(model: Any) -> None:
    """``ConfigError`` naming the first stage onnxmltools cannot convert faithfully (module docstring)."""
    from pyspark.ml import PipelineModel

    if not isinstance(model, PipelineModel):
        raise ConfigError(
            f"a {type(model).__name__} cannot be exported here", "export the PipelineModel that train() returns"
        )
    stages: list[Any] = list(model.stages)
    for position, stage in enumerate(stages):
        name = type(stage).__name__
        where = f"stage {position} ({name})"
        if any(word in name for word in ("Forest", "Tree", "GBT")):
            raise ConfigError(f"{where} cannot be exported without writing it to disk in plaintext", _FOREST_HINT)
        if name not in _SUPPORTED_STAGES:
            raise ConfigError(
                f"{where} is not a stage this export supports", f"supported: {', '.join(_SUPPORTED_STAGES)}"
            )
        if name == "LogisticRegressionModel" and stage.numClasses != 2:
            raise ConfigError(
                f"{where} has {stage.numClasses} classes", "onnxmltools exports binary logistic regression only"
            )
        if name == "OneHotEncoderModel" and (stage.getHandleInvalid(), stage.getDropLast()) not in (
            ("keep", True),
            ("error", False),
        ):
            raise ConfigError(
                f"{where} has handleInvalid={stage.getHandleInvalid()!r}, dropLast={stage.getDropLast()}",
                "ONNX reproduces handleInvalid='keep' with dropLast=True, or 'error' with dropLast=False",
            )
        if name == "StringIndexerModel" and stage.getHandleInvalid() == "skip":
            raise ConfigError(f"{where} skips unseen categories", "use handleInvalid='keep' (or 'error')")


def export_onnx(
    model: PipelineModel, inputs: SparkFeatures | Sequence[TensorSpec], *, graph_name: str = "enclaveml"
) -> bytes:
    """The fitted ``model`` as ONNX bytes: one ``[-1, 1]`` input per feature column, named like it.

    Outputs as ``ml.export_onnx`` names them: ``variable`` (float ``[-1, 1]``) for
    regression; ``label`` (int64 ``[-1]``) and ``probabilities`` (float ``[-1, 2]``) for
    classification. Opsets ``ai.onnx`` 13 and ``ai.onnx.ml`` 2. The same model gives the
    same bytes. Stages onnxmltools cannot convert faithfully are a ``ConfigError`` naming the
    stage, raised before the converter runs (so a tree model is never written to disk).
    Needs the live Spark session (the converter reads the Spark version from it).
    """
    from onnxmltools import convert_sparkml  # type: ignore[import-untyped]
    from onnxmltools.convert.common.data_types import (  # type: ignore[import-untyped]
        FloatTensorType,
        StringTensorType,
    )

    _check_stages(model)
    if importlib.util.find_spec("pandas") is None:  # onnxmltools' Spark ML package imports it
        raise ConfigError("onnxmltools' Spark ML converters need pandas", "install enclaveml with the spark extra")
    specs = inputs.inputs if isinstance(inputs, SparkFeatures) else tuple(inputs)
    initial_types = []
    for spec in specs:
        if spec.type not in ("FLOAT", "STRING"):
            raise ConfigError(f"input {spec.name!r} has type {spec.type}", "export_onnx takes FLOAT and STRING inputs")
        initial_types.append((spec.name, (FloatTensorType if spec.type == "FLOAT" else StringTensorType)([None, 1])))
    try:
        # The LogisticRegression converter pprints the coefficients: model parameters, kept off stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            onnx_model = convert_sparkml(model, graph_name, initial_types, target_opset=ONNX_OPSET)
    except Exception as exc:  # its errors are bare RuntimeError / TypeError / KeyError; the text may hold labels
        raise ConfigError(
            f"onnxmltools could not convert the Spark pipeline ({type(exc).__name__})",
            "build it with spark_ml.train(), or see the supported stages in docs/ml.md",
        ) from None
    last: Any = model.stages[-1]
    if type(last).__name__ == "LogisticRegressionModel":
        renames = {last.getPredictionCol(): "label", last.getProbabilityCol(): "probabilities"}
    else:
        renames = {last.getPredictionCol(): "variable"}
    _normalise(onnx_model, renames)
    return bytes(onnx_model.SerializeToString(deterministic=True))


def _normalise(onnx_model: Any, renames: dict[str, str]) -> None:
    """Fold the ``ai.onnx`` domain into ``""`` (``onnx.checker`` rejects both at once); give outputs ``ml``'s names."""
    versions: dict[str, int] = {}
    for opset in onnx_model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        versions[domain] = max(versions.get(domain, 0), opset.version)
    del onnx_model.opset_import[:]
    for domain, version in sorted(versions.items()):
        onnx_model.opset_import.add(domain=domain, version=version)
    graph = onnx_model.graph
    outputs = [value.name for value in graph.output]
    if sorted(outputs) != sorted(renames):
        raise ConfigError(f"the ONNX graph has outputs {outputs}, expected {sorted(renames)}")
    for node in graph.node:
        if node.domain == "ai.onnx":
            node.domain = ""
        for i, name in enumerate(node.output):
            node.output[i] = renames.get(name, name)
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    for value in graph.output:
        value.name = renames[value.name]


def check_onnx_parity(onnx_bytes: bytes, predictions: SparkPredictions) -> float:
    """Run the ONNX model with onnxruntime on the collected rows; returns the largest difference from Spark.

    Labels must be identical; probabilities and regression values may differ by float32
    rounding (``PARITY_TOLERANCE`` relative, and absolute, scaled by the largest
    prediction). Otherwise ``ConfigError``: the export does not reproduce this model.
    """
    if len(predictions) == 0:
        raise ConfigError("no rows to compare Spark and ONNX on", "use a larger holdout")
    outputs = predict_onnx(onnx_bytes, predictions.rows)
    if predictions.probabilities is None:
        expected, actual = predictions.prediction, outputs[0].ravel().astype(np.float64)
        atol = PARITY_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    else:
        differing = int(np.count_nonzero(outputs[0] != predictions.prediction))
        if differing:
            raise ConfigError(
                f"the ONNX export predicts other labels than Spark on {differing} of {len(predictions)} rows",
                "this pipeline does not export faithfully; see docs/ml.md",
            )
        expected, actual = predictions.probabilities, outputs[1].astype(np.float64)
        atol = PARITY_TOLERANCE
    worst = float(np.abs(actual - expected).max())
    if not np.allclose(actual, expected, rtol=PARITY_TOLERANCE, atol=atol):
        raise ConfigError(
            f"the ONNX export differs from Spark's predictions by up to {worst:.3g}",
            "this pipeline does not export faithfully; see docs/ml.md",
        )
    return worst
