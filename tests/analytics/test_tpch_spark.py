"""The Spark engine on the stories the DuckDB tests tell: TPC-H SF 0.01 and the SimpleQuery example.

TPC-H runs on DuckDB's dbgen data (the data of its reference answers) written as
standard-flavour encrypted Parquet, so every one of the 22 answers is compared with
``tpch_answers()`` by the same checker as ``test_tpch.py``; the encrypted run must equal a
plaintext run of the same data exactly. One SparkSession (the ``spark`` fixture of
conftest.py) serves both runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enclaveml.analytics import tpch
from enclaveml.analytics.tpch_spark import run_spark
from enclaveml.crypto import decrypt_bytes
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.runtime.session import SESSION_FD_ENV

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="the Spark engine needs a Java runtime (java not on PATH)"),
]

SF = 0.01
PASSPHRASE = "correct horse battery staple"  # also the `kms` fixture's (tests/conftest.py)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "simple_query.py"


@pytest.fixture(scope="module")
def tpch_kms(tmp_path_factory: pytest.TempPathFactory) -> LocalKms:
    home = tmp_path_factory.mktemp("home")
    store = LocalKms.init(home / "keystore.json", PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    store.create_key("customers")
    return store


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory, tpch_kms: LocalKms) -> Path:
    out = tmp_path_factory.mktemp("encrypted")
    tpch.generate(SF, out, kms=tpch_kms, key="customers", flavour="standard", generator="dbgen")
    return out


@pytest.fixture(scope="module")
def plaintext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plaintext")
    tpch.generate(SF, out, generator="dbgen")
    return out


def test_all_22_queries_on_spark_match_duckdbs_answers_and_plaintext(
    encrypted: Path, plaintext: Path, tpch_kms: LocalKms, spark: object
) -> None:
    secret = run_spark(encrypted, tpch.QUERIES, kms=tpch_kms, spark=spark)
    plain = run_spark(plaintext, tpch.QUERIES, plain=True, spark=spark)

    assert [r.query for r in secret] == list(range(1, 23))
    assert [(r.columns, r.rows) for r in secret] == [(r.columns, r.rows) for r in plain]
    manifest = tpch.read_manifest(encrypted)
    assert (manifest.flavour, manifest.generator) == ("standard", "dbgen")
    assert [(c.query, c.status, c.reason) for c in tpch.check(secret, SF, generator=manifest.generator)] == [
        (q, "pass", "") for q in range(1, 23)
    ]


# --- SimpleQuery, as a user runs it on either engine -----------------------------------------


def test_simple_query_example_prints_and_writes_the_same_answer_on_both_engines(
    people_eml: Path, work: Path, kms: LocalKms
) -> None:
    env = {k: v for k, v in os.environ.items() if k != SESSION_FD_ENV}
    env |= {"ENCLAVEML_HOME": str(kms.store_path.parent), "ENCLAVEML_PASSPHRASE": PASSPHRASE}

    runs = {engine: run_example(engine, people_eml, work / f"{engine}.csv.eml", env) for engine in ("duckdb", "spark")}

    for run in runs.values():
        assert run.returncode == 0, run.stderr
    assert runs["spark"].stdout == runs["duckdb"].stdout
    assert "Developer" in runs["spark"].stdout
    answers = {engine: decrypt_bytes((work / f"{engine}.csv.eml").read_bytes(), kms) for engine in runs}
    assert answers["spark"] == answers["duckdb"]
    assert answers["spark"].startswith(b'"job","n","avg_salary"')


def run_example(engine: str, source: Path, answer: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    args = [str(source), str(answer), "--kms", "local", "--engine", engine]
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )
