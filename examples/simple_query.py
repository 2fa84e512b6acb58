"""SimpleQuery (BigDL PPML's example) on encrypted people.csv: count and average salary per job, ages 20-40.

The input is decrypted only in this process's memory; the answer is printed and written
encrypted. The same script runs locally and inside an attested job::

    enclaveml datagen people people.csv --rows 100000
    enclaveml encrypt people.csv people.csv.eml --key customers
    python examples/simple_query.py people.csv.eml adults.csv.eml --kms local         # ENCLAVEML_PASSPHRASE set
    enclaveml run --broker URL --keys customers --tee sim -- \\
        python examples/simple_query.py people.csv.eml adults.csv.eml --kms session     # keys from attestation
    enclaveml decrypt adults.csv.eml adults.csv

``--engine spark`` runs it on a hardened local Spark instead of embedded DuckDB (same
answer); ``--plain`` reads a plaintext people.csv instead (same answer); ``--format`` picks
the output format (csv, json or parquet). Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys

from enclaveml.analytics import TrustedContext
from enclaveml.errors import EnclaveMLError

QUERY = """
    SELECT job, count(*) AS n, avg(salary) AS avg_salary
    FROM people
    WHERE age BETWEEN 20 AND 40
    GROUP BY job
    ORDER BY job
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SimpleQuery on encrypted people.csv")
    parser.add_argument("input", help="people.csv.eml (or people.csv with --plain)")
    parser.add_argument("output", help="where to write the encrypted answer")
    parser.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb", help="query engine")
    parser.add_argument("--kms", choices=["auto", "local", "session"], default="auto")
    parser.add_argument("--key", default="customers", help="primary key that encrypts the answer")
    parser.add_argument("--format", choices=["csv", "json", "parquet"], default="csv", help="output format")
    parser.add_argument("--plain", action="store_true", help="the input is plaintext, on purpose")
    args = parser.parse_args(argv)
    try:
        with TrustedContext(engine=args.engine, kms=None if args.kms == "auto" else args.kms) as ctx:
            ctx.read(args.input, format="csv", name="people", allow_plain=args.plain)
            adults = ctx.sql(QUERY)
            print(f"{'job':<20} {'count':>8} {'avg salary':>12}")
            for job, count, avg_salary in adults.rows():
                print(f"{job:<20} {count:>8} {avg_salary:>12.2f}")
            ctx.write(adults, args.output, format=args.format, encrypted=True, key=args.key)
    except EnclaveMLError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
