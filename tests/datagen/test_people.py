"""Tests for the synthetic people data set (enclaveml.datagen.people)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pytest

from enclaveml.datagen import CHUNK_ROWS, PEOPLE_COLUMNS, people_table, write_people_csv
from enclaveml.datagen.people import CITIES, FIRST_NAMES, JOBS, LAST_NAMES

HEADER = b"name,age,job,city,salary\n"


def _csv_bytes(rows: int, seed: int = 42) -> bytes:
    buf = io.BytesIO()
    assert write_people_csv(buf, rows, seed=seed) == rows
    return buf.getvalue()


@pytest.fixture(scope="module")
def two_chunks() -> pa.Table:
    return people_table(2 * CHUNK_ROWS + 123, seed=7)


def test_columns_and_types(two_chunks: pa.Table) -> None:
    assert tuple(two_chunks.column_names) == PEOPLE_COLUMNS == ("name", "age", "job", "city", "salary")
    assert two_chunks.schema.field("name").type == pa.string()
    assert two_chunks.schema.field("age").type == pa.int32()
    assert two_chunks.schema.field("job").type == pa.string()
    assert two_chunks.schema.field("city").type == pa.string()
    assert two_chunks.schema.field("salary").type == pa.int64()
    assert two_chunks.num_rows == 2 * CHUNK_ROWS + 123
    for col in two_chunks.columns:
        assert col.null_count == 0


def test_value_ranges(two_chunks: pa.Table) -> None:
    age = two_chunks.column("age")
    assert pc.min(age).as_py() == 18
    assert pc.max(age).as_py() == 80
    salary = two_chunks.column("salary")
    assert pc.min(salary).as_py() > 0
    assert pc.all(pc.equal(pc.remainder(salary, 100), 0)).as_py()
    assert set(pc.unique(two_chunks.column("job")).to_pylist()) == set(JOBS)
    assert set(pc.unique(two_chunks.column("city")).to_pylist()) <= set(CITIES)
    names = pc.unique(two_chunks.column("name")).to_pylist()
    firsts, lasts = set(FIRST_NAMES), set(LAST_NAMES)
    for name in names:
        first, last = name.split(" ")
        assert first in firsts
        assert last in lasts


def test_jobs_weighted_and_salary_correlated(two_chunks: pa.Table) -> None:
    stats = two_chunks.group_by("job").aggregate([("salary", "mean"), ("job", "count")])
    by_job = {r["job"]: r for r in stats.to_pylist()}
    counts = {job: r["job_count"] for job, r in by_job.items()}
    assert max(counts.values()) > 2 * min(counts.values())  # non-uniform job weights
    assert by_job["Doctor"]["salary_mean"] > 1.5 * by_job["Teacher"]["salary_mean"]
    young = two_chunks.filter(pc.less(two_chunks.column("age"), 25))
    old = two_chunks.filter(pc.greater(two_chunks.column("age"), 55))
    assert pc.mean(old.column("salary")).as_py() > 1.2 * pc.mean(young.column("salary")).as_py()


def test_same_seed_same_table_different_seed_differs() -> None:
    assert people_table(1000, seed=1).equals(people_table(1000, seed=1))
    assert not people_table(1000, seed=1).equals(people_table(1000, seed=2))


def test_same_seed_same_bytes_different_seed_differs() -> None:
    a = _csv_bytes(5000, seed=3)
    assert a == _csv_bytes(5000, seed=3)
    assert a != _csv_bytes(5000, seed=4)


def test_known_output_is_pinned() -> None:
    # Pins the format (lists, draw order, arithmetic): update only on a deliberate change.
    assert _csv_bytes(3, seed=42) == (
        HEADER
        + b"Mark Adams,23,Scientist,Madrid,130800\n"
        + b"Charles Lopez,66,Teacher,Sydney,79800\n"
        + b"Susan White,59,Nurse,Los Angeles,85100\n"
    )
    digest = hashlib.sha256(_csv_bytes(1000, seed=42)).hexdigest()
    assert digest == "bd7162f8366d82db0b288f50760693e03fce27b8f8fa318ef78a63d1edd5cf84"


def test_prefix_independent_of_row_count(two_chunks: pa.Table) -> None:
    for n in (0, 1, 10, CHUNK_ROWS - 1, CHUNK_ROWS, CHUNK_ROWS + 1):
        assert people_table(n, seed=7).equals(two_chunks.slice(0, n))


def test_start_offsets_match_big_table(two_chunks: pa.Table) -> None:
    second = people_table(CHUNK_ROWS + 123, seed=7, start=CHUNK_ROWS)
    assert second.equals(two_chunks.slice(CHUNK_ROWS))
    third = people_table(50, seed=7, start=2 * CHUNK_ROWS)
    assert third.equals(two_chunks.slice(2 * CHUNK_ROWS, 50))
    glued = pa.concat_tables(
        [people_table(CHUNK_ROWS, seed=7), people_table(CHUNK_ROWS + 123, seed=7, start=CHUNK_ROWS)]
    )
    assert glued.equals(two_chunks)


def test_csv_matches_table_and_row_count_not_multiple_of_chunk(two_chunks: pa.Table) -> None:
    data = _csv_bytes(two_chunks.num_rows, seed=7)
    assert data.startswith(HEADER)
    assert data.count(b"\n") == two_chunks.num_rows + 1
    assert b'"' not in data
    parsed = pa_csv.read_csv(
        io.BytesIO(data),
        convert_options=pa_csv.ConvertOptions(column_types=two_chunks.schema),
    )
    assert parsed.num_rows == two_chunks.num_rows
    for name in PEOPLE_COLUMNS:
        assert parsed.column(name).equals(two_chunks.column(name)), name


def test_zero_rows_writes_header_only(tmp_path: Path) -> None:
    assert _csv_bytes(0) == HEADER
    out = tmp_path / "empty.csv"
    calls: list[int] = []
    assert write_people_csv(out, 0, progress=calls.append) == 0
    assert out.read_bytes() == HEADER
    assert sum(calls) == 0
    empty = people_table(0)
    assert empty.num_rows == 0
    assert tuple(empty.column_names) == PEOPLE_COLUMNS


def test_path_and_file_object_output_equal(tmp_path: Path) -> None:
    rows = CHUNK_ROWS + 17
    as_str = tmp_path / "a.csv"
    as_path = tmp_path / "b.csv"
    assert write_people_csv(str(as_str), rows, seed=9) == rows
    assert write_people_csv(as_path, rows, seed=9) == rows
    with (tmp_path / "c.csv").open("wb") as fh:
        assert write_people_csv(fh, rows, seed=9) == rows
    expected = _csv_bytes(rows, seed=9)
    assert as_str.read_bytes() == expected
    assert as_path.read_bytes() == expected
    assert (tmp_path / "c.csv").read_bytes() == expected
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_overwrites_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "people.csv"
    out.write_bytes(b"old content that is longer than the new one" * 100)
    write_people_csv(out, 2, seed=1)
    assert out.read_bytes() == _csv_bytes(2, seed=1)


def test_progress_sums_to_rows() -> None:
    rows = 2 * CHUNK_ROWS + 5
    calls: list[int] = []
    write_people_csv(io.BytesIO(), rows, seed=1, progress=calls.append)
    assert sum(calls) == rows
    assert calls == [CHUNK_ROWS, CHUNK_ROWS, 5]


@pytest.mark.parametrize("rows", [-1, -CHUNK_ROWS])
def test_negative_rows_rejected(rows: int, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows"):
        people_table(rows)
    with pytest.raises(ValueError, match="rows"):
        write_people_csv(io.BytesIO(), rows)
    target = tmp_path / "never.csv"
    with pytest.raises(ValueError, match="rows"):
        write_people_csv(target, rows)
    assert not target.exists()


@pytest.mark.parametrize("start", [-CHUNK_ROWS, -1, 1, CHUNK_ROWS - 1, CHUNK_ROWS + 1])
def test_bad_start_rejected(start: int) -> None:
    with pytest.raises(ValueError, match="start"):
        people_table(10, start=start)


def test_negative_seed_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        people_table(10, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        write_people_csv(io.BytesIO(), 10, seed=-1)
