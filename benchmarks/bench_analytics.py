"""SimpleQuery on encrypted CSV vs plaintext CSV (issue 6 goal: encrypted ≤ 1.3× plaintext).

    python benchmarks/bench_analytics.py                 # 10 M rows
    python benchmarks/bench_analytics.py --rows 2000000 --rounds 5

Data: ``enclaveml datagen people`` rows, written once to a temporary directory and encrypted
with a local key store. Each round runs, in alternating order so neither side always goes
first (warm caches, CPU frequency):

* ``plain duckdb``: what a user without enclaveml runs: DuckDB's own parallel CSV reader
  on the plaintext file, then the query (the baseline);
* ``plain arrow``: ``TrustedContext.read(..., allow_plain=True)``: our Arrow path without
  decryption, which separates parse cost from crypto cost;
* ``encrypted``: ``TrustedContext.read("people.csv.eml")`` then the same query (the candidate).

Each measurement covers load + query + fetching the answer. Prints the median of each and
the ratios to the baseline; the answers of all three must be identical.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from enclaveml.analytics import TrustedContext
from enclaveml.crypto import encrypt_file
from enclaveml.datagen.people import write_people_csv
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms

QUERY = (
    "SELECT job, count(*) AS n, avg(salary) AS avg_salary FROM {table} "
    "WHERE age BETWEEN 20 AND 40 GROUP BY job ORDER BY job"
)


def plain_duckdb(csv: Path) -> list[Any]:
    con = duckdb.connect()
    try:
        return con.sql(QUERY.format(table=f"read_csv('{csv}')")).fetchall()
    finally:
        con.close()


def trusted(path: Path, kms: LocalKms, tmp: Path, *, allow_plain: bool) -> list[Any]:
    with TrustedContext(kms=kms, temp_directory=tmp) as ctx:
        ctx.read(path, format="csv", name="people", allow_plain=allow_plain)
        return ctx.sql(QUERY.format(table="people")).rows()


def timed(run: Callable[[], list[Any]]) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    answer = run()
    return time.perf_counter() - start, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-analytics-") as tmp_name:
        tmp = Path(tmp_name)
        kms = LocalKms.init(tmp / "keystore.json", "bench", kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
        kms.create_key("customers")
        csv, eml = tmp / "people.csv", tmp / "people.csv.eml"
        start = time.perf_counter()
        write_people_csv(csv, args.rows)
        encrypt_file(csv, eml, kms, "customers")
        size_mb = os.path.getsize(csv) / 1e6
        print(f"{args.rows:,} rows, {size_mb:.0f} MB CSV, prepared in {time.perf_counter() - start:.1f} s")
        print(f"python {sys.version.split()[0]}, duckdb {duckdb.__version__}, {os.cpu_count()} CPUs")

        cases: dict[str, Callable[[], list[Any]]] = {
            "plain duckdb": lambda: plain_duckdb(csv),
            "plain arrow": lambda: trusted(csv, kms, tmp, allow_plain=True),
            "encrypted": lambda: trusted(eml, kms, tmp, allow_plain=False),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        answers: dict[str, list[Any]] = {}
        names = list(cases)
        for round_no in range(args.rounds):
            order = names if round_no % 2 == 0 else names[::-1]
            for name in order:
                seconds, answers[name] = timed(cases[name])
                times[name].append(seconds)
            print(f"round {round_no + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names))
        if len({repr(answer) for answer in answers.values()}) != 1:
            raise SystemExit("answers differ between plaintext and encrypted input")

        base = statistics.median(times["plain duckdb"])
        print(f"\n{'case':<14} {'median s':>9} {'MB/s':>8} {'ratio':>7}")
        for name in names:
            median = statistics.median(times[name])
            print(f"{name:<14} {median:>9.3f} {size_mb / median:>8.0f} {median / base:>6.2f}x")
        ratio = statistics.median(times["encrypted"]) / base
        arrow_ratio = statistics.median(times["encrypted"]) / statistics.median(times["plain arrow"])
        print(
            f"\nencrypted / plaintext DuckDB: {ratio:.2f}x (goal <= 1.30x); "
            f"encrypted / plain Arrow path: {arrow_ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
