"""TPC-H on the Spark engine: the same data directories, queries and answer checks as on DuckDB.

Tables must be standard-flavour encrypted Parquet (``enclaveml tpch gen --flavour standard``),
or plaintext with ``plain=True``; parquet-mr decrypts them with our ``EnclaveKmsClient``
(``spark_engine``). The query texts are DuckDB's ``tpch`` extension's, which Spark SQL parses as they are.
DECIMAL columns are scanned as DOUBLE (``_as_doubles``) so averages and ratios match
DuckDB's reference answers; encrypted and plaintext runs are treated alike.
A query's time is Spark's execute + collect in the driver.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from enclaveml.analytics.spark_engine import SparkEngine, _spark_errors, secure_spark_session, stop_spark_session
from enclaveml.analytics.tpch import TABLES, QueryResult, connect, load_tpch_extension, query_text, read_manifest
from enclaveml.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from enclaveml.kms import KeyManagementService

__all__ = ["register_tables", "run_spark", "timed_spark_query"]


def _as_doubles(frame: DataFrame) -> DataFrame:
    """DECIMAL columns as DOUBLE: Spark's avg / division of decimals rounds to 4-6 decimal places,
    where DuckDB (whose answers we check against) computes them in double precision."""
    from pyspark.sql import functions
    from pyspark.sql.types import DecimalType

    return frame.select(
        *(
            functions.col(f.name).cast("double").alias(f.name) if isinstance(f.dataType, DecimalType) else f.name
            for f in frame.schema.fields
        )
    )


def register_tables(session: SparkSession, data_dir: Path, *, plain: bool) -> None:
    """One temp view per TPC-H table in ``session`` (which holds the keys, unless ``plain``)."""
    from enclaveml.crypto.parquet import parquet_flavour

    manifest = read_manifest(data_dir)
    for table in TABLES:
        paths = manifest.paths(data_dir, table)
        for path in paths:
            flavour = parquet_flavour(path)
            if plain != (flavour == "plain"):
                raise ConfigError(
                    f"{path} is {'encrypted' if flavour != 'plain' else 'not encrypted'}",
                    "run without --plain" if plain else "pass --plain to run on plaintext tables",
                )
            if flavour == "duckdb":
                raise ConfigError(
                    f"{path} is DuckDB-flavour encrypted Parquet, which Spark cannot read",
                    "generate with `enclaveml tpch gen --flavour standard`, or convert with convert_parquet",
                )
        with _spark_errors(f"table {table} in {data_dir}"):
            _as_doubles(session.read.parquet(*(str(p) for p in paths))).createOrReplaceTempView(table)


def timed_spark_query(session: SparkSession, query: int, sql: str) -> QueryResult:
    """Execute + collect ``sql`` in ``session``; decryption failures become enclaveml errors."""
    started = time.perf_counter()
    with _spark_errors(f"TPC-H query {query}: a table"):
        frame = session.sql(sql)
        rows = [tuple(row) for row in frame.collect()]
    return QueryResult(query, time.perf_counter() - started, tuple(frame.columns), rows)


def run_spark(
    data_dir: str | os.PathLike[str],
    queries: Iterable[int],
    *,
    kms: KeyManagementService | None = None,
    plain: bool = False,
    progress: Callable[[QueryResult], None] | None = None,
    spark: SparkSession | None = None,
) -> list[QueryResult]:
    """Run TPC-H ``queries`` on ``data_dir`` with Spark (``spark``, default a new ``secure_spark_session``)."""
    directory = Path(data_dir)
    read_manifest(directory)  # fail before a JVM starts
    con = connect()
    try:
        load_tpch_extension(con)
        texts = {query: query_text(con, query) for query in queries}
    finally:
        con.close()
    if not plain and kms is None:
        raise ConfigError(f"{directory} is encrypted and no KMS was given", "open the key store (not --plain)")
    base = spark if spark is not None else secure_spark_session()
    engine = SparkEngine(kms, spark=base) if kms is not None and not plain else None
    session = engine.spark if engine is not None else base.newSession()
    try:
        register_tables(session, directory, plain=plain)
        results = []
        for query, sql in texts.items():
            result = timed_spark_query(session, query, sql)
            results.append(result)
            if progress is not None:
                progress(result)
        return results
    finally:
        if engine is not None:
            engine.close()
        if spark is None:
            stop_spark_session(base)
