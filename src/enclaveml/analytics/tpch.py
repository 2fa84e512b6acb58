"""TPC-H on encrypted Parquet: generate the eight tables, run the 22 queries, check the answers.

A data directory holds one Parquet file per table (``lineitem.parquet``; above SF 1 the big
tables are split in ``ceil(sf)`` parts, ``lineitem.1.parquet`` ...) and ``tpch.json``, a
plaintext manifest of public facts only (scale factor, flavour, key name, file names).

Generation never puts plaintext on disk. Two generators:

- ``tpchgen`` (default): ``tpchgen-cli`` (the PyPI wheel next to ``sys.executable``, the
  TPC's dbgen ported to Rust) writes each table, or part, as Parquet to a pipe
  (``--stdout``); we read it into memory and write it encrypted. The largest piece held in
  memory is one part of ``lineitem`` (about SF 1 of it).
- ``dbgen``: DuckDB's ``tpch`` extension (``CALL dbgen``) in an in-memory database. Its
  random text (addresses, comments) comes from a different stream than the TPC's dbgen, and
  the reference answers of ``tpch_answers()`` were computed on it, so only this data can be
  compared column for column; the whole database sits in memory.

Checking ``tpchgen`` data against ``tpch_answers()`` therefore skips the ``*_address`` and
``*_comment`` columns, and query 13 (it counts orders by ``o_comment``); every other value
must match. Encrypted and plaintext runs of the same data must match exactly.

Queries run on DuckDB over views: ``duckdb`` flavour files through DuckDB's own decryption
(``duckdb_read_parquet_sql``, the fast path); ``standard`` flavour files (pyarrow / Spark)
are decrypted with pyarrow into Arrow tables that DuckDB scans (the slower cross-flavour
path); plaintext files only when ``plain=True``. The answers are checked against DuckDB's
reference answers (``tpch_answers()`` of the ``tpch`` extension: SF 0.01, 0.1 and 1).

What encryption does not cover here: the manifest and file names are not authenticated, and
duckdb-flavour files carry no file-unique AAD, so swapping or rolling back whole files of the
same key is not detected; tampering with any byte of a file is.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import duckdb

from enclaveml.errors import ConfigError, IntegrityError

if TYPE_CHECKING:
    import pyarrow as pa

    from enclaveml.kms import KeyManagementService

__all__ = [
    "ANSWER_SCALE_FACTORS",
    "ENGINES",
    "GENERATORS",
    "QUERIES",
    "TABLES",
    "AnswerCheck",
    "Manifest",
    "QueryResult",
    "attach_tables",
    "check",
    "compare",
    "connect",
    "dbgen_tables",
    "generate",
    "load_tpch_extension",
    "query_tables",
    "query_text",
    "read_manifest",
    "reference_answers",
    "run",
    "run_queries",
    "tpchgen_table",
    "write_plain_table",
]

TABLES = ("region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem")
QUERIES = range(1, 23)
ENGINES = ("duckdb", "spark")
ANSWER_SCALE_FACTORS = (0.01, 0.1, 1.0)
GENERATORS = ("tpchgen", "dbgen")
# With tpchgen data these differ from DuckDB's answers by construction (see the docstring).
TPCHGEN_UNCOMPARABLE_COLUMNS = re.compile(r"^[a-z]_(address|comment)$")
TPCHGEN_UNCOMPARABLE_QUERIES = {13: "query 13 counts orders by o_comment, which tpchgen draws differently"}
MANIFEST = "tpch.json"
MANIFEST_FORMAT = "enclaveml-tpch/1"
# Tables split in ceil(sf) parts above SF 1, so that one part in memory is about SF 1.
SPLIT_TABLES = frozenset({"customer", "part", "partsupp", "orders", "lineitem"})
# DuckDB's own test helper compares doubles approximately; ours is stricter (relative 1e-9).
FLOAT_REL_TOL = 1e-9

Flavour = Literal["plain", "standard", "duckdb"]
Generator = Literal["tpchgen", "dbgen"]


@dataclass(frozen=True)
class Manifest:
    """``tpch.json``: public facts about a data directory (never key material)."""

    scale_factor: float
    flavour: Flavour
    key: str | None
    generator: Generator
    files: dict[str, tuple[str, ...]]

    def paths(self, data_dir: Path, table: str) -> list[Path]:
        return [data_dir / name for name in self.files[table]]


@dataclass(frozen=True)
class QueryResult:
    """One query's wall time (execute + fetch) and its result rows."""

    query: int
    seconds: float
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True)
class AnswerCheck:
    """One query compared with the reference answer: ``pass``, ``fail`` or ``skip``.

    ``reason`` says where a failed result differs, or why a query was not compared.
    """

    query: int
    status: Literal["pass", "fail", "skip"]
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def _tpchgen() -> Path:
    exe = Path(sys.executable).with_name("tpchgen-cli")
    if not exe.exists():
        raise ConfigError(f"tpchgen-cli not found next to {sys.executable}", "install it: pip install tpchgen-cli")
    return exe


def _check_sf(sf: float) -> None:
    if not (sf > 0 and math.isfinite(sf)):
        raise ConfigError(f"scale factor {sf} is not a positive number", "use e.g. --sf 0.01, 1 or 10")


def _parts(table: str, sf: float) -> int:
    return max(1, math.ceil(sf)) if table in SPLIT_TABLES and sf > 1 else 1


def tpchgen_table(table: str, sf: float, *, part: int = 1, parts: int = 1) -> pa.Table:
    """One table (or ``part`` of ``parts``) from ``tpchgen-cli`` through a pipe, in memory.

    String columns come as ``string_view``; they are cast to ``string``, which every Parquet
    writer here (pyarrow modular encryption, DuckDB) accepts.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    command = [str(_tpchgen()), "parquet", "-s", repr(sf), "-T", table, "--stdout", "--no-progress", "-q"]
    if parts > 1:
        command += ["--parts", str(parts), "--part", str(part)]
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise ConfigError(f"tpchgen-cli failed for {table}: {message[-1] if message else done.returncode}")
    data = pq.read_table(pa.BufferReader(done.stdout))
    fields = [pa.field(f.name, pa.string(), f.nullable) if pa.types.is_string_view(f.type) else f for f in data.schema]
    return data.cast(pa.schema(fields))


def dbgen_tables(sf: float) -> dict[str, pa.Table]:
    """All eight tables from DuckDB's ``dbgen`` in an in-memory database."""
    con = duckdb.connect()
    try:
        load_tpch_extension(con)
        con.execute("CALL dbgen(sf = ?)", [sf])
        return {table: con.execute(f"SELECT * FROM {table}").to_arrow_table() for table in TABLES}  # noqa: S608
    finally:
        con.close()


def connect() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that never spills (plaintext would reach its temp directory)."""
    return duckdb.connect(":memory:", config={"temp_directory": "", "enable_external_file_cache": False})


def write_plain_table(data: pa.Table, path: Path) -> None:
    """Plaintext Parquet written by DuckDB's COPY, like the duckdb flavour: a fair baseline."""
    tmp = path.with_name(f".{path.name}.tmp")
    con = connect()
    try:
        con.register("tpch_source", data)
        con.execute(f"COPY (SELECT * FROM tpch_source) TO '{_quote(tmp)}' (FORMAT parquet)")  # noqa: S608
        tmp.replace(path)
    finally:
        con.close()
        tmp.unlink(missing_ok=True)


def generate(
    sf: float,
    out_dir: str | os.PathLike[str],
    *,
    kms: KeyManagementService | None = None,
    key: str | None = None,
    flavour: Literal["duckdb", "standard"] = "duckdb",
    generator: Generator = "tpchgen",
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Generate TPC-H at scale factor ``sf`` into ``out_dir``, encrypted with ``key`` if given.

    Without ``kms``/``key`` the tables are plaintext Parquet (a baseline). ``flavour``
    ``duckdb`` is the embedded fast path; ``standard`` is readable by pyarrow and Spark.
    ``generator`` is ``tpchgen`` or ``dbgen`` (see the module docstring). ``progress(table)``
    is called after each table. Each file appears complete or not at all.
    """
    from enclaveml.crypto.parquet import write_encrypted_parquet

    _check_sf(sf)
    if (kms is None) != (key is None):
        raise ValueError("give both kms and key to encrypt, or neither")
    if flavour not in ("duckdb", "standard"):
        raise ValueError(f"unknown flavour {flavour!r}")
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}")
    generated = dbgen_tables(sf) if generator == "dbgen" else {}
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[str, ...]] = {}
    for table in TABLES:
        parts = 1 if generated else _parts(table, sf)
        names = tuple(f"{table}.parquet" if parts == 1 else f"{table}.{i}.parquet" for i in range(1, parts + 1))
        for part, name in enumerate(names, start=1):
            data = generated.pop(table) if generated else tpchgen_table(table, sf, part=part, parts=parts)
            if kms is None or key is None:
                write_plain_table(data, target / name)
            else:
                write_encrypted_parquet(data, target / name, kms, key, flavour=flavour)
            del data
        files[table] = names
        if progress is not None:
            progress(table)
    manifest = Manifest(sf, "plain" if key is None else flavour, key, generator, files)
    doc = {
        "format": MANIFEST_FORMAT,
        "scale_factor": sf,
        "flavour": manifest.flavour,
        "key": key,
        "generator": generator,
        "files": files,
    }
    (target / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    return manifest


def read_manifest(data_dir: str | os.PathLike[str]) -> Manifest:
    """The manifest of a data directory written by :func:`generate`."""
    path = Path(data_dir) / MANIFEST
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != MANIFEST_FORMAT:
            raise ValueError(doc.get("format"))
        files = {t: tuple(str(n) for n in doc["files"][t]) for t in TABLES}
        if any(Path(n).name != n for names in files.values() for n in names):
            raise ValueError("file names must not contain directories")
        if doc["flavour"] not in ("plain", "standard", "duckdb") or doc["generator"] not in GENERATORS:
            raise ValueError(doc["flavour"])
        return Manifest(float(doc["scale_factor"]), doc["flavour"], doc.get("key"), doc["generator"], files)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found", "is this a directory written by `enclaveml tpch gen`?") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a TPC-H manifest", "regenerate it with `enclaveml tpch gen`") from None


def load_tpch_extension(con: duckdb.DuckDBPyConnection) -> None:
    """LOAD DuckDB's ``tpch`` extension from the ``duckdb-extension-tpch`` wheel (never downloads)."""
    version = duckdb.__version__
    spec = importlib.util.find_spec("duckdb_extension_tpch")
    path = Path(spec.origin).parent if spec is not None and spec.origin is not None else Path("/nonexistent")
    path = path / "extensions" / f"v{version}" / "tpch.duckdb_extension"
    if not path.is_file():
        raise ConfigError(f"no tpch extension for DuckDB {version}", f"pip install duckdb-extension-tpch=={version}")
    con.execute(f"LOAD '{_quote(path)}'")


def query_text(con: duckdb.DuckDBPyConnection, query: int) -> str:
    """The text of TPC-H query ``query`` (1-22) as the tpch extension ships it."""
    row = con.execute("SELECT query FROM tpch_queries() WHERE query_nr = ?", [query]).fetchone()
    if row is None:
        raise ConfigError(f"there is no TPC-H query {query}", "choose queries from 1 to 22")
    return str(row[0])


def query_tables(sql: str) -> list[str]:
    """The TPC-H tables a query reads (column names carry prefixes, so table names are unique words)."""
    return [t for t in TABLES if re.search(rf"\b{t}\b", sql, re.IGNORECASE)]


_INTEGRITY_HINTS = ("aes tag", "decrypt", "encrypt", "corrupt", "magic bytes", "invalid", "footer", "thrift")


def _integrity(what: str) -> IntegrityError:
    return IntegrityError(f"{what} failed authentication: tampered, truncated or not encrypted with this key")


def _is_integrity(exc: duckdb.Error) -> bool:
    text = str(exc).lower()
    return any(hint in text for hint in _INTEGRITY_HINTS)


def attach_tables(
    con: duckdb.DuckDBPyConnection,
    data_dir: str | os.PathLike[str],
    *,
    kms: KeyManagementService | None = None,
    plain: bool = False,
    only: Iterable[str] = TABLES,
) -> Manifest:
    """Create one view per TPC-H table in ``con``; returns the manifest.

    Secure default: every file must be encrypted unless ``plain=True``, and then every file
    must be plaintext, so a plaintext file slipped into an encrypted data set is refused.
    """
    from enclaveml.crypto.parquet import duckdb_read_parquet_sql, parquet_flavour, read_encrypted_parquet

    directory = Path(data_dir)
    manifest = read_manifest(directory)
    for table in only:
        sources: list[str] = []
        for path in manifest.paths(directory, table):
            if not path.exists():
                raise ConfigError(f"{path} not found", "regenerate the data set with `enclaveml tpch gen`")
            flavour = parquet_flavour(path)
            if plain and flavour != "plain":
                raise ConfigError(f"{path} is encrypted", "run without --plain")
            if not plain and flavour == "plain":
                raise ConfigError(f"{path} is not encrypted", "pass --plain to run on plaintext tables")
            if flavour == "plain":
                sources.append(f"read_parquet('{_quote(path)}')")
            elif kms is None:
                raise ConfigError(f"{path} is encrypted and no KMS was given", "open the key store (not --plain)")
            elif flavour == "duckdb":
                sources.append(duckdb_read_parquet_sql(con, path, kms))
            else:  # standard: pyarrow decrypts, DuckDB scans the Arrow table
                name = f"_arrow_{table}_{len(sources)}"
                con.register(name, read_encrypted_parquet(path, kms))
                sources.append(name)
        # table names are ours (TABLES); sources are quoted by duckdb_read_parquet_sql / _quote
        body = " UNION ALL ".join(f"SELECT * FROM {source}" for source in sources)  # noqa: S608
        try:
            con.execute(f"CREATE OR REPLACE VIEW {table} AS {body}")
        except duckdb.Error as exc:
            if _is_integrity(exc):
                raise _integrity(f"table {table} in {directory}") from None
            raise
    return manifest


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def run_queries(
    con: duckdb.DuckDBPyConnection,
    queries: Iterable[int] = QUERIES,
    *,
    progress: Callable[[QueryResult], None] | None = None,
) -> list[QueryResult]:
    """Run TPC-H ``queries`` on the views in ``con``, timing execute + fetch of each."""
    load_tpch_extension(con)
    results = []
    for query in queries:
        sql = query_text(con, query)
        started = time.perf_counter()
        try:
            cursor = con.execute(sql)
            rows = cursor.fetchall()
        except duckdb.Error as exc:
            if _is_integrity(exc):
                raise _integrity(f"TPC-H query {query}: a table") from None
            raise
        seconds = time.perf_counter() - started
        columns = tuple(d[0] for d in cursor.description or ())
        result = QueryResult(query, seconds, columns, rows)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def run(
    data_dir: str | os.PathLike[str],
    *,
    engine: str = "duckdb",
    kms: KeyManagementService | None = None,
    queries: Iterable[int] = QUERIES,
    plain: bool = False,
    progress: Callable[[QueryResult], None] | None = None,
) -> list[QueryResult]:
    """Run TPC-H ``queries`` on the tables in ``data_dir`` with ``engine``; see :func:`attach_tables`."""
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r} is not available for TPC-H", f"use one of {', '.join(ENGINES)}")
    chosen = list(queries)
    if bad := [q for q in chosen if q not in QUERIES]:
        raise ConfigError(f"there is no TPC-H query {bad[0]}", "choose queries from 1 to 22")
    if engine == "spark":
        from enclaveml.analytics.tpch_spark import run_spark

        return run_spark(data_dir, chosen, kms=kms, plain=plain, progress=progress)
    con = connect()
    try:
        attach_tables(con, data_dir, kms=kms, plain=plain)
        return run_queries(con, chosen, progress=progress)
    finally:
        con.close()


def reference_answers(sf: float) -> dict[int, str]:
    """DuckDB's reference answers for scale factor ``sf``: query number -> pipe-separated text."""
    if not any(math.isclose(sf, known) for known in ANSWER_SCALE_FACTORS):
        raise ConfigError(
            f"no reference answers for SF {sf}", f"answers exist for SF {', '.join(map(str, ANSWER_SCALE_FACTORS))}"
        )
    con = duckdb.connect()
    try:
        load_tpch_extension(con)
        rows = con.execute(
            "SELECT query_nr, answer FROM tpch_answers() WHERE abs(scale_factor - ?) < 1e-9", [sf]
        ).fetchall()
    finally:
        con.close()
    return {int(q): str(a) for q, a in rows}


def _same(value: object, cell: str) -> bool:
    """Cast the answer cell to the result value's type and compare, as DuckDB's test helper does."""
    if value is None:
        return cell in ("NULL", "")
    if isinstance(value, bool):
        return cell.lower() == str(value).lower()
    if isinstance(value, int | Decimal):
        try:
            return Decimal(cell) == Decimal(value)
        except InvalidOperation:
            return False
    if isinstance(value, float):
        try:
            return math.isclose(value, float(cell), rel_tol=FLOAT_REL_TOL, abs_tol=1e-12)
        except ValueError:
            return False
    if isinstance(value, datetime | date):
        return value.isoformat() == cell
    return str(value) == cell


def compare(result: QueryResult, answer: str, *, generator: Generator = "dbgen") -> AnswerCheck:
    """Compare one result with its pipe-separated reference answer (header line first).

    For ``tpchgen`` data the columns and query that depend on dbgen's random text are
    skipped (see the module docstring).
    """
    if generator == "tpchgen" and result.query in TPCHGEN_UNCOMPARABLE_QUERIES:
        return AnswerCheck(result.query, "skip", TPCHGEN_UNCOMPARABLE_QUERIES[result.query])
    # One row per line after the header; a NULL is an empty cell, so keep empty lines.
    lines = answer.removesuffix("\n").split("\n")
    header, expected = lines[0].split("|"), [line.split("|") for line in lines[1:]]
    if len(result.columns) != len(header):  # names differ in places (sum vs sum(l_quantity))
        return AnswerCheck(result.query, "fail", f"{len(result.columns)} columns != {len(header)}")
    if len(result.rows) != len(expected):
        return AnswerCheck(result.query, "fail", f"{len(result.rows)} rows != {len(expected)} expected")
    for number, (row, cells) in enumerate(zip(result.rows, expected, strict=True), start=1):
        if len(cells) != len(row):
            return AnswerCheck(result.query, "fail", f"row {number}: {len(row)} values != {len(cells)}")
        for column, value, cell in zip(header, row, cells, strict=True):
            if generator == "tpchgen" and TPCHGEN_UNCOMPARABLE_COLUMNS.match(column):
                continue
            if not _same(value, cell):
                return AnswerCheck(result.query, "fail", f"row {number} {column}: {value!r} != {cell!r}")
    return AnswerCheck(result.query, "pass")


def check(results: Iterable[QueryResult], sf: float, *, generator: Generator = "tpchgen") -> list[AnswerCheck]:
    """Compare each result with DuckDB's reference answer for ``sf`` (0.01, 0.1 or 1).

    ``generator`` is the one that made the data (``Manifest.generator``).
    """
    answers = reference_answers(sf)
    return [compare(result, answers[result.query], generator=generator) for result in results]
