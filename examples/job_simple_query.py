"""A small job for `enclaveml run`: count and average salary per job for ages 20-40, top 3.

It reads the encrypted CSV with the key the broker released to it (`enclaveml.session()`);
the plaintext exists only in this process's memory. Usage (see `make demo`)::

    enclaveml run --broker URL --keys customers --tee sim -- python job_simple_query.py people.csv.eml
"""

from __future__ import annotations

import csv
import io
import sys
from collections import defaultdict

import enclaveml


def main(path: str) -> None:
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    plain = io.BytesIO()  # plaintext stays in this process's memory
    with enclaveml.session() as keys:
        keys.decrypt_file(path, plain)
    plain.seek(0)
    for row in csv.DictReader(io.TextIOWrapper(plain, encoding="utf-8", newline="")):
        if 20 <= int(row["age"]) <= 40:
            entry = totals[row["job"]]
            entry[0] += 1
            entry[1] += float(row["salary"])
    top = sorted(totals.items(), key=lambda item: (-item[1][0], item[0]))[:3]
    print(f"{'job':<28} {'count':>8} {'avg salary':>12}")
    for job, (count, total) in top:
        print(f"{job:<28} {int(count):>8} {total / count:>12.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
