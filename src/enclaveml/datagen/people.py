"""Synthetic ``people.csv`` for the SimpleQuery example (BigDL PPML) and benchmarks.

Every row is one made-up person with five columns, in this order:

========  =======  ============================================================
column    type     values
========  =======  ============================================================
name      string   first + " " + last name, from 60 x 60 embedded common names
age       int32    uniform in 18..80 (inclusive)
job       string   one of :data:`JOBS`, with fixed non-uniform weights
city      string   one of :data:`CITIES`, uniform
salary    int64    per-job base x age (experience) factor x noise, rounded to 100
========  =======  ============================================================

Determinism guarantee
---------------------
Rows are generated in chunks of :data:`CHUNK_ROWS` rows. Chunk ``k`` is drawn, always in
full, from its own generator ``PCG64(SeedSequence([seed, k]))``, so row ``i`` of the data
set depends only on ``(seed, i)``: never on how many rows are asked for or on how the
rows are split into calls (``people_table(n, start=s)`` equals rows ``s .. s+n`` of one
big table, for ``s`` a multiple of :data:`CHUNK_ROWS`). The same seed and row count give
byte-identical CSV output. Only integer draws, uniform doubles and IEEE basic arithmetic
(``+ - * /`` and round-to-nearest) are used, so the output does not depend on the CPU or
libm either; it may change only if numpy changes its ``Generator`` streams.

The data is entirely invented; names and cities contain no commas, quotes or newlines,
so the CSV needs no quoting at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pa_csv

from enclaveml._atomic import atomic_output

__all__ = [
    "CHUNK_ROWS",
    "CITIES",
    "FIRST_NAMES",
    "JOBS",
    "LAST_NAMES",
    "PEOPLE_COLUMNS",
    "people_table",
    "write_people_csv",
]

PEOPLE_COLUMNS: tuple[str, ...] = ("name", "age", "job", "city", "salary")
"""Column names, in file order."""

CHUNK_ROWS = 65536
"""Rows per generator chunk; ``start`` offsets must be multiples of this."""

MIN_AGE = 18
MAX_AGE = 80

FIRST_NAMES: tuple[str, ...] = (
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda",
    "William", "Elizabeth", "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica",
    "Thomas", "Sarah", "Charles", "Karen", "Daniel", "Nancy", "Matthew", "Lisa",
    "Anthony", "Betty", "Mark", "Margaret", "Paul", "Sandra", "Steven", "Ashley",
    "Andrew", "Emily", "Kevin", "Donna", "Brian", "Michelle", "George", "Carol",
    "Edward", "Amanda", "Ronald", "Melissa", "Timothy", "Deborah", "Jason", "Stephanie",
    "Jeffrey", "Rebecca", "Ryan", "Laura", "Jacob", "Helen", "Gary", "Anna",
    "Nicholas", "Emma", "Eric", "Olivia",
)  # fmt: skip

LAST_NAMES: tuple[str, ...] = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis",
    "Rodriguez", "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson",
    "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Perez", "Thompson",
    "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson", "Walker",
    "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores",
    "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell",
    "Carter", "Roberts", "Chen", "Wang", "Kim", "Patel", "Singh", "Muller", "Schmidt",
    "Rossi", "Dubois", "Tanaka",
)  # fmt: skip

# (job, weight, base yearly salary)
_JOB_SPEC: tuple[tuple[str, float, int], ...] = (
    ("Developer", 0.12, 95_000),
    ("Engineer", 0.10, 90_000),
    ("Teacher", 0.10, 52_000),
    ("Nurse", 0.09, 65_000),
    ("Analyst", 0.08, 75_000),
    ("Designer", 0.06, 68_000),
    ("Manager", 0.08, 105_000),
    ("Doctor", 0.04, 160_000),
    ("Lawyer", 0.03, 140_000),
    ("Sales", 0.09, 58_000),
    ("Accountant", 0.06, 70_000),
    ("Chef", 0.05, 45_000),
    ("Artist", 0.03, 38_000),
    ("Scientist", 0.04, 98_000),
    ("Writer", 0.03, 50_000),
)

JOBS: tuple[str, ...] = tuple(job for job, _, _ in _JOB_SPEC)
"""Every job that can appear, most common first only roughly (see the weights)."""

CITIES: tuple[str, ...] = (
    "London", "Paris", "Berlin", "Madrid", "Rome", "Amsterdam", "New York",
    "Los Angeles", "Chicago", "Toronto", "Mexico City", "Tokyo", "Seoul", "Beijing",
    "Shanghai", "Singapore", "Mumbai", "Sydney", "Cairo", "Lagos",
)  # fmt: skip

_JOB_CDF: npt.NDArray[np.float64] = np.cumsum([w for _, w, _ in _JOB_SPEC], dtype=np.float64)
_JOB_CDF /= _JOB_CDF[-1]
_JOB_BASE: npt.NDArray[np.float64] = np.array([b for _, _, b in _JOB_SPEC], dtype=np.float64)

# Salary grows 1.5 % per year of age for the first 35 working years, then stays flat.
_AGE_STEP = 0.015
_AGE_CAP_YEARS = 35
# Multiplicative noise 1 + 0.2 * (u1 + u2 + u3 - 1.5): bell-shaped, within +-30 %.
_NOISE_SCALE = 0.2
_SALARY_STEP = 100
_SALARY_FLOOR = 10_000

_HEADER = (",".join(PEOPLE_COLUMNS) + "\n").encode("ascii")

SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("age", pa.int32(), nullable=False),
        pa.field("job", pa.string(), nullable=False),
        pa.field("city", pa.string(), nullable=False),
        pa.field("salary", pa.int64(), nullable=False),
    ]
)

# Lookup arrays: strings are produced by ``take`` on these, never per row in Python.
_FULL_NAMES = pa.array([f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES], pa.string())
_JOB_ARRAY = pa.array(JOBS, pa.string())
_CITY_ARRAY = pa.array(CITIES, pa.string())

# quoting_style="none": pyarrow's "needed" style quotes every string value and the header,
# and none of our values needs quoting (checked below), so the file is plain CSV.
_WRITE_OPTIONS = pa_csv.WriteOptions(include_header=False, quoting_style="none")

for _value in (*FIRST_NAMES, *LAST_NAMES, *JOBS, *CITIES):
    if any(c in _value for c in ',"\r\n'):  # pragma: no cover - guards the embedded lists
        raise AssertionError(f"value needs CSV quoting: {_value!r}")


def _check_args(rows: int, seed: int) -> None:
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _chunk_table(seed: int, chunk_index: int, rows: int) -> pa.Table:
    """The first ``rows`` rows of chunk ``chunk_index`` (always drawn in full, then sliced)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, chunk_index])))
    n = CHUNK_ROWS
    # Draw order is part of the format: changing it changes every generated file.
    age = rng.integers(MIN_AGE, MAX_AGE + 1, size=n, dtype=np.int32)
    job = np.searchsorted(_JOB_CDF, rng.random(n), side="right")
    np.minimum(job, len(JOBS) - 1, out=job)
    city = rng.integers(0, len(CITIES), size=n, dtype=np.int32)
    first = rng.integers(0, len(FIRST_NAMES), size=n, dtype=np.int32)
    last = rng.integers(0, len(LAST_NAMES), size=n, dtype=np.int32)
    noise = rng.random((3, n)).sum(axis=0)

    years = np.minimum(age - MIN_AGE, _AGE_CAP_YEARS).astype(np.float64)
    salary_f = _JOB_BASE[job] * (1.0 + _AGE_STEP * years) * (1.0 + _NOISE_SCALE * (noise - 1.5))
    salary = np.rint(salary_f / _SALARY_STEP).astype(np.int64) * _SALARY_STEP
    np.maximum(salary, _SALARY_FLOOR, out=salary)

    if rows < n:
        age, job, city, salary = age[:rows], job[:rows], city[:rows], salary[:rows]
        first, last = first[:rows], last[:rows]
    name_idx = first * np.int32(len(LAST_NAMES)) + last
    return pa.Table.from_arrays(
        [
            _FULL_NAMES.take(pa.array(name_idx)),
            pa.array(age, pa.int32()),
            _JOB_ARRAY.take(pa.array(job.astype(np.int32))),
            _CITY_ARRAY.take(pa.array(city)),
            pa.array(salary, pa.int64()),
        ],
        schema=SCHEMA,
    )


def _chunks(rows: int, start_chunk: int = 0) -> list[tuple[int, int]]:
    """``(chunk_index, rows_in_chunk)`` pairs covering ``rows`` rows."""
    full, rest = divmod(rows, CHUNK_ROWS)
    plan = [(start_chunk + k, CHUNK_ROWS) for k in range(full)]
    if rest:
        plan.append((start_chunk + full, rest))
    return plan


def people_table(rows: int, *, seed: int = 42, start: int = 0) -> pa.Table:
    """Rows ``start .. start+rows`` of the synthetic people data set for ``seed``.

    ``start`` must be a non-negative multiple of :data:`CHUNK_ROWS` (``ValueError``
    otherwise); ``rows`` and ``seed`` must be ``>= 0``. The result has columns
    :data:`PEOPLE_COLUMNS` (see the module docstring) and may consist of several chunks.
    """
    _check_args(rows, seed)
    if start < 0 or start % CHUNK_ROWS:
        raise ValueError(f"start must be a non-negative multiple of {CHUNK_ROWS}, got {start}")
    plan = _chunks(rows, start // CHUNK_ROWS)
    if not plan:
        return SCHEMA.empty_table()
    return pa.concat_tables([_chunk_table(seed, idx, n) for idx, n in plan])


def _write_rows(out: BinaryIO, rows: int, seed: int, progress: Callable[[int], None] | None) -> None:
    out.write(_HEADER)
    for idx, n in _chunks(rows):
        sink = pa.BufferOutputStream()
        pa_csv.write_csv(_chunk_table(seed, idx, n), sink, write_options=_WRITE_OPTIONS)
        out.write(memoryview(sink.getvalue()))
        if progress is not None:
            progress(n)


def write_people_csv(
    path_or_binary_file: str | os.PathLike[str] | BinaryIO,
    rows: int,
    *,
    seed: int = 42,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write a header line and ``rows`` rows of people data as CSV; return ``rows``.

    ``path_or_binary_file`` is a filesystem path (replaced atomically: an interrupted run
    leaves no partial file) or a writable binary file object such as
    ``sys.stdout.buffer`` (written to, not closed). Memory use is bounded by one chunk of
    :data:`CHUNK_ROWS` rows. ``progress``, if given, is called after each chunk with the
    number of rows that chunk wrote. The header is ``name,age,job,city,salary``, lines end
    with ``\\n`` and no value is quoted; the bytes depend only on ``seed`` and ``rows``.
    """
    _check_args(rows, seed)
    if isinstance(path_or_binary_file, (str, os.PathLike)):
        with atomic_output(path_or_binary_file, mode=0o644) as out:
            _write_rows(out, rows, seed, progress)
    else:
        _write_rows(path_or_binary_file, rows, seed, progress)
    return rows
