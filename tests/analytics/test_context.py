"""``TrustedContext`` on DuckDB: encrypted CSV / JSON / Parquet in, SQL, encrypted results out.

Every test uses real objects: a real local key store, real EML files, a real DuckDB, and for
the attested mode a real key bundle passed through an inherited pipe, exactly as
``enclaveml run`` hands it to a job. Answers are compared with plain DuckDB on the
plaintext file; after success and after each failure, the work directory and DuckDB's temp
directory must hold no plaintext and no partial output.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from analytics_data import PEOPLE_ROWS, assert_no_plaintext

import enclaveml.runtime.session as session_module
from enclaveml.analytics import Result, TrustedContext
from enclaveml.analytics.context import table_name_for
from enclaveml.crypto import decrypt_bytes, encrypt_file
from enclaveml.crypto._format import MAGIC
from enclaveml.errors import ConfigError, IntegrityError, KeyNotFound
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.runtime.session import SESSION_FD_ENV, ReleasedKey, Session, encode_bundle

QUERY = (
    "SELECT job, count(*) AS n, avg(salary) AS avg_salary FROM {table} "
    "WHERE age BETWEEN 20 AND 40 GROUP BY job ORDER BY job"
)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "simple_query.py"
RELEASED = ReleasedKey("customers", "k-00000000000000aa", 1, bytes(range(32)))


def plain_answer(csv: Path) -> list[tuple[Any, ...]]:
    return duckdb.sql(QUERY.format(table=f"read_csv('{csv}')")).fetchall()


@pytest.fixture
def ctx(kms: LocalKms, spill: Path) -> Iterator[TrustedContext]:
    with TrustedContext(engine="duckdb", kms=kms, temp_directory=spill) as context:
        yield context


@pytest.fixture
def no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that `enclaveml run` did not start: no key pipe, nothing cached."""
    monkeypatch.delenv(SESSION_FD_ENV, raising=False)
    monkeypatch.setattr(session_module, "_current", None)


def released_session(monkeypatch: pytest.MonkeyPatch, keys: list[ReleasedKey]) -> None:
    """What `enclaveml run` does after attestation: the key bundle in a pipe, its fd in the environment."""
    read_end, write_end = os.pipe()
    os.write(write_end, encode_bundle("broker", keys, {"tee": "sim"}))
    os.close(write_end)
    monkeypatch.setattr(session_module, "_current", None)
    monkeypatch.setenv(SESSION_FD_ENV, str(read_end))


# -- reading and querying ---------------------------------------------------------------


def test_encrypted_csv_gives_the_same_answer_as_plain_duckdb(
    ctx: TrustedContext, people_eml: Path, people_csv: Path, work: Path, spill: Path
) -> None:
    people = ctx.read(people_eml, format="csv")

    answer = ctx.sql(QUERY.format(table="people")).rows()

    assert answer == plain_answer(people_csv)
    assert people.columns == ["name", "age", "job", "city", "salary"]
    assert ctx.sql("SELECT count(*) FROM people").rows() == [(PEOPLE_ROWS,)]
    assert_no_plaintext(work, spill)


@pytest.mark.parametrize(
    ("name", "table"),
    [("people.csv.eml", "people"), ("orders.json.eml", "orders"), ("2024-sales.parquet", "t_2024_sales")],
)
def test_default_table_name_is_the_file_stem(name: str, table: str) -> None:
    assert table_name_for(Path(name)) == table


def test_a_directory_of_part_files_is_one_table(
    ctx: TrustedContext, people_csv: Path, work: Path, kms: LocalKms
) -> None:
    lines = people_csv.read_bytes().splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    parts = work / "people"
    parts.mkdir()
    for i in range(3):
        plain = people_csv.parent / f"part-{i}.csv"
        plain.write_bytes(header + b"".join(rows[i::3]))
        encrypt_file(plain, parts / f"part-{i}.csv.eml", kms, "customers")
    (parts / "_SUCCESS").write_bytes(b"")

    ctx.read(parts, format="csv")

    assert ctx.sql(QUERY.format(table="people")).rows() == plain_answer(people_csv)


def test_plaintext_input_is_refused_unless_allowed(ctx: TrustedContext, people_csv: Path) -> None:
    with pytest.raises(ConfigError, match=r"people.csv: not encrypted \(no EML header\)"):
        ctx.read(people_csv, format="csv")

    ctx.read(people_csv, format="csv", allow_plain=True)

    assert ctx.sql(QUERY.format(table="people")).rows() == plain_answer(people_csv)


def test_encrypted_and_plaintext_tables_join_in_one_query(
    ctx: TrustedContext, people_eml: Path, people_csv: Path
) -> None:
    ctx.read(people_eml, format="csv", name="secret")
    ctx.read(people_csv, format="csv", name="public", allow_plain=True)

    joined = ctx.sql("SELECT count(*) FROM secret JOIN public USING (name, age, job, city, salary)").rows()

    assert joined[0][0] >= PEOPLE_ROWS


def test_result_converts_to_arrow_and_rows(ctx: TrustedContext, people_eml: Path) -> None:
    ctx.read(people_eml, format="csv")

    result = ctx.sql("SELECT job, count(*) AS n FROM people GROUP BY job ORDER BY job")

    table = result.to_arrow()
    assert isinstance(table, pa.Table)
    assert table.column_names == ["job", "n"]
    assert list(zip(table["job"].to_pylist(), table["n"].to_pylist(), strict=True)) == result.rows()
    assert ctx.sql("CREATE VIEW v AS SELECT 1").rows() == []


@pytest.mark.skipif(importlib.util.find_spec("pandas") is not None, reason="pandas is installed here")
def test_to_pandas_without_pandas_is_a_config_error(ctx: TrustedContext) -> None:
    with pytest.raises(ConfigError, match="pandas is not installed"):
        Result(ctx.connection.sql("SELECT 1")).to_pandas()


# -- writing ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_eml_round_trip_returns_the_same_rows(
    ctx: TrustedContext, people_eml: Path, people_csv: Path, work: Path, spill: Path, fmt: str
) -> None:
    ctx.read(people_eml, format="csv")
    answer = ctx.sql(QUERY.format(table="people"))
    out = work / f"adults.{fmt}.eml"

    ctx.write(answer, out, format=fmt, key="customers")  # type: ignore[arg-type]

    assert out.read_bytes().startswith(MAGIC)
    ctx.read(out, format=fmt, name="adults")  # type: ignore[arg-type]
    assert ctx.sql("SELECT * FROM adults ORDER BY job").rows() == plain_answer(people_csv)
    assert sorted(p.name for p in work.iterdir()) == sorted(["people.csv.eml", out.name])  # no temp files left
    assert_no_plaintext(work, spill)


def test_encrypted_csv_output_decrypts_to_csv(ctx: TrustedContext, people_eml: Path, kms: LocalKms) -> None:
    ctx.read(people_eml, format="csv")
    out = people_eml.parent / "jobs.csv.eml"

    ctx.write(ctx.sql("SELECT DISTINCT job FROM people WHERE job = 'Developer'"), out)

    assert bytes(decrypt_bytes(out.read_bytes(), kms)) == b'"job"\n"Developer"\n'


@pytest.mark.parametrize("flavour", ["standard", "duckdb"])
def test_encrypted_parquet_round_trip(
    ctx: TrustedContext, people_eml: Path, people_csv: Path, work: Path, spill: Path, flavour: str
) -> None:
    ctx.read(people_eml, format="csv")
    out = work / f"people-{flavour}.parquet"

    ctx.write(ctx.sql("SELECT * FROM people"), out, format="parquet", parquet_flavour=flavour)  # type: ignore[arg-type]

    assert out.read_bytes()[:4] == b"PARE"
    ctx.read(out, format="parquet", name="again")
    assert ctx.sql(QUERY.format(table="again")).rows() == plain_answer(people_csv)
    assert_no_plaintext(work, spill)


def test_plaintext_output_only_when_asked(ctx: TrustedContext, people_eml: Path, work: Path) -> None:
    ctx.read(people_eml, format="csv")
    out = work / "count.csv"

    ctx.write(ctx.sql("SELECT count(*) AS n FROM people"), out, encrypted=False)

    assert out.read_text() == f'"n"\n{PEOPLE_ROWS}\n'


# -- bad input: one clear error, no table, no partial output, no plaintext on disk ----------


def _truncate_at_segment_boundary(path: Path) -> None:
    """Drop the last segment: what is left still parses, but no segment is marked last."""
    from enclaveml.crypto import describe_file

    described = describe_file(path)
    stored = described.header.bound.segment_size + 16
    keep = described.header.size + (described.layout.segments - 1) * stored
    path.write_bytes(path.read_bytes()[:keep])


def _flip_byte_in_second_segment(path: Path) -> None:
    from enclaveml.crypto import describe_file

    described = describe_file(path)
    data = bytearray(path.read_bytes())
    data[described.header.size + described.header.bound.segment_size + 100] ^= 0x01
    path.write_bytes(bytes(data))


def _encrypt_under_another_key_store(path: Path) -> None:
    other = LocalKms.init(path.parent.parent / "other.json", "x" * 12, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    other.create_key("customers")
    plain = path.parent.parent / "plain" / "people.csv"
    encrypt_file(plain, path, other, "customers")


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (_encrypt_under_another_key_store, KeyNotFound, r"people.csv.eml: key k-[0-9a-f]+ is not in key store"),
        (_flip_byte_in_second_segment, IntegrityError, r"people.csv.eml: segment 1 failed authentication"),
        (_truncate_at_segment_boundary, IntegrityError, r"people.csv.eml: segment \d+ failed authentication"),
    ],
    ids=["wrong_key", "tampered", "truncated"],
)
def test_bad_eml_input_fails_cleanly(
    ctx: TrustedContext, people_eml: Path, work: Path, spill: Path, damage: Any, error: type, message: str
) -> None:
    damage(people_eml)
    before = sorted(p.name for p in work.iterdir())

    with pytest.raises(error, match=message) as raised:
        ctx.read(people_eml, format="csv")

    assert "\n" not in raised.value.diagnostics()
    with pytest.raises(duckdb.CatalogException):  # rolled back: no half-loaded table
        ctx.sql("SELECT * FROM people")
    assert sorted(p.name for p in work.iterdir()) == before
    assert list(ctx.temp_directory.iterdir()) == []
    assert_no_plaintext(work, spill)


def test_wrong_key_material_is_an_integrity_error(people_csv: Path, work: Path, spill: Path) -> None:
    owner = Session("broker", [RELEASED], {})
    path = work / "people.csv.eml"
    encrypt_file(people_csv, path, owner, "customers")
    impostor = Session("broker", [ReleasedKey("customers", RELEASED.key_id, 1, bytes(32))], {})

    with TrustedContext(kms=impostor, temp_directory=spill) as ctx, pytest.raises(IntegrityError):
        ctx.read(path, format="csv")


def test_a_failed_write_leaves_no_file(ctx: TrustedContext, people_eml: Path, work: Path, spill: Path) -> None:
    ctx.read(people_eml, format="csv")
    before = sorted(p.name for p in work.iterdir())

    with pytest.raises(KeyNotFound):
        ctx.write(ctx.sql("SELECT * FROM people"), work / "out.csv.eml", key="no-such-key")
    with pytest.raises(duckdb.ConversionException):  # fails while the rows stream out
        ctx.write(ctx.sql("SELECT CAST(name AS INTEGER) FROM people"), work / "out.json.eml", format="json")

    assert sorted(p.name for p in work.iterdir()) == before
    assert_no_plaintext(work, spill)


def test_a_job_that_was_not_attested_gets_no_keys(no_session: None, spill: Path) -> None:
    with pytest.raises(ConfigError, match=r"not started by `enclaveml run`, so no keys were released"):
        TrustedContext(kms="session", temp_directory=spill)
    assert list(spill.iterdir()) == []


def test_an_attested_job_reads_with_the_released_keys(
    monkeypatch: pytest.MonkeyPatch, people_csv: Path, work: Path, spill: Path
) -> None:
    path = work / "people.csv.eml"
    encrypt_file(people_csv, path, Session("broker", [RELEASED], {}), "customers")
    released_session(monkeypatch, [RELEASED])

    with TrustedContext(temp_directory=spill) as ctx:  # kms=None: the session, since `enclaveml run` started us
        ctx.read(path, format="csv")
        assert isinstance(ctx.kms, Session)
        assert ctx.sql(QUERY.format(table="people")).rows() == plain_answer(people_csv)


def test_a_key_that_was_not_released_is_refused(monkeypatch: pytest.MonkeyPatch, people_eml: Path, spill: Path) -> None:
    released_session(monkeypatch, [RELEASED])  # the file is under the local store's key, never released

    with TrustedContext(temp_directory=spill) as ctx, pytest.raises(KeyNotFound, match="'local' KMS"):
        ctx.read(people_eml, format="csv")


# -- engine and settings ------------------------------------------------------------------


def test_an_unknown_engine_is_refused(kms: LocalKms) -> None:
    with pytest.raises(ConfigError, match="unknown engine 'polars'"):
        TrustedContext(engine="polars", kms=kms)


def test_duckdb_cannot_spill_and_its_settings_are_locked(ctx: TrustedContext, spill: Path) -> None:
    settings = dict(
        ctx.connection.sql(
            "SELECT name, value FROM duckdb_settings() "
            "WHERE name IN ('temp_directory', 'max_temp_directory_size', 'autoinstall_known_extensions')"
        ).fetchall()
    )

    assert settings == {
        "temp_directory": str(ctx.temp_directory),
        "max_temp_directory_size": "0 bytes",
        "autoinstall_known_extensions": "false",
    }
    assert ctx.temp_directory.parent == spill
    assert stat.S_IMODE(ctx.temp_directory.stat().st_mode) == 0o700
    with pytest.raises(duckdb.InvalidInputException, match="locked"):
        ctx.connection.execute("SET max_temp_directory_size = '1GB'")


def test_close_removes_the_temp_directory(kms: LocalKms, spill: Path) -> None:
    context = TrustedContext(kms=kms, temp_directory=spill)
    context.close()
    assert list(spill.iterdir()) == []


# -- the example ----------------------------------------------------------------------------


def _run_example(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=120, **kwargs
    )


def test_simple_query_example_gives_identical_answers_locally_and_with_released_keys(
    tmp_path: Path, people_csv: Path, work: Path, kms: LocalKms
) -> None:
    local_env = {
        **os.environ,
        "ENCLAVEML_HOME": str(kms.store_path.parent),
        "ENCLAVEML_PASSPHRASE": "correct horse battery staple",
    }
    local_env.pop(SESSION_FD_ENV, None)
    encrypt_file(people_csv, work / "people.csv.eml", kms, "customers")
    plain = _run_example([str(people_csv), str(work / "plain-answer.csv.eml"), "--plain", "--kms", "local"], local_env)
    local = _run_example([str(work / "people.csv.eml"), str(work / "local.csv.eml"), "--kms", "local"], local_env)

    # Inside `enclaveml run`: the key bundle arrives through an inherited pipe.
    broker_file = work / "people-broker.csv.eml"
    encrypt_file(people_csv, broker_file, Session("broker", [RELEASED], {}), "customers")
    read_end, write_end = os.pipe()
    os.write(write_end, encode_bundle("broker", [RELEASED], {"tee": "sim"}))
    os.close(write_end)
    job_env = {k: v for k, v in os.environ.items() if k != "ENCLAVEML_PASSPHRASE"}
    job_env[SESSION_FD_ENV] = str(read_end)
    attested = _run_example(
        [str(broker_file), str(work / "attested.csv.eml"), "--kms", "session"], job_env, pass_fds=(read_end,)
    )
    os.close(read_end)

    for run in (plain, local, attested):
        assert run.returncode == 0, run.stderr
    assert plain.stdout == local.stdout == attested.stdout
    assert "Developer" in attested.stdout
    owner = Session("broker", [RELEASED], {})
    assert decrypt_bytes((work / "attested.csv.eml").read_bytes(), owner) == decrypt_bytes(
        (work / "local.csv.eml").read_bytes(), kms
    )


def test_simple_query_example_outside_the_runtime_prints_one_line(work: Path, people_eml: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != SESSION_FD_ENV}

    run = _run_example([str(people_eml), str(work / "out.csv.eml"), "--kms", "session"], env)

    assert run.returncode == 2
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith("error: this process was not started by `enclaveml run`")
    assert not (work / "out.csv.eml").exists()
