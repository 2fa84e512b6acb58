"""TPC-H at SF 0.01 on encrypted Parquet: right answers, same as plaintext, tampering caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enclaveml.analytics import tpch
from enclaveml.errors import ConfigError, EnclaveMLError, IntegrityError
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms

SF = 0.01
PASSPHRASE = "tpch test passphrase 51c2"
ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))


def new_kms(home: Path) -> LocalKms:
    store = LocalKms.init(home / "keystore.json", PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    store.create_key("customers")
    return store


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> LocalKms:
    return new_kms(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory, kms: LocalKms) -> Path:
    """DuckDB's dbgen data (the data of its reference answers), duckdb flavour."""
    out = tmp_path_factory.mktemp("encrypted")
    tpch.generate(SF, out, kms=kms, key="customers", generator="dbgen")
    return out


@pytest.fixture(scope="module")
def plaintext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plaintext")
    tpch.generate(SF, out, generator="dbgen")
    return out


def test_all_22_queries_on_encrypted_tables_match_duckdbs_answers_and_plaintext(
    encrypted: Path, plaintext: Path, kms: LocalKms
) -> None:
    secret = tpch.run(encrypted, kms=kms)
    plain = tpch.run(plaintext, plain=True)

    assert [r.query for r in secret] == list(range(1, 23))
    assert [(r.columns, r.rows) for r in secret] == [(r.columns, r.rows) for r in plain]
    assert [(c.query, c.status, c.reason) for c in tpch.check(secret, SF, generator="dbgen")] == [
        (q, "pass", "") for q in range(1, 23)
    ]


def test_the_files_are_encrypted_with_a_key_sidecar(encrypted: Path) -> None:
    from enclaveml.crypto.parquet import parquet_flavour

    for table in tpch.TABLES:
        assert parquet_flavour(encrypted / f"{table}.parquet") == "duckdb"
        assert (encrypted / f"{table}.parquet.eml-key").exists()
    assert b"Customer#" not in (encrypted / "customer.parquet").read_bytes()


def test_standard_flavour_is_read_through_pyarrow(tmp_path: Path, kms: LocalKms) -> None:
    tpch.generate(SF, tmp_path, kms=kms, key="customers", flavour="standard", generator="dbgen")

    results = tpch.run(tmp_path, kms=kms, queries=[1, 6, 14])

    assert [c.status for c in tpch.check(results, SF, generator="dbgen")] == ["pass"] * 3


def test_a_wrong_answer_names_the_row_and_column(encrypted: Path, kms: LocalKms) -> None:
    (result,) = tpch.run(encrypted, kms=kms, queries=[6])
    forged = tpch.QueryResult(6, result.seconds, result.columns, [(result.rows[0][0] + 1,)])

    (checked,) = tpch.check([forged], SF, generator="dbgen")

    assert checked.failed
    assert checked.reason.startswith("row 1 revenue: Decimal(")


def test_plaintext_tables_are_refused_unless_plain(plaintext: Path, kms: LocalKms) -> None:
    with pytest.raises(ConfigError, match=r"region\.parquet is not encrypted"):
        tpch.run(plaintext, kms=kms, queries=[1])


def test_a_tampered_data_page_is_an_integrity_error(encrypted: Path, tmp_path: Path, kms: LocalKms) -> None:
    copy = shutil.copytree(encrypted, tmp_path / "tampered")
    flip_byte(copy / "lineitem.parquet", 5000)  # in l_orderkey's pages: a query must read that column

    with pytest.raises(IntegrityError, match="failed authentication"):
        tpch.run(copy, kms=kms, queries=[3])


def test_a_tampered_footer_is_an_integrity_error(encrypted: Path, tmp_path: Path, kms: LocalKms) -> None:
    copy = shutil.copytree(encrypted, tmp_path / "tampered")
    flip_byte(copy / "orders.parquet", -100)

    with pytest.raises(IntegrityError, match=r"orders\.parquet.*does not belong to this file"):
        tpch.run(copy, kms=kms, queries=[3])


def test_another_key_store_cannot_read_the_tables(encrypted: Path, tmp_path: Path) -> None:
    stranger = new_kms(tmp_path / "stranger")  # has a key named customers too, other material

    with pytest.raises(EnclaveMLError, match=r"\.parquet\.eml-key") as caught:
        tpch.run(encrypted, kms=stranger, queries=[1])
    assert caught.value.exit_code in (4, 5)


def test_queries_outside_1_to_22_are_refused(encrypted: Path, kms: LocalKms) -> None:
    with pytest.raises(ConfigError, match="no TPC-H query 23"):
        tpch.run(encrypted, kms=kms, queries=[23])


def test_no_reference_answers_for_other_scale_factors() -> None:
    with pytest.raises(ConfigError, match=r"no reference answers for SF 0\.5"):
        tpch.check([], 0.5)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- the command, as a user runs it ---------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("cli-home")
    new_kms(home)
    return {**os.environ, "ENCLAVEML_HOME": str(home), "ENCLAVEML_PASSPHRASE": PASSPHRASE, "COLUMNS": "200"}


@pytest.fixture(scope="module")
def generated(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tpch gen`` with tpchgen-cli, the default generator."""
    out = tmp_path_factory.mktemp("cli") / "tpch"
    enclaveml(env, "tpch", "gen", "--sf", str(SF), "--out", str(out), "--encrypt", "--key", "customers")
    return out


def enclaveml(env: dict[str, str], *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([ENCLAVEML, *args], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == expect, (done.returncode, done.stderr)
    return done


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_gen_then_run_check_passes_every_comparable_query(env: dict[str, str], generated: Path) -> None:
    done = enclaveml(env, "tpch", "run", str(generated), "--check")

    assert "Q22" in done.stdout
    assert done.stdout.count(" pass ") == 21  # all but Q13 (see the module docstring of tpch)
    assert "skip: query 13 counts orders by o_comment" in done.stdout
    assert "fail" not in done.stdout
    assert not list(generated.glob("*.tmp")), "no temporary files left"


def test_run_json_has_one_entry_per_query(env: dict[str, str], generated: Path) -> None:
    import json

    done = enclaveml(env, "tpch", "run", str(generated), "--queries", "1,3,5", "--check", "--json")

    doc = json.loads(done.stdout)
    assert [(q["query"], q["check"]) for q in doc["queries"]] == [(1, "pass"), (3, "pass"), (5, "pass")]


def test_a_tampered_file_is_one_error_line_and_exit_4(env: dict[str, str], generated: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(generated, tmp_path / "tampered")
    flip_byte(copy / "lineitem.parquet", 5000)

    done = enclaveml(env, "tpch", "run", str(copy), "--queries", "3", expect=4)

    assert "failed authentication" in error_line(done)
    assert done.stdout == ""


def test_wrong_key_store_is_one_error_line(env: dict[str, str], generated: Path, tmp_path: Path) -> None:
    new_kms(tmp_path / "stranger")
    stranger = {**env, "ENCLAVEML_HOME": str(tmp_path / "stranger")}

    done = subprocess.run(
        [ENCLAVEML, "tpch", "run", str(generated), "--queries", "1"], env=stranger, capture_output=True, text=True
    )

    assert done.returncode in (4, 5)
    assert ".parquet.eml-key" in error_line(done)


def test_plain_on_encrypted_tables_is_a_usage_error(env: dict[str, str], generated: Path) -> None:
    done = enclaveml(env, "tpch", "run", str(generated), "--plain", expect=2)

    assert "is encrypted (run without --plain)" in error_line(done)
