"""Shared data for the analytics tests: a small people.csv, in plaintext and encrypted.

The plaintext lives in ``plain/``, apart from the ``work/`` directory the tests read from
and write to, so ``assert_no_plaintext(work)`` can prove nothing decrypted reached disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from analytics_data import PEOPLE_ROWS

from enclaveml.crypto import encrypt_file
from enclaveml.datagen.people import write_people_csv
from enclaveml.kms import LocalKms


@pytest.fixture
def people_csv(tmp_path: Path) -> Path:
    (tmp_path / "plain").mkdir()
    path = tmp_path / "plain" / "people.csv"
    write_people_csv(path, PEOPLE_ROWS)
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Where encrypted inputs and all outputs go; must never hold plaintext."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture
def spill(tmp_path: Path) -> Path:
    """The parent of DuckDB's private temp directory (a TMPDIR for the context)."""
    (tmp_path / "spill").mkdir()
    return tmp_path / "spill"


@pytest.fixture
def people_eml(people_csv: Path, work: Path, kms: LocalKms) -> Path:
    path = work / "people.csv.eml"
    encrypt_file(people_csv, path, kms, "customers")
    return path


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One hardened ``local[2]`` SparkSession per test module (starting a JVM takes seconds)."""
    from enclaveml.analytics.spark_engine import secure_spark_session, stop_spark_session

    session = secure_spark_session(
        local_dir_parent=tmp_path_factory.mktemp("spark-local"),
        conf={"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2"},
    )
    yield session
    stop_spark_session(session)
