"""``enclaveml convert``: DuckDB flavour to standard and back, as a user runs it; tampering leaves no output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pytest

from enclaveml.crypto.parquet import parquet_flavour, read_encrypted_parquet, write_encrypted_parquet
from enclaveml.kms import LocalKms

ENCLAVEML = str(Path(sys.executable).with_name("enclaveml"))
PASSPHRASE = "correct horse battery staple"  # the `kms` fixture's (tests/conftest.py)
TABLE = pa.table({"job": ["Accountant", "Developer", "Nurse"] * 2000, "salary": list(range(6000))})


@pytest.fixture
def env(kms: LocalKms) -> dict[str, str]:
    return {**os.environ, "ENCLAVEML_HOME": str(kms.store_path.parent), "ENCLAVEML_PASSPHRASE": PASSPHRASE}


def enclaveml(env: dict[str, str], *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([ENCLAVEML, *args], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == expect, (done.returncode, done.stderr)
    return done


def test_duckdb_flavour_to_standard_and_back_keeps_the_table(env: dict[str, str], kms: LocalKms, work: Path) -> None:
    write_encrypted_parquet(TABLE, work / "people.duck.parquet", kms, "customers", flavour="duckdb")

    enclaveml(
        env,
        "convert",
        str(work / "people.duck.parquet"),
        str(work / "people.parquet"),
        "--to",
        "standard",
        "--key",
        "customers",
        "--kms",
        "local",
    )
    enclaveml(
        env,
        "convert",
        str(work / "people.parquet"),
        str(work / "again.duck.parquet"),
        "--to",
        "duckdb",
        "--key",
        "customers",
    )

    assert parquet_flavour(work / "people.parquet") == "standard"
    assert parquet_flavour(work / "again.duck.parquet") == "duckdb"
    assert read_encrypted_parquet(work / "people.parquet", kms).equals(TABLE)
    assert read_encrypted_parquet(work / "again.duck.parquet", kms).equals(TABLE)


@pytest.mark.parametrize("flavour", ["standard", "duckdb"])
def test_a_tampered_source_is_one_error_line_exit_4_and_no_destination(
    env: dict[str, str], kms: LocalKms, work: Path, flavour: Literal["standard", "duckdb"]
) -> None:
    source = work / "people.src.parquet"
    write_encrypted_parquet(TABLE, source, kms, "customers", flavour=flavour)
    data = bytearray(source.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside a column chunk
    source.write_bytes(bytes(data))
    before = sorted(p.name for p in work.iterdir())

    done = enclaveml(
        env, "convert", str(source), str(work / "out.parquet"), "--to", "standard", "--key", "customers", expect=4
    )

    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ")
    assert "cannot be decrypted" in done.stderr
    assert sorted(p.name for p in work.iterdir()) == before


def test_an_unknown_flavour_is_a_usage_error(env: dict[str, str], work: Path) -> None:
    done = enclaveml(
        env, "convert", "a.parquet", str(work / "b.parquet"), "--to", "parquet", "--key", "customers", expect=2
    )

    assert "'parquet' is not one of 'duckdb', 'standard'" in done.stderr
    assert list(work.iterdir()) == []
