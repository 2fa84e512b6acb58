"""``TrustedContext``: read encrypted CSV, JSON and Parquet, query them with SQL, write encrypted results.

The embedded engine is DuckDB, in memory, hardened against spilling plaintext
(``duckdb_connection``). Encrypted inputs are decrypted only in this process's memory:

====================  ==============================================================
input                 path into DuckDB
====================  ==============================================================
EML CSV / JSON        ``DecryptingReader`` → Arrow's parallel parser → Arrow table,
                      registered as view ``name`` once every segment verified
Parquet, DuckDB       DuckDB reads it natively; the bridge registers the file's key in
flavour               the connection (``duckdb_read_parquet_sql``) → ``CREATE TABLE``
Parquet, standard     pyarrow decrypts it (``read_encrypted_parquet``)
flavour               → Arrow table, registered
plaintext             only with ``allow_plain=True``
====================  ==============================================================

Outputs are all or nothing: a temporary file beside the target, renamed when complete.
Keys: see ``key_source`` (given KMS, else the job's attested session inside ``enclaveml
run``, else the local key store). ``engine="spark"`` delegates every method to
``spark_engine.SparkEngine`` (Spark SQL, parquet-mr encryption with our Java KmsClient).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from enclaveml.analytics.arrow_io import TextTableReader, part_files, write_text_batches
from enclaveml.analytics.duckdb_connection import connect_hardened, private_temp_directory
from enclaveml.analytics.key_source import KeySourceName, resolve_key_source
from enclaveml.crypto import KeyWrapper
from enclaveml.errors import ConfigError, IntegrityError

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa
    from pyspark.sql import SparkSession

    from enclaveml.analytics.spark_engine import SparkEngine

__all__ = ["Format", "ParquetFlavour", "Result", "TrustedContext"]

Format = Literal["csv", "json", "parquet"]
ParquetFlavour = Literal["standard", "duckdb"]
_FORMATS = ("csv", "json", "parquet")
_EXTENSIONS = {".csv", ".json", ".jsonl", ".ndjson", ".parquet", ".eml"}
# Table names are checked against this and quoted, so the f-string SQL below cannot inject (S608).
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_name_for(path: Path) -> str:
    """The default table name: the file or directory stem without ``.eml`` and format suffixes.

    ``people.csv.eml`` → ``people``; characters outside ``[A-Za-z0-9_]`` become ``_``.
    """
    name = path.name
    while (suffix := Path(name).suffix.lower()) in _EXTENSIONS and suffix != name.lower():
        name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9_]", "_", name) or "t"
    return name if not name[0].isdigit() else f"t_{name}"


def _parquet_bridge() -> Any:
    try:
        from enclaveml.crypto import parquet
    except ImportError:
        raise ConfigError(
            "encrypted Parquet is not available in this installation (enclaveml.crypto.parquet is missing)",
            "use CSV or JSON, or install enclaveml with the analytics extra",
        ) from None
    return parquet


class Result:
    """The answer of a query: a DuckDB relation, run again by each method (lazily, in DuckDB).

    ``to_arrow()`` materialises an Arrow table; ``record_batches()`` streams it;
    ``rows()`` gives Python tuples; ``to_pandas()`` needs pandas (not a dependency);
    ``show()`` prints a preview. A statement that returns no rows (``CREATE VIEW ...``)
    gives an empty result.
    """

    def __init__(self, relation: duckdb.DuckDBPyRelation | None) -> None:
        self._relation = relation

    @property
    def columns(self) -> list[str]:
        return [] if self._relation is None else list(self._relation.columns)

    def to_arrow(self) -> pa.Table:
        if self._relation is None:
            import pyarrow as pa

            return pa.table({})
        return self._relation.to_arrow_table()

    def record_batches(self, batch_size: int = 122_880) -> pa.RecordBatchReader:
        if self._relation is None:
            import pyarrow as pa

            return pa.RecordBatchReader.from_batches(pa.schema([]), [])
        return self._relation.to_arrow_reader(batch_size)

    def rows(self) -> list[tuple[Any, ...]]:
        return [] if self._relation is None else self._relation.fetchall()

    def to_pandas(self) -> Any:
        if importlib.util.find_spec("pandas") is None:
            raise ConfigError("pandas is not installed", "install pandas, or use to_arrow() / rows()")
        return self.to_arrow().to_pandas()

    def show(self, max_rows: int = 20) -> None:
        if self._relation is not None:
            self._relation.show(max_rows=max_rows)

    def __repr__(self) -> str:
        return f"Result(columns={self.columns})"


class TrustedContext:
    """Encrypted data in, SQL, encrypted data out, on one embedded DuckDB connection.

    Parameters (all keyword-only but ``engine``):

    - ``engine="duckdb"`` or ``"spark"`` (``spark_engine``: results are ``SparkResult``s).
    - ``kms=None``: a ``KeyWrapper`` (``LocalKms``, ``BrokerKms``, ``enclaveml.session()``),
      ``"session"``, ``"local"``, or ``None`` for the session inside ``enclaveml run`` and the
      local key store elsewhere (``key_source``).
    - ``temp_directory=None``: where DuckDB's private 0700 temp directory is created
      (default: the system temp directory). Spilling into it is off.
    - ``memory_limit=None``, ``threads=None``: DuckDB's settings, default DuckDB's own.
    - ``spark_session=None``: Spark only: a running SparkSession to use (its security
      settings are checked); default ``secure_spark_session()``, stopped by ``close()``.
      For Spark, ``temp_directory`` is the parent of Spark's private local directory.

    Use as a context manager, or call ``close()``: it closes DuckDB and removes its temp directory.
    """

    def __init__(
        self,
        engine: str = "duckdb",
        kms: KeyWrapper | KeySourceName | None = None,
        *,
        temp_directory: str | os.PathLike[str] | None = None,
        memory_limit: str | None = None,
        threads: int | None = None,
        spark_session: Any = None,
    ) -> None:
        if engine not in ("duckdb", "spark"):
            raise ConfigError(f"unknown engine {engine!r}", "use engine='duckdb' or engine='spark'")
        self.engine = engine
        self.kms = resolve_key_source(kms)
        self._spark: SparkEngine | None = None
        if engine == "spark":
            from enclaveml.analytics.spark_engine import SparkEngine

            self._spark = SparkEngine(self.kms, spark=spark_session, temp_directory=temp_directory)
            self.temp_directory = self._spark.local_directory
            return
        self.temp_directory = private_temp_directory(temp_directory)
        try:
            self._con = connect_hardened(self.temp_directory, memory_limit=memory_limit, threads=threads)
        except BaseException:
            shutil.rmtree(self.temp_directory, ignore_errors=True)
            raise

    # -- reading -----------------------------------------------------------------------

    def read(
        self,
        path: str | os.PathLike[str],
        format: Format = "csv",
        name: str | None = None,
        *,
        allow_plain: bool = False,
    ) -> Result:
        """Register ``path`` (a file, or a directory of part files) as table ``name``; returns all its rows.

        ``name`` defaults to the file stem (``people.csv.eml`` → ``people``). Encrypted input
        is detected from the file; plaintext is refused unless ``allow_plain=True``.
        """
        if format not in _FORMATS:
            raise ConfigError(f"unknown format {format!r}", "use csv, json or parquet")
        source = Path(path)
        parts = part_files(source)
        table = name if name is not None else table_name_for(source)
        if not _NAME_RE.fullmatch(table):
            raise ConfigError(f"invalid table name {table!r}", "use letters, digits and _, not starting with a digit")
        if self._spark is not None:
            return self._spark.read(parts, format, table, allow_plain=allow_plain)
        if format == "parquet":
            self._read_parquet(parts, table, allow_plain=allow_plain)
        else:
            self._read_text(parts, format, table, allow_plain=allow_plain)
        return Result(self._con.table(table))

    def _read_text(self, parts: list[Path], fmt: Literal["csv", "json"], table: str, *, allow_plain: bool) -> None:
        # Registered only once every part verified to its last segment: a failure leaves no table.
        # An Arrow table (not a copy into DuckDB's storage) because DuckDB scans Arrow in place.
        self._register(table, TextTableReader(parts, fmt, self.kms, allow_plain=allow_plain).read())

    def _register(self, table: str, data: pa.Table) -> None:
        with contextlib.suppress(Exception):  # a real table of that name would shadow the view
            self._con.execute(f"DROP TABLE IF EXISTS {_quote(table)}")
        self._con.register(table, data)

    def _read_parquet(self, parts: list[Path], table: str, *, allow_plain: bool) -> None:
        bridge = _parquet_bridge()
        flavours = {part: bridge.parquet_flavour(part) for part in parts}
        if set(flavours.values()) == {"plain"} and not allow_plain:
            raise ConfigError(
                f"{parts[0]} is not encrypted", "pass allow_plain=True to read plaintext Parquet on purpose"
            )
        selects: list[str] = []
        arrow_tables: list[pa.Table] = []
        for part, flavour in flavours.items():
            if flavour == "plain":
                if not allow_plain:
                    raise ConfigError(f"{part} is not encrypted", "pass allow_plain=True to mix in plaintext Parquet")
                selects.append(f"SELECT * FROM read_parquet('{_sql_string(part)}')")  # noqa: S608
            elif flavour == "duckdb":
                selects.append(f"SELECT * FROM {bridge.duckdb_read_parquet_sql(self._con, part, self.kms)}")  # noqa: S608
            else:
                arrow_tables.append(bridge.read_encrypted_parquet(part, self.kms))
        if arrow_tables and selects:
            raise ConfigError(
                f"{parts[0].parent}: mixes standard-flavour and DuckDB-flavour Parquet parts",
                "convert the parts to one flavour (see docs/analytics.md)",
            )
        import duckdb
        import pyarrow as pa

        if selects:
            # DuckDB reads and verifies these natively; loading them now (not a lazy view)
            # makes a tampered page fail here, in read(), rather than in some later query.
            body = " UNION ALL BY NAME ".join(selects)
            try:
                self._con.execute(f"CREATE OR REPLACE TABLE {_quote(table)} AS {body}")
            except duckdb.Error:
                raise IntegrityError(
                    f"{parts[0]}: DuckDB could not decrypt and verify the Parquet data (tampered, or another key)"
                ) from None
            return
        self._register(table, arrow_tables[0] if len(arrow_tables) == 1 else pa.concat_tables(arrow_tables))

    # -- querying ----------------------------------------------------------------------

    def sql(self, query: str) -> Result:
        """Run ``query`` on the registered tables; a statement without rows gives an empty ``Result``."""
        if self._spark is not None:
            return self._spark.sql(query)
        return Result(self._con.sql(query))

    def table(self, name: str) -> Result:
        if self._spark is not None:
            return self._spark.table(name)
        return Result(self._con.table(name))

    # -- writing -----------------------------------------------------------------------

    def write(
        self,
        result: Result | pa.Table,
        path: str | os.PathLike[str],
        format: Format = "csv",
        *,
        encrypted: bool = True,
        key: str = "customers",
        parquet_flavour: ParquetFlavour = "standard",
    ) -> None:
        """Write ``result`` to the file ``path``, sealed under primary key ``key`` (EML, or encrypted Parquet).

        ``encrypted=False`` writes plaintext, only when asked. ``parquet_flavour`` picks the
        encrypted Parquet dialect: ``standard`` (pyarrow / Spark read it) or ``duckdb``
        (DuckDB's fast native reader; nothing else reads it). All or nothing: the file
        appears only when complete.
        """
        if format not in _FORMATS:
            raise ConfigError(f"unknown format {format!r}", "use csv, json or parquet")
        target = Path(path)
        if not target.parent.is_dir():
            raise ConfigError(f"{target.parent}: no such directory", "create the output directory first")
        if self._spark is not None:
            self._spark.write(result, target, format, encrypted=encrypted, key=key, flavour=parquet_flavour)
            return
        if format == "parquet":
            table = result if not isinstance(result, Result) else result.to_arrow()
            self._write_parquet(table, target, encrypted=encrypted, key=key, flavour=parquet_flavour)
            return
        batches = result.record_batches() if isinstance(result, Result) else result.to_reader()
        write_text_batches(batches, target, format, kms=self.kms if encrypted else None, key=key)

    def _write_parquet(self, table: pa.Table, target: Path, *, encrypted: bool, key: str, flavour: str) -> None:
        if encrypted:
            _parquet_bridge().write_encrypted_parquet(table, target, self.kms, key, flavour=flavour)
            return
        import pyarrow.parquet as pq

        from enclaveml._atomic import atomic_output

        with atomic_output(target) as out:
            pq.write_table(table, out)

    # -- lifetime ----------------------------------------------------------------------

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection itself, for what the API does not cover (its settings are locked)."""
        if self._spark is not None:
            raise ConfigError("a Spark context has no DuckDB connection", "use ctx.spark (its SparkSession)")
        return self._con

    @property
    def spark(self) -> SparkSession:
        """The context's own Spark session (``engine="spark"`` only): temp views and keys of this context."""
        if self._spark is None:
            raise ConfigError("a DuckDB context has no Spark session", "use TrustedContext(engine='spark')")
        return self._spark.spark

    def close(self) -> None:
        if self._spark is not None:
            self._spark.close()
            return
        with contextlib.suppress(Exception):
            self._con.close()
        shutil.rmtree(self.temp_directory, ignore_errors=True)

    def __enter__(self) -> TrustedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrustedContext(engine={self.engine!r}, kms={type(self.kms).__name__})"


def _sql_string(path: Path) -> str:
    return str(path).replace("'", "''")
