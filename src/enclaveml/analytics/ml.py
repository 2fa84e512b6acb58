"""Trusted ML: train scikit-learn / XGBoost models on data read through ``TrustedContext``, export to ONNX, seal.

The whole path stays in this process's memory: Arrow table (decrypted by ``TrustedContext``)
→ numpy arrays (``features``) → a fitted scikit-learn ``Pipeline`` (``train``) → ONNX bytes
(``export_onnx``) → an EML file (``save_encrypted_model``). Nothing plaintext is written.

=========================  ================================================================
call                       does
=========================  ================================================================
``features``               Arrow / ``Result`` → ``Features``: numeric columns as float32,
                           string columns as categories, a target (regression or labels)
``split``                  a seeded holdout split of ``Features``
``train``                  ``Pipeline([prep, model])``: one-hot encoding of string columns
                           (scaling of numbers for ``linear``), then ``linear``,
                           ``random_forest`` or ``xgboost``
``evaluate``               holdout metrics: ``r2`` / ``mae``, or ``accuracy`` / ``roc_auc``
``export_onnx``            skl2onnx (onnxmltools' converter for XGBoost inside the pipeline);
                           one ONNX input per feature column, classifiers without ZipMap
``predict_onnx``           onnxruntime on those bytes: the parity check
``save_encrypted_model``   ONNX bytes → EML file (atomic), model metadata in the header
``load_encrypted_model``   EML file → verified ONNX bytes (parsed and checked with ``onnx``)
``read_model_metadata``    the header's metadata, no key needed (unauthenticated)
=========================  ================================================================

A model file may also hold a TensorFlow SavedModel (``format`` ``tf-savedmodel``): the
model server's optional second runtime seals and opens those (``serving/runtime_tf.py``);
this module only describes their header and authenticates them.

Why ONNX and never pickle: unpickling runs whatever code the file names (``__reduce__``), so a
pickled model is a program, and whoever can swap the file runs code in the enclave that holds
the keys. ONNX is data (a protobuf graph of known operators) that a runtime interprets; the
worst a bad file does is fail to load. See ``docs/ml.md``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from enclaveml._atomic import atomic_output
from enclaveml.crypto import KeyWrapper, decrypt_bytes, encrypt_bytes
from enclaveml.crypto._format import MAX_CONTEXT_VALUE, read_header
from enclaveml.errors import ConfigError, ContextMismatch, EnclaveMLError, FormatError

if TYPE_CHECKING:
    import pyarrow as pa

    from enclaveml.analytics.context import Result

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMATS",
    "SAVEDMODEL_FORMAT",
    "Features",
    "Kind",
    "ModelMetadata",
    "Task",
    "TensorSpec",
    "evaluate",
    "export_onnx",
    "features",
    "load_encrypted_model",
    "predict_onnx",
    "read_model_metadata",
    "save_encrypted_model",
    "split",
    "train",
]

Kind = Literal["linear", "random_forest", "xgboost"]
Task = Literal["regression", "classification"]

MODEL_FORMAT = "onnx"
"""The ``format`` value in an ONNX model file's header; the only one this module trains, writes or parses."""
SAVEDMODEL_FORMAT = "tf-savedmodel"
"""A TensorFlow SavedModel directory packed as a tar archive (``serving.runtime_tf``), served only beside TensorFlow."""
MODEL_FORMATS = (MODEL_FORMAT, SAVEDMODEL_FORMAT)

# ai.onnx 17 / ai.onnx.ml 3: what skl2onnx 1.17+ and onnxruntime 1.18+ (the ml extra's floors) share.
TARGET_OPSET: dict[str, int] = {"": 17, "ai.onnx.ml": 3}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KINDS = ("linear", "random_forest", "xgboost")


# -- features ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor of an ONNX model: element type (ONNX name) and shape (-1: any size)."""

    name: str
    type: str  # TensorProto.DataType name: "FLOAT", "STRING", "INT64", ...
    shape: tuple[int, ...] = (-1, 1)


@dataclass(frozen=True)
class Features:
    """Training data in memory: ``x`` (rows × columns, dtype object), ``y`` (or ``None``), their description.

    Column ``i`` of ``x`` holds ``inputs[i]``: float32 numbers for ``FLOAT``, ``str`` for
    ``STRING`` (categories). ``task`` says what ``y`` is: numbers (regression) or labels.
    """

    x: npt.NDArray[Any]
    y: npt.NDArray[Any] | None
    inputs: tuple[TensorSpec, ...]
    target: str | None
    task: Task

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, rows: npt.NDArray[np.intp]) -> Features:
        return Features(self.x[rows], None if self.y is None else self.y[rows], self.inputs, self.target, self.task)

    def onnx_feeds(self) -> dict[str, npt.NDArray[Any]]:
        """The same rows as ONNX inputs: one ``(rows, 1)`` array per column, named like the column."""
        feeds: dict[str, npt.NDArray[Any]] = {}
        for i, spec in enumerate(self.inputs):
            column = self.x[:, i : i + 1]
            feeds[spec.name] = column.astype(np.float32) if spec.type == "FLOAT" else column.astype(np.str_)
        return feeds


def features(
    data: Result | pa.Table, columns: Sequence[str], target: str | None = None, *, task: Task | None = None
) -> Features:
    """Turn the query answer ``data`` into ``Features``: ``columns`` as inputs, ``target`` as ``y``.

    Numeric and boolean columns become float32 inputs; string columns become categorical
    inputs (one-hot encoded by ``train``). ``task`` defaults to ``classification`` for a
    boolean or string target and ``regression`` for a numeric one. Nulls are refused
    (``ConfigError``): filter or fill them in SQL, where the choice is visible.
    """
    import pyarrow as pa

    table = data if isinstance(data, pa.Table) else data.to_arrow()
    if not columns:
        raise ConfigError("no feature columns given", "name at least one column")
    missing = [c for c in (*columns, *([target] if target else [])) if c not in table.column_names]
    if missing:
        raise ConfigError(f"no column {missing[0]!r} in the data", f"columns: {', '.join(table.column_names)}")
    x = np.empty((table.num_rows, len(columns)), dtype=object)
    inputs: list[TensorSpec] = []
    for i, name in enumerate(columns):
        column = _non_null(table, name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            x[:, i] = column.to_numpy(zero_copy_only=False)
            inputs.append(TensorSpec(name, "STRING"))
        elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
            # float32 here, so training sees exactly the values the ONNX float input will carry.
            x[:, i] = column.to_numpy(zero_copy_only=False).astype(np.float32)
            inputs.append(TensorSpec(name, "FLOAT"))
        else:
            raise ConfigError(f"column {name!r} has type {column.type}", "cast it to a number or a string in SQL")
    y: npt.NDArray[Any] | None = None
    chosen: Task = task or "regression"
    if target is not None:
        column = _non_null(table, target)
        categorical = pa.types.is_boolean(column.type) or pa.types.is_string(column.type)
        chosen = task or ("classification" if categorical else "regression")
        values = column.to_numpy(zero_copy_only=False)
        if chosen == "regression":
            y = values.astype(np.float64)
        else:
            y = values.astype(np.int64) if pa.types.is_boolean(column.type) else values
    return Features(x, y, tuple(inputs), target, chosen)


def _non_null(table: pa.Table, name: str) -> pa.ChunkedArray:
    column = table.column(name)
    if column.null_count:
        raise ConfigError(f"column {name!r} has {column.null_count} nulls", "filter or fill them in SQL")
    return column


def split(data: Features, test_fraction: float = 0.2, *, seed: int = 0) -> tuple[Features, Features]:
    """A holdout split: a seeded permutation, the last ``test_fraction`` of it for testing."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(data))
    cut = len(data) - max(1, round(len(data) * test_fraction))
    return data.take(order[:cut]), data.take(order[cut:])


# -- training ---------------------------------------------------------------------------


def train(kind: Kind, data: Features, *, seed: int = 0, **params: Any) -> Any:
    """Fit ``Pipeline([("prep", ColumnTransformer), ("model", estimator)])`` on ``data``; returns the pipeline.

    ``kind`` picks the estimator for ``data.task``: ``linear`` (``Ridge`` /
    ``LogisticRegression``), ``random_forest`` (``RandomForest*``, ``max_depth=12``), ``xgboost``
    (``XGBRegressor`` / ``XGBClassifier``, ``tree_method="hist"``). ``params`` are passed to
    the estimator; ``seed`` becomes its ``random_state``. String inputs are one-hot encoded
    (dense: XGBoost reads sparse zeros as *missing*, which ONNX cannot reproduce; unknown
    categories at prediction time encode as all zeros); numbers are standardised for
    ``linear`` and passed through for trees (trees do not need it, and it keeps split
    thresholds identical in ONNX's float32 arithmetic).
    """
    from sklearn.compose import ColumnTransformer  # type: ignore[import-untyped]
    from sklearn.pipeline import Pipeline  # type: ignore[import-untyped]
    from sklearn.preprocessing import OneHotEncoder, StandardScaler  # type: ignore[import-untyped]

    if kind not in _KINDS:
        raise ConfigError(f"unknown model kind {kind!r}", f"use one of {', '.join(_KINDS)}")
    if data.y is None:
        raise ConfigError("the features have no target", "pass target= to features()")
    numbers = [i for i, spec in enumerate(data.inputs) if spec.type == "FLOAT"]
    categories = [i for i, spec in enumerate(data.inputs) if spec.type == "STRING"]
    parts: list[tuple[str, Any, list[int]]] = []
    if numbers:
        parts.append(("num", StandardScaler() if kind == "linear" else "passthrough", numbers))
    if categories:
        parts.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), categories))
    pipeline = Pipeline([("prep", ColumnTransformer(parts)), ("model", _estimator(kind, data.task, seed, params))])
    pipeline.fit(data.x, data.y)
    return pipeline


def _estimator(kind: Kind, task: Task, seed: int, params: Mapping[str, Any]) -> Any:
    regression = task == "regression"
    if kind == "linear":
        from sklearn.linear_model import LogisticRegression, Ridge  # type: ignore[import-untyped]

        if regression:
            return Ridge(**{"alpha": 1.0, **params})
        return LogisticRegression(**{"max_iter": 1000, "random_state": seed, **params})
    if kind == "random_forest":
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor  # type: ignore[import-untyped]

        cls = RandomForestRegressor if regression else RandomForestClassifier
        # Depth capped: unbounded trees on 80k people rows made a 134 MB ONNX file and a worse holdout
        # r2 (0.907) than depth 12 (0.913, 8 MB).
        return cls(**{"n_estimators": 100, "max_depth": 12, "random_state": seed, **params})
    from xgboost import XGBClassifier, XGBRegressor

    cls = XGBRegressor if regression else XGBClassifier
    return cls(**{"n_estimators": 200, "max_depth": 6, "tree_method": "hist", "random_state": seed, **params})


def evaluate(model: Any, data: Features) -> dict[str, float]:
    """Metrics of ``model`` on ``data`` (a holdout): ``r2`` and ``mae``, or ``accuracy`` (and binary ``roc_auc``)."""
    from sklearn import metrics  # type: ignore[import-untyped]

    if data.y is None:
        raise ConfigError("the features have no target", "pass target= to features()")
    predicted = model.predict(data.x)
    if data.task == "regression":
        return {
            "r2": float(metrics.r2_score(data.y, predicted)),
            "mae": float(metrics.mean_absolute_error(data.y, predicted)),
        }
    scores = {"accuracy": float(metrics.accuracy_score(data.y, predicted))}
    if len(model.classes_) == 2:
        scores["roc_auc"] = float(metrics.roc_auc_score(data.y, model.predict_proba(data.x)[:, 1]))
    return scores


# -- ONNX -------------------------------------------------------------------------------


@functools.cache
def _register_xgboost_converters() -> None:
    """Teach skl2onnx (once per process) to convert XGBoost estimators in a pipeline, with onnxmltools' converter."""
    from onnxmltools.convert.xgboost.operator_converters.XGBoost import (  # type: ignore[import-untyped]
        convert_xgboost,
    )
    from skl2onnx import update_registered_converter  # type: ignore[import-untyped]
    from skl2onnx.common.shape_calculator import (  # type: ignore[import-untyped]
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )
    from xgboost import XGBClassifier, XGBRegressor

    update_registered_converter(
        XGBRegressor, "XGBoostXGBRegressor", calculate_linear_regressor_output_shapes, convert_xgboost
    )
    update_registered_converter(
        XGBClassifier,
        "XGBoostXGBClassifier",
        calculate_linear_classifier_output_shapes,
        convert_xgboost,
        options={"nocl": [True, False], "zipmap": [True, False, "columns"]},
    )


def export_onnx(model: Any, inputs: Features | Sequence[TensorSpec], *, graph_name: str = "enclaveml") -> bytes:
    """The fitted pipeline ``model`` as ONNX bytes, with one input tensor per feature column.

    ``inputs`` is the ``Features`` it was trained on (or their ``inputs``). Regressors have
    one output ``variable`` (float, ``(n, 1)``); classifiers ``label`` (int64, ``(n,)``) and
    ``probabilities`` (float, ``(n, classes)``), plain tensors (no ZipMap), so any ONNX
    runtime and KServe v2 / TF Serving can carry them. The bytes are reproducible: the same
    fitted model gives the same bytes in every process (skl2onnx's default graph name is a
    random UUID and its opset list follows set order; both are fixed here).
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType  # type: ignore[import-untyped]

    specs = inputs.inputs if isinstance(inputs, Features) else tuple(inputs)
    initial_types = []
    for spec in specs:
        if spec.type not in ("FLOAT", "STRING"):
            raise ConfigError(f"input {spec.name!r} has type {spec.type}", "export_onnx takes FLOAT and STRING inputs")
        tensor = FloatTensorType if spec.type == "FLOAT" else StringTensorType
        initial_types.append((spec.name, tensor([None, 1])))
    _register_xgboost_converters()
    estimator = model.steps[-1][1] if hasattr(model, "steps") else model
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "classes_") else None
    onnx_model = convert_sklearn(
        model, name=graph_name, initial_types=initial_types, target_opset=TARGET_OPSET, options=options
    )
    opsets = sorted((o.domain, o.version) for o in onnx_model.opset_import)
    del onnx_model.opset_import[:]
    for domain, version in opsets:
        onnx_model.opset_import.add(domain=domain, version=version)
    return bytes(onnx_model.SerializeToString(deterministic=True))


def predict_onnx(onnx_bytes: bytes, data: Features | Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
    """Run the ONNX model with onnxruntime (CPU) on ``data``; returns its outputs in graph order."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    feeds = data.onnx_feeds() if isinstance(data, Features) else dict(data)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, feeds)]


# -- encrypted model files --------------------------------------------------------------


@dataclass(frozen=True)
class ModelMetadata:
    """What a server needs before (and without) decrypting: carried in the EML header's context.

    The header is *authenticated* (it is the associated data of the key wrap and of every
    segment) but *not secret*: anyone holding the file reads it (``read_model_metadata``),
    so it holds names and types only, never data-derived values (categories, metrics).
    Context keys, each value at most 1024 bytes (``docs/format.md``):

    ===================  =========================================================
    ``format``           ``onnx`` or ``tf-savedmodel``
    ``model_name``       ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``
    ``model_version``    decimal integer ≥ 1 (the TF Serving version directory)
    ``model_inputs``     JSON ``[{"name":..., "type": "FLOAT"|"STRING"|..., "shape": [-1, 1]}]``
    ``model_outputs``    the same for the outputs
    ===================  =========================================================

    Types are ONNX ``TensorProto`` names for both formats (a SavedModel's ``DT_FLOAT`` is
    ``FLOAT``). A ``tf-savedmodel`` file sealed where its signature could not be read has
    neither ``model_inputs`` nor ``model_outputs``: ``inputs`` and ``outputs`` are then empty
    (``signature_known`` is false) and the server learns them from the model when it loads.
    """

    name: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    format: str = MODEL_FORMAT

    @property
    def signature_known(self) -> bool:
        """Whether the header lists the inputs and outputs (always for ONNX; see the class docstring)."""
        return self.format == MODEL_FORMAT or bool(self.inputs or self.outputs)

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes, *, name: str, version: int = 1) -> ModelMetadata:
        """Read the input and output names, types and shapes from the ONNX graph itself."""
        graph = _parse_onnx(onnx_bytes).graph
        return cls(name, version, _tensors(graph.input), _tensors(graph.output))

    def to_context(self) -> dict[str, str]:
        """The EML context; ``ConfigError`` if a field is invalid or too long (checked before any KMS call)."""
        # Format, name (64) and version are short and each tensor list is capped at 1024 bytes, so the
        # 4096-byte descriptor (docs/format.md 2.1) cannot overflow: no total check is needed.
        if self.format not in MODEL_FORMATS:
            raise ConfigError(f"unknown model format {self.format!r}", f"use one of {', '.join(MODEL_FORMATS)}")
        if not _NAME_RE.fullmatch(self.name):
            raise ConfigError(f"invalid model name {self.name!r}", "use letters, digits, '_', '.', '-' (1-64)")
        if self.version < 1:
            raise ConfigError(f"invalid model version {self.version}", "versions start at 1")
        context = {"format": self.format, "model_name": self.name, "model_version": str(self.version)}
        if self.signature_known:
            context["model_inputs"] = _tensors_json(self.inputs)
            context["model_outputs"] = _tensors_json(self.outputs)
        for key, value in context.items():
            if len(value.encode()) > MAX_CONTEXT_VALUE:
                raise ConfigError(
                    f"model metadata {key} is {len(value.encode())} bytes, over the header's {MAX_CONTEXT_VALUE}",
                    "use fewer feature columns, or shorter names (SQL aliases)",
                )
        return context

    @classmethod
    def from_context(cls, context: Mapping[str, str]) -> ModelMetadata:
        fmt = context.get("format")
        if fmt not in MODEL_FORMATS:
            raise FormatError(f"not an ONNX model file (format={fmt!r})")
        # A SavedModel sealed without its signature carries neither tensor list (class docstring).
        unlisted = fmt == SAVEDMODEL_FORMAT and "model_inputs" not in context and "model_outputs" not in context
        try:
            return cls(
                context["model_name"],
                int(context["model_version"]),
                () if unlisted else _tensors_from_json(context["model_inputs"]),
                () if unlisted else _tensors_from_json(context["model_outputs"]),
                fmt,
            )
        except (KeyError, ValueError, TypeError):
            raise FormatError("the model file's header metadata is incomplete or malformed") from None


def _tensors(values: Any) -> tuple[TensorSpec, ...]:
    from onnx import TensorProto

    out = []
    for value in values:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        out.append(TensorSpec(value.name, TensorProto.DataType.Name(tensor.elem_type), shape))
    return tuple(out)


def _tensors_json(tensors: Sequence[TensorSpec]) -> str:
    items = [{"name": t.name, "type": t.type, "shape": list(t.shape)} for t in tensors]
    return json.dumps(items, separators=(",", ":"))


def _tensors_from_json(text: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(str(t["name"]), t["type"], tuple(int(d) for d in t["shape"])) for t in json.loads(text))


def _parse_onnx(onnx_bytes: bytes) -> Any:
    import onnx

    try:
        model = onnx.load_model_from_string(onnx_bytes)
        onnx.checker.check_model(model)
    except Exception:  # protobuf's DecodeError and onnx's ValidationError have no common base
        raise FormatError("not a valid ONNX model") from None
    return model


def save_encrypted_model(
    onnx_bytes: bytes,
    path: str | os.PathLike[str],
    kms: KeyWrapper,
    key: str,
    *,
    metadata: ModelMetadata,
) -> None:
    """Seal ``onnx_bytes`` under primary key ``key`` into the EML file ``path``, ``metadata`` in its header.

    The bytes must parse as ONNX and match ``metadata``'s inputs and outputs (``ConfigError``
    otherwise): a server routes requests by what the header says. Encrypted in memory, then
    written to a 0600 temporary file beside ``path`` and renamed: a failure leaves no file,
    and no plaintext byte of the model ever reaches the disk.
    """
    context = metadata.to_context()
    if metadata.format != MODEL_FORMAT:
        raise ConfigError(
            f"save_encrypted_model seals ONNX models, not {metadata.format!r}",
            "seal a SavedModel directory with enclaveml.serving.runtime_tf.seal_savedmodel",
        )
    graph = ModelMetadata.from_onnx(onnx_bytes, name=metadata.name, version=metadata.version)
    if (graph.inputs, graph.outputs) != (metadata.inputs, metadata.outputs):
        raise ConfigError(
            "the metadata's inputs / outputs differ from the ONNX graph's",
            "build it with ModelMetadata.from_onnx(onnx_bytes, name=..., version=...)",
        )
    target = Path(path)
    if not target.parent.is_dir():
        raise ConfigError(f"{target.parent}: no such directory", "create the output directory first")
    sealed = encrypt_bytes(onnx_bytes, kms, key, context=context)
    with atomic_output(target, mode=0o600) as out:
        out.write(sealed)


def read_model_metadata(path: str | os.PathLike[str]) -> ModelMetadata:
    """The metadata in a model file's header, without a key. **Unauthenticated** until the file is loaded."""
    with open(path, "rb") as src:
        header = read_header(src)
    return ModelMetadata.from_context(header.bound.context_dict())


def load_encrypted_model(
    path: str | os.PathLike[str],
    kms: KeyWrapper,
    *,
    expected: ModelMetadata | None = None,
    formats: Sequence[str] = (MODEL_FORMAT,),
) -> bytes:
    """Verify and decrypt the model file ``path``; returns ONNX bytes that parse and pass ``onnx.checker``.

    Tampering anywhere (header metadata included) or a wrong key is an ``IntegrityError``; a
    key the KMS does not hold is ``KeyNotFound``; a file that is not an ONNX model file is a
    ``FormatError``. ``expected`` (e.g. what ``read_model_metadata`` showed before the key
    was released) must equal the authenticated header's metadata, else ``ContextMismatch``.
    ``formats``: the model formats accepted (``FormatError`` for another); a ``tf-savedmodel``
    file's plaintext (its tar archive) is returned authenticated but unparsed: its runtime
    checks it (``serving.runtime_tf``).
    """
    blob = Path(path).read_bytes()
    try:
        context = read_header(io.BytesIO(blob)).bound.context_dict()
        metadata = ModelMetadata.from_context(context)
        if metadata.format not in formats:
            raise FormatError(
                f"the model file holds format {metadata.format!r}, not {' or '.join(formats)}",
                "serve TensorFlow SavedModels with enclaveml serve (serving.runtime_tf)",
            )
        if expected is not None and expected != metadata:
            raise ContextMismatch("the model file's metadata differs from the expected metadata")
        # The header's own context, authenticated here: the bound header is the AAD of the key wrap.
        plaintext = bytes(decrypt_bytes(blob, kms, context=context))
        if metadata.format == MODEL_FORMAT:
            _parse_onnx(plaintext)
    except EnclaveMLError as exc:
        raise exc.about(Path(path).name) from None
    return plaintext
