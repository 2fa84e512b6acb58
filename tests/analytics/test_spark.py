"""``TrustedContext(engine="spark")``: the same story as on DuckDB, on a hardened Spark with parquet-mr encryption.

One SparkSession (``local[2]``, the ``spark`` fixture of conftest.py) serves the whole module;
each test opens its own context (a child session holding that test's keys). Files cross
between Spark (parquet-mr + our Java ``EnclaveKmsClient``) and pyarrow
(``read_encrypted_parquet`` / ``write_encrypted_parquet``) in both directions; after
failures no output file exists and nothing decrypted is on disk.
"""

from __future__ import annotations

import base64
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from analytics_data import assert_no_plaintext

from enclaveml.analytics import TrustedContext
from enclaveml.analytics.spark_keys import SECRET_KEYS_PROPERTY
from enclaveml.crypto import decrypt_bytes
from enclaveml.crypto.parquet import parquet_flavour, read_encrypted_parquet, write_encrypted_parquet
from enclaveml.errors import ConfigError, IntegrityError, KeyNotFound
from enclaveml.kms import LocalKms
from enclaveml.runtime.session import ReleasedKey, Session

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="the Spark engine needs a Java runtime (java not on PATH)"),
]

QUERY = (
    "SELECT job, count(*) AS n, avg(salary) AS avg_salary FROM people "
    "WHERE age BETWEEN 20 AND 40 GROUP BY job ORDER BY job"
)
SPARK_DEFAULT_REDACTION = re.compile(r"(?i)secret|password|token|access[.]?key")


@pytest.fixture
def sctx(kms: LocalKms, spark: object) -> Iterator[TrustedContext]:
    with TrustedContext(engine="spark", kms=kms, spark_session=spark) as context:
        yield context


def rows(table: pa.Table) -> list[tuple[object, ...]]:
    return [tuple(row.values()) for row in table.to_pylist()]


def released(material: bytes) -> Session:
    return Session("broker", [ReleasedKey("customers", "k-00000000000000aa", 1, material)], {})


def test_the_session_runs_with_authentication_encryption_and_no_ui(sctx: TrustedContext) -> None:
    conf = dict(sctx.spark.sparkContext.getConf().getAll())

    assert {k: conf.get(k) for k in ("spark.authenticate", "spark.network.crypto.enabled")} == {
        "spark.authenticate": "true",
        "spark.network.crypto.enabled": "true",
    }
    assert conf["spark.io.encryption.enabled"] == "true"
    assert conf["spark.ui.enabled"] == "false"
    assert len(conf["spark.authenticate.secret"]) == 64
    assert conf["spark.hadoop.parquet.encryption.double.wrapping"] == "false"
    assert conf["spark.hadoop.parquet.encryption.data.key.length.bits"] == "256"
    local_dir = Path(conf["spark.local.dir"])
    assert local_dir.name.startswith("enclaveml-spark-")
    assert stat.S_IMODE(local_dir.stat().st_mode) == 0o700


def test_the_keys_property_is_redacted_and_never_in_spark_conf(sctx: TrustedContext, kms: LocalKms) -> None:
    material = base64.b64encode(kms.export_secret_keys_for_trusted_runtime()[0].material).decode()
    jvm = sctx.spark.sparkContext._jvm
    assert jvm is not None

    assert SPARK_DEFAULT_REDACTION.search(SECRET_KEYS_PROPERTY)
    assert material in sctx.spark.conf.get(SECRET_KEYS_PROPERTY)  # the context's own session holds it
    assert all(material not in value for _, value in sctx.spark.sparkContext.getConf().getAll())
    shown = {row[0]: row[1] for row in sctx.spark.sql(f"SET {SECRET_KEYS_PROPERTY}").collect()}
    assert material not in shown[SECRET_KEYS_PROPERTY]


def test_simple_query_gives_the_same_answer_on_spark_and_duckdb(
    sctx: TrustedContext, kms: LocalKms, people_eml: Path, work: Path
) -> None:
    sctx.read(people_eml, format="csv")
    on_spark = sctx.sql(QUERY).rows()

    with TrustedContext(engine="duckdb", kms=kms) as dctx:
        dctx.read(people_eml, format="csv")
        on_duckdb = dctx.sql(QUERY).rows()

    assert [(job, n) for job, n, _ in on_spark] == [(job, n) for job, n, _ in on_duckdb]
    assert [avg for *_, avg in on_spark] == pytest.approx([avg for *_, avg in on_duckdb])
    assert_no_plaintext(work, sctx.temp_directory)


def test_spark_writes_standard_parquet_that_pyarrow_reads(
    sctx: TrustedContext, kms: LocalKms, people_eml: Path, work: Path
) -> None:
    sctx.read(people_eml, format="csv")
    out = work / "people.parquet"

    sctx.write(sctx.table("people"), out, format="parquet", key="customers")

    assert parquet_flavour(out) == "standard"
    assert sorted(p.name for p in work.iterdir()) == ["people.csv.eml", "people.parquet"]
    assert sorted(rows(read_encrypted_parquet(out, kms))) == sorted(sctx.table("people").rows())
    assert_no_plaintext(work, sctx.temp_directory)


def test_spark_reads_a_pyarrow_written_file(sctx: TrustedContext, kms: LocalKms, work: Path) -> None:
    table = pa.table({"job": ["Accountant", "Developer", "Developer"], "salary": [10, 20, 30]})
    write_encrypted_parquet(table, work / "jobs.parquet", kms, "customers")

    sctx.read(work / "jobs.parquet", format="parquet")

    assert sctx.sql("SELECT job, sum(salary) FROM jobs GROUP BY job ORDER BY job").rows() == [
        ("Accountant", 10),
        ("Developer", 50),
    ]


def test_eml_csv_and_json_output_decrypt_to_the_answer(
    sctx: TrustedContext, kms: LocalKms, people_eml: Path, work: Path
) -> None:
    sctx.read(people_eml, format="csv")
    answer = sctx.sql(QUERY)

    sctx.write(answer, work / "adults.csv.eml", format="csv", key="customers")
    sctx.write(answer, work / "adults.json.eml", format="json", key="customers")

    text = decrypt_bytes((work / "adults.csv.eml").read_bytes(), kms).decode()
    assert text.splitlines()[0] == '"job","n","avg_salary"'
    assert len(text.splitlines()) == 1 + len(answer.rows())
    assert len(decrypt_bytes((work / "adults.json.eml").read_bytes(), kms).splitlines()) == len(answer.rows())


def test_duckdb_flavour_is_refused_with_the_way_to_convert(sctx: TrustedContext, kms: LocalKms, work: Path) -> None:
    write_encrypted_parquet(pa.table({"a": [1]}), work / "t.parquet", kms, "customers", flavour="duckdb")

    with pytest.raises(ConfigError, match="DuckDB-flavour") as caught:
        sctx.read(work / "t.parquet", format="parquet")
    assert "convert_parquet" in caught.value.hint


def test_a_file_under_a_key_that_was_not_released_fails_cleanly(kms: LocalKms, spark: object, work: Path) -> None:
    table = pa.table({"job": ["Accountant"] * 100})
    write_encrypted_parquet(table, work / "jobs.parquet", kms, "customers")

    with (
        TrustedContext(engine="spark", kms=released(bytes(32)), spark_session=spark) as other,
        pytest.raises(KeyNotFound, match="held by the 'local' KMS"),
    ):
        other.read(work / "jobs.parquet", format="parquet")


def test_wrong_key_material_is_an_integrity_error_and_leaves_no_output(spark: object, work: Path) -> None:
    with TrustedContext(engine="spark", kms=released(bytes(range(32))), spark_session=spark) as writer:
        writer.write(pa.table({"job": ["Accountant"] * 100}), work / "jobs.parquet", format="parquet")

    with (
        TrustedContext(engine="spark", kms=released(bytes(32)), spark_session=spark) as reader,
        pytest.raises(IntegrityError, match=r"jobs\.parquet cannot be decrypted"),
    ):
        reader.read(work / "jobs.parquet", format="parquet")  # the footer's key does not unwrap
    assert sorted(p.name for p in work.iterdir()) == ["jobs.parquet"]


def test_a_tampered_page_fails_the_query_and_leaves_no_output(
    sctx: TrustedContext, kms: LocalKms, people_eml: Path, work: Path
) -> None:
    sctx.read(people_eml, format="csv")
    sctx.write(sctx.table("people"), work / "people.parquet", format="parquet")
    data = bytearray((work / "people.parquet").read_bytes())
    data[len(data) // 3] ^= 0x01
    (work / "people.parquet").write_bytes(bytes(data))

    sctx.read(work / "people.parquet", format="parquet", name="tampered")  # the footer is intact

    with pytest.raises(IntegrityError, match="cannot be decrypted"):
        sctx.write(sctx.sql("SELECT * FROM tampered"), work / "copy.parquet", format="parquet")
    assert sorted(p.name for p in work.iterdir()) == ["people.csv.eml", "people.parquet"]
    assert_no_plaintext(work, sctx.temp_directory)


def test_writing_under_an_unknown_key_fails_before_spark_runs(sctx: TrustedContext, work: Path) -> None:
    with pytest.raises(KeyNotFound):
        sctx.write(pa.table({"a": [1]}), work / "t.parquet", format="parquet", key="nobody")
    assert list(work.iterdir()) == []


def test_results_match_duckdb_types(sctx: TrustedContext) -> None:
    result = sctx.sql("SELECT 1 AS one, 'x' AS letter")

    assert result.columns == ["one", "letter"]
    assert result.to_arrow().to_pylist() == [{"one": 1, "letter": "x"}]
    assert duckdb.sql("SELECT 1").fetchall() == [(1,)]


def test_without_javac_the_jar_build_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from enclaveml.analytics import spark_jar

    monkeypatch.setattr(spark_jar.shutil, "which", lambda _name: None)

    with pytest.raises(ConfigError, match="javac is not on PATH"):
        spark_jar.build_kms_client_jar(jar=tmp_path / "kms.jar")
    assert not (tmp_path / "kms.jar").exists()


def test_a_kms_that_never_hands_out_keys_is_refused_before_spark_starts(kms: LocalKms) -> None:
    class RemoteKms:
        kms_name = "broker"

        def describe_key(self, name_or_id: str) -> object:
            return kms.describe_key(name_or_id)

        def wrap_data_key(self, name_or_id: str, data_key: bytes, associated_data: bytes) -> object:
            raise AssertionError("never called")

        def unwrap_data_key(self, wrapped: object, associated_data: bytes) -> bytes:
            raise AssertionError("never called")

    with pytest.raises(ConfigError, match="cannot use a RemoteKms"):
        TrustedContext(engine="spark", kms=RemoteKms())  # type: ignore[arg-type]


def test_spark_gets_exactly_the_released_key_versions(kms: LocalKms) -> None:
    from enclaveml.analytics.spark_keys import exported_keks

    keys = [ReleasedKey("customers", "k-00000000000000aa", v, bytes([v]) * 32) for v in (1, 3)]
    session = Session("broker", keys, {})

    name, keks = exported_keks(session)

    assert name == "broker"
    assert [(k.name, k.key_id, k.version, k.material) for k in keks] == [
        (k.name, k.key_id, k.version, k.material) for k in session.export_secret_keys_for_trusted_runtime()
    ]
    assert [k.version for k in keks] == [1, 3]
    assert not [k for k in keks if k.material.hex() in repr(k)]
    assert [k.version for k in exported_keks(kms)[1]] == [1]
