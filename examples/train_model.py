"""Train a model on encrypted people.csv, check its ONNX export, and write it encrypted.

Predicts salary from age, job and city (``--task regression``), or whether a salary is over
100 000 (``--task classification``). The data and the model are plaintext only in this
process's memory; the model leaves as ``model.onnx.eml`` (EML, metadata in its header), for
``enclaveml serve``. The same script runs locally and inside an attested job::

    enclaveml datagen people people.csv --rows 100000
    enclaveml encrypt people.csv people.csv.eml --key customers
    python examples/train_model.py people.csv.eml model.onnx.eml --kms local             # ENCLAVEML_PASSPHRASE set
    enclaveml run --broker URL --keys customers --tee sim -- \\
        python examples/train_model.py people.csv.eml model.onnx.eml --kms session       # keys from attestation

It prints the holdout metric and the largest difference between onnxruntime's and
scikit-learn's predictions on the holdout rows; it fails (exit 1) if they differ by more
than float32 rounding. Errors print one line and exit non-zero.

``--engine spark`` trains a Spark ML pipeline instead (``enclaveml.analytics.spark_ml``:
``LinearRegression`` / binary ``LogisticRegression``, the only kind that exports to ONNX
without writing the model to disk) on a hardened local Spark session, and compares
onnxruntime with Spark (a mismatch is a one-line error, exit 2)::

    python examples/train_model.py people.csv.eml model.onnx.eml --kms local --engine spark
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from enclaveml.analytics import TrustedContext, spark_ml
from enclaveml.analytics.ml import (
    Features,
    ModelMetadata,
    evaluate,
    export_onnx,
    features,
    predict_onnx,
    save_encrypted_model,
    split,
    train,
)
from enclaveml.errors import EnclaveMLError

QUERIES = {
    "regression": "SELECT age, job, city, salary AS target FROM people",
    "classification": "SELECT age, job, city, salary > 100000 AS target FROM people",
}
# float32 rounding of salaries near 1e5 and of probabilities: what ONNX's float arithmetic may differ by.
TOLERANCE = {"regression": (1e-5, 1.0), "classification": (1e-5, 1e-5)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train on encrypted people.csv, export to ONNX, seal the model")
    parser.add_argument("input", help="people.csv.eml (or people.csv with --plain)")
    parser.add_argument("output", help="where to write the encrypted model (model.onnx.eml)")
    parser.add_argument("--kms", choices=["auto", "local", "session"], default="auto")
    parser.add_argument("--key", default="customers", help="primary key that encrypts the model")
    parser.add_argument("--task", choices=["regression", "classification"], default="regression")
    parser.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb", help="duckdb: scikit-learn/XGBoost")
    parser.add_argument("--kind", choices=["linear", "random_forest", "xgboost"], help="[xgboost; linear on spark]")
    parser.add_argument("--trees", type=int, default=100, help="trees for random_forest / xgboost")
    parser.add_argument("--name", help="model name in the file's header [salary, or salary-over-100k]")
    parser.add_argument("--version", type=int, default=1, help="model version in the file's header")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="the input is plaintext, on purpose")
    args = parser.parse_args(argv)
    if args.engine == "spark":
        return _train_on_spark(args)
    args.kind = args.kind or "xgboost"
    params = {} if args.kind == "linear" else {"n_estimators": args.trees, "n_jobs": 1}
    try:
        with TrustedContext(engine="duckdb", kms=None if args.kms == "auto" else args.kms) as ctx:
            ctx.read(args.input, format="csv", name="people", allow_plain=args.plain)
            data = features(ctx.sql(QUERIES[args.task]), ["age", "job", "city"], "target", task=args.task)
            train_set, holdout = split(data, 0.2, seed=args.seed)
            model = train(args.kind, train_set, seed=args.seed, **params)
            metric = evaluate(model, holdout)
            onnx_bytes = export_onnx(model, data)
            parity = _parity(model, onnx_bytes, holdout, args.task)
            name = args.name or ("salary" if args.task == "regression" else "salary-over-100k")
            metadata = ModelMetadata.from_onnx(onnx_bytes, name=name, version=args.version)
            save_encrypted_model(onnx_bytes, args.output, ctx.kms, args.key, metadata=metadata)
    except EnclaveMLError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    print(f"rows: {len(train_set)} train, {len(holdout)} holdout; model: {args.kind} {args.task}")
    print("holdout: " + ", ".join(f"{name} {value:.4f}" for name, value in metric.items()))
    print(f"onnx parity: max |onnxruntime - scikit-learn| = {parity:.3g} on {len(holdout)} rows")
    inputs = ", ".join(f"{t.name}:{t.type}" for t in metadata.inputs)
    print(f"wrote {args.output}: {len(onnx_bytes)} bytes of ONNX, {metadata.name} v{metadata.version} ({inputs})")
    return 0


def _train_on_spark(args: argparse.Namespace) -> int:
    """The same story on Spark ML: a hardened local session, parity against Spark's own predictions."""
    from pyspark.sql import SparkSession

    from enclaveml.analytics.key_source import resolve_key_source
    from enclaveml.analytics.spark_engine import secure_spark_session, stop_spark_session

    kind = args.kind or "linear"
    spark = SparkSession.getActiveSession()  # e.g. under spark-submit: reused, checked, left running
    owned = spark is None
    try:
        kms = resolve_key_source(None if args.kms == "auto" else args.kms)  # before a JVM starts
        if spark is None:  # our own session, with Spark's log lines off stderr (errors are one line there)
            spark = secure_spark_session(conf={"spark.log.level": "ERROR", "spark.ui.showConsoleProgress": "false"})
        with TrustedContext(engine="spark", kms=kms, spark_session=spark) as ctx:
            ctx.read(args.input, format="csv", name="people", allow_plain=args.plain)
            data = spark_ml.features(ctx.sql(QUERIES[args.task]), ["age", "job", "city"], "target", task=args.task)
            train_set, holdout = spark_ml.split(data, 0.2, seed=args.seed)
            model = spark_ml.train(kind, train_set)
            predictions = spark_ml.predict(model, holdout)
            metric = spark_ml.evaluate(predictions)
            onnx_bytes = spark_ml.export_onnx(model, data)
            parity = spark_ml.check_onnx_parity(onnx_bytes, predictions)
            name = args.name or ("salary" if args.task == "regression" else "salary-over-100k")
            metadata = ModelMetadata.from_onnx(onnx_bytes, name=name, version=args.version)
            save_encrypted_model(onnx_bytes, args.output, ctx.kms, args.key, metadata=metadata)
            trained_rows = train_set.count()
    except EnclaveMLError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    finally:
        if owned and spark is not None:
            stop_spark_session(spark)
    print(f"rows: {trained_rows} train, {len(predictions)} holdout; model: spark {kind} {args.task}")
    print("holdout: " + ", ".join(f"{name} {value:.4f}" for name, value in metric.items()))
    print(f"onnx parity: max |onnxruntime - spark| = {parity:.3g} on {len(predictions)} rows")
    inputs = ", ".join(f"{t.name}:{t.type}" for t in metadata.inputs)
    print(f"wrote {args.output}: {len(onnx_bytes)} bytes of ONNX, {metadata.name} v{metadata.version} ({inputs})")
    return 0


def _parity(model: Any, onnx_bytes: bytes, holdout: Features, task: str) -> float:
    """Largest difference between ONNX and scikit-learn; raises if over float32 rounding."""
    outputs = predict_onnx(onnx_bytes, holdout)
    rtol, atol = TOLERANCE[task]
    if task == "regression":
        expected, actual = model.predict(holdout.x), outputs[0].ravel()
    else:
        labels = model.predict(holdout.x)
        if not np.array_equal(outputs[0], labels):
            raise SystemExit("error: ONNX labels differ from scikit-learn's")
        expected, actual = model.predict_proba(holdout.x), outputs[1]
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        raise SystemExit(
            f"error: ONNX predictions differ from scikit-learn's by up to {np.abs(actual - expected).max()}"
        )
    return float(np.abs(actual - expected).max())


if __name__ == "__main__":
    sys.exit(main())
