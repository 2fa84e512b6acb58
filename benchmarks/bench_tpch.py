"""TPC-H on DuckDB: encrypted vs plaintext Parquet, per query and geometric mean (``make bench``; not a test).

One run, the same data (``tpchgen-cli`` at ``--sf``, default 1) written three ways:

- ``plain``: plaintext Parquet written by DuckDB's COPY (the baseline);
- ``duckdb``: the duckdb flavour (DuckDB's COPY with ENCRYPTION_CONFIG, httpfs/OpenSSL
  loaded), queried through views over ``read_parquet(..., encryption_config=...)``: the
  embedded fast path, goal geomean ≤ 1.10× plain;
- ``standard``: the interchange flavour (pyarrow modular encryption). DuckDB cannot read it,
  so each query first decrypts the tables it reads with pyarrow into Arrow, then DuckDB scans
  them: the slower cross-flavour path; its time includes that decryption.

These VMs change speed within minutes, so for every query the candidates and the baseline
alternate within each of ``--rounds`` rounds (their order flips from round to round) after
one untimed warm-up each; a query's ratio is the median of its per-round ratios, and the
geometric mean is taken over the 22 ratios.

``--spark`` adds Spark (PySpark ``local[2]``, the hardened ``secure_spark_session``):
standard-flavour tables read by parquet-mr with our Java KmsClient vs the same tables
rewritten by pyarrow without encryption (identical layout), interleaved the same way; goal
geomean ≤ 1.15×. Encrypted and plaintext results must be
identical, and at SF 0.01 / 0.1 / 1 they are checked against DuckDB's answers (query 13 is
skipped for tpchgen data, see ``enclaveml.analytics.tpch``); exit status 1 if not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from enclaveml.analytics import tpch
from enclaveml.crypto.parquet import read_encrypted_parquet
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms

GOAL = 1.10
SPARK_GOAL = 1.15


def timed_query(con: duckdb.DuckDBPyConnection, query: int) -> tuple[float, list[tuple[object, ...]]]:
    (result,) = tpch.run_queries(con, [query])
    return result.seconds, result.rows


def cross_flavour_query(data_dir: Path, kms: LocalKms, query: int, sql: str) -> tuple[float, list[tuple[object, ...]]]:
    """Decrypt the tables ``query`` reads with pyarrow, register them, run the query: timed together."""
    manifest = tpch.read_manifest(data_dir)
    con = tpch.connect()
    try:
        tpch.load_tpch_extension(con)
        started = time.perf_counter()
        for table in tpch.query_tables(sql):
            (path,) = manifest.paths(data_dir, table)
            con.register(table, read_encrypted_parquet(path, kms))
        rows = con.execute(sql).fetchall()
        return time.perf_counter() - started, rows
    finally:
        con.close()


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sf", type=float, default=1.0, help="scale factor [1]")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per query [3]")
    parser.add_argument("--queries", default="1-22", help="e.g. 1,3,5 [1-22]")
    parser.add_argument("--no-cross", action="store_true", help="skip the standard-flavour (pyarrow) path")
    parser.add_argument("--spark", action="store_true", help="also measure Spark local[2] (standard flavour)")
    parser.add_argument("--workdir", help="keep the generated data here (default: a temporary directory)")
    parser.add_argument("--json", dest="json_out", help="also write the results as JSON to this file")
    args = parser.parse_args()
    queries = list(tpch.QUERIES) if args.queries == "1-22" else [int(q) for q in args.queries.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-tpch-") as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        kms = LocalKms.init(work / "keystore.json", "bench", kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
        kms.create_key("tpch")
        started = time.perf_counter()
        tpch.generate(args.sf, work / "plain")
        tpch.generate(args.sf, work / "duckdb", kms=kms, key="tpch", flavour="duckdb")
        if not args.no_cross or args.spark:
            tpch.generate(args.sf, work / "standard", kms=kms, key="tpch", flavour="standard")
        print(f"generated SF {args.sf:g} three ways in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        status = measure(args, work, kms, queries)
        if args.spark:
            status |= measure_spark(args, work, kms, queries)
        return status


def same_layout_plaintext(standard: Path, out: Path, kms: LocalKms) -> Path:
    """The standard-flavour tables rewritten by pyarrow without encryption: the same row groups
    and pages, so Spark's splits (and so its parallelism) are identical and only crypto differs."""
    import pyarrow.parquet as pq

    out.mkdir(exist_ok=True)
    manifest = json.loads((standard / "tpch.json").read_text())
    for names in manifest["files"].values():
        for name in names:
            pq.write_table(read_encrypted_parquet(standard / name, kms), out / name)
    (out / "tpch.json").write_text(json.dumps({**manifest, "flavour": "plain", "key": None}))
    return out


def same_rows(left: list[tuple[object, ...]], right: list[tuple[object, ...]]) -> bool:
    """Equal rows; doubles within 1e-9 relative (Spark sums in task order, which may differ)."""

    def same(a: object, b: object) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
        return a == b

    return len(left) == len(right) and all(
        len(x) == len(y) and all(same(a, b) for a, b in zip(x, y, strict=True))
        for x, y in zip(left, right, strict=True)
    )


def measure_spark(args: argparse.Namespace, work: Path, kms: LocalKms, queries: list[int]) -> int:
    """Spark: standard-flavour encrypted vs plaintext Parquet, one SparkSession, two child sessions."""
    from enclaveml.analytics.spark_engine import SparkEngine, secure_spark_session, stop_spark_session
    from enclaveml.analytics.tpch_spark import register_tables, timed_spark_query

    plain_dir = same_layout_plaintext(work / "standard", work / "spark-plain", kms)
    spark = secure_spark_session(conf={"spark.sql.shuffle.partitions": "8"})
    engine = SparkEngine(kms, spark=spark)
    plain = spark.newSession()
    register_tables(plain, plain_dir, plain=True)
    register_tables(engine.spark, work / "standard", plain=False)
    con = tpch.connect()
    tpch.load_tpch_extension(con)
    rows: list[dict[str, object]] = []
    wrong: list[str] = []
    try:
        for query in queries:
            sql = tpch.query_text(con, query)
            if not same_rows(
                timed_spark_query(plain, query, sql).rows, timed_spark_query(engine.spark, query, sql).rows
            ):
                wrong.append(f"Q{query}: Spark encrypted result differs from plaintext")
            times: dict[str, list[float]] = {"plain": [], "standard": []}
            for round_number in range(args.rounds):
                kinds = ["plain", "standard"] if round_number % 2 == 0 else ["standard", "plain"]
                for kind in kinds:
                    session = plain if kind == "plain" else engine.spark
                    times[kind].append(timed_spark_query(session, query, sql).seconds)
            ratio = statistics.median(e / p for e, p in zip(times["standard"], times["plain"], strict=True))
            row = {
                "query": query,
                "plain_s": statistics.median(times["plain"]),
                "standard_s": statistics.median(times["standard"]),
                "ratio": ratio,
            }
            rows.append(row)
            print(f"Spark Q{query:<2} {json.dumps(row)}", file=sys.stderr)
    finally:
        con.close()
        engine.close()
        stop_spark_session(spark)
    geo = geomean([float(str(r["ratio"])) for r in rows])
    print()
    print(f"# TPC-H SF {args.sf:g} on Spark local[2]: standard-flavour encrypted vs plaintext Parquet")
    print()
    print("| query | plain s | encrypted s | ratio |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| Q{r['query']} | {r['plain_s']:.3f} | {r['standard_s']:.3f} | {r['ratio']:.2f}× |")
    print(f"| **geomean** | | | **{geo:.3f}×** |")
    print()
    verdict = "met" if geo <= SPARK_GOAL else "NOT met"
    print(f"goal: Spark geomean ≤ {SPARK_GOAL:.2f}× plaintext: {verdict} ({geo:.3f}×)")
    print("answers: " + ("; ".join(wrong) if wrong else "Spark encrypted = plaintext for every query"))
    return 1 if wrong else 0


def measure(args: argparse.Namespace, work: Path, kms: LocalKms, queries: list[int]) -> int:
    plain, secret = tpch.connect(), tpch.connect()
    tpch.attach_tables(plain, work / "plain", plain=True)
    tpch.attach_tables(secret, work / "duckdb", kms=kms)
    tpch.load_tpch_extension(plain)
    rows: list[dict[str, object]] = []
    wrong: list[str] = []
    for query in queries:
        sql = tpch.query_text(plain, query)
        base_rows = timed_query(plain, query)[1]  # warm-up, and the reference for identity
        if timed_query(secret, query)[1] != base_rows:
            wrong.append(f"Q{query}: encrypted result differs from plaintext")
        if not args.no_cross and cross_flavour_query(work / "standard", kms, query, sql)[1] != base_rows:
            wrong.append(f"Q{query}: cross-flavour result differs from plaintext")
        times: dict[str, list[float]] = {"plain": [], "duckdb": [], "standard": []}
        for round_number in range(args.rounds):
            order = ["plain", "duckdb", "standard"]
            if round_number % 2:
                order.reverse()
            for kind in order:
                if kind == "plain":
                    times[kind].append(timed_query(plain, query)[0])
                elif kind == "duckdb":
                    times[kind].append(timed_query(secret, query)[0])
                elif not args.no_cross:
                    times[kind].append(cross_flavour_query(work / "standard", kms, query, sql)[0])
        row: dict[str, object] = {
            "query": query,
            "plain_s": statistics.median(times["plain"]),
            "duckdb_s": statistics.median(times["duckdb"]),
            "duckdb_ratio": statistics.median(e / p for e, p in zip(times["duckdb"], times["plain"], strict=True)),
        }
        if not args.no_cross:
            row["standard_s"] = statistics.median(times["standard"])
            row["standard_ratio"] = statistics.median(
                s / p for s, p in zip(times["standard"], times["plain"], strict=True)
            )
        rows.append(row)
        print(f"Q{query:<2} {json.dumps(row)}", file=sys.stderr)
    if any(math.isclose(args.sf, sf) for sf in tpch.ANSWER_SCALE_FACTORS):
        results = tpch.run_queries(secret, queries)
        wrong += [f"Q{c.query}: {c.reason}" for c in tpch.check(results, args.sf, generator="tpchgen") if c.failed]
    report(args, rows, wrong)
    return 1 if wrong else 0


def report(args: argparse.Namespace, rows: list[dict[str, object]], wrong: list[str]) -> None:
    cross = not args.no_cross
    duckdb_geo = geomean([float(str(r["duckdb_ratio"])) for r in rows])
    print(f"# TPC-H SF {args.sf:g} on DuckDB {duckdb.__version__}: encrypted vs plaintext Parquet")
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {args.rounds} rounds, median of per-round ratios"
    )
    print()
    header = "| query | plain s | duckdb flavour s | ratio |"
    rule = "|---:|---:|---:|---:|"
    if cross:
        header += " standard via pyarrow s | ratio |"
        rule += "---:|---:|"
    print(header)
    print(rule)
    for r in rows:
        line = f"| Q{r['query']} | {r['plain_s']:.3f} | {r['duckdb_s']:.3f} | {r['duckdb_ratio']:.2f}× |"
        if cross:
            line += f" {r['standard_s']:.3f} | {r['standard_ratio']:.2f}× |"
        print(line)
    total = {k: sum(float(str(r[k])) for r in rows) for k in ("plain_s", "duckdb_s", *(["standard_s"] * cross))}
    line = f"| total | {total['plain_s']:.3f} | {total['duckdb_s']:.3f} | |"
    if cross:
        line += f" {total['standard_s']:.3f} | |"
    print(line)
    line = f"| **geomean** | | | **{duckdb_geo:.3f}×** |"
    if cross:
        line += f" | **{geomean([float(str(r['standard_ratio'])) for r in rows]):.3f}×** |"
    print(line)
    print()
    verdict = "met" if duckdb_geo <= GOAL else "NOT met"
    print(f"goal: duckdb flavour geomean ≤ {GOAL:.2f}× plaintext: {verdict} ({duckdb_geo:.3f}×)")
    print(
        "answers: " + ("; ".join(wrong) if wrong else "encrypted = plaintext for every query; reference answers match")
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"sf": args.sf, "rows": rows, "wrong": wrong}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
