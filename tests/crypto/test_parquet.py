"""Encrypted Parquet in two flavours (``docs/parquet.md``): round trips, interop, rotation, attacks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
import pytest

from enclaveml.crypto import describe_file, encrypt_bytes
from enclaveml.crypto.parquet import (
    Flavour,
    convert_parquet,
    decode_wrapped_key,
    duckdb_read_parquet_sql,
    encode_wrapped_key,
    encryption_configuration,
    kms_client_factory,
    load_httpfs,
    parquet_flavour,
    read_encrypted_parquet,
    sidecar_path,
    write_encrypted_parquet,
)
from enclaveml.errors import ConfigError, FormatError, IntegrityError, KeyNotFound, KeyServiceError
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms, WrappedKey

FLAVOURS: list[Flavour] = ["standard", "duckdb"]
ROWS = 3000


@pytest.fixture(scope="module")
def people() -> pa.Table:
    jobs = ["nurse", "engineer", "teacher", "farmer", "chef"]
    return pa.table(
        {
            "name": [f"person {i}" for i in range(ROWS)],
            "age": [18 + i % 70 for i in range(ROWS)],
            "job": [jobs[i % len(jobs)] for i in range(ROWS)],
            "salary": [30000.0 + (i * 37) % 50000 for i in range(ROWS)],
            "active": [i % 3 != 0 for i in range(ROWS)],
        }
    )


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def other_kms(tmp_path: Path) -> LocalKms:
    store = LocalKms.init(tmp_path / "other" / "ks.json", "other", kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    store.create_key("customers")  # same name, different key
    return store


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def footer_start(path: Path) -> int:
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[-8:-4], "little")


# --- round trips and interop ---------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_round_trip(kms: LocalKms, people: pa.Table, out: Path, flavour: Flavour) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour=flavour)

    assert parquet_flavour(path) == flavour
    assert read_encrypted_parquet(path, kms).equals(people)
    assert read_encrypted_parquet(path, kms, columns=["age", "job"]).equals(people.select(["age", "job"]))
    expected = {"people.parquet"} | ({"people.parquet.eml-key"} if flavour == "duckdb" else set())
    assert {p.name for p in out.iterdir()} == expected


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_unknown_column_is_a_config_error(kms: LocalKms, people: pa.Table, out: Path, flavour: Flavour) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour=flavour)
    with pytest.raises(ConfigError, match="has no column 'height'"):
        read_encrypted_parquet(path, kms, columns=["age", "height"])


def test_pyarrow_reads_a_standard_file_with_its_own_crypto_factory(kms: LocalKms, people: pa.Table, out: Path) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers")

    factory = pe.CryptoFactory(kms_client_factory(kms))
    properties = factory.file_decryption_properties(pe.KmsConnectionConfig(), pe.DecryptionConfiguration())
    assert pq.read_table(path, decryption_properties=properties).equals(people)


def test_standard_key_metadata_names_kms_key_and_version(kms: LocalKms, people: pa.Table, out: Path) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers")
    key_id = kms.describe_key("customers").key_id
    footer = path.read_bytes()[footer_start(path) :]
    assert f'"masterKeyID":"customers","wrappedDEK":"eml1:local:{key_id}:1:'.encode() in footer
    assert b'"doubleWrapping":false' in footer


def test_duckdb_file_is_queried_through_a_caller_connection(kms: LocalKms, people: pa.Table, out: Path) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour="duckdb")
    con = duckdb.connect()
    load_httpfs(con)

    source = duckdb_read_parquet_sql(con, path, kms)
    rows = con.execute(f"SELECT count(*), sum(age) FROM {source} WHERE job = 'chef'").fetchall()  # noqa: S608

    ages, jobs = people["age"].to_pylist(), people["job"].to_pylist()
    chefs = [age for age, job in zip(ages, jobs, strict=True) if job == "chef"]
    assert rows == [(len(chefs), sum(chefs))]


def test_duckdb_sql_for_a_standard_file_says_how_to_convert(kms: LocalKms, people: pa.Table, out: Path) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers")
    with pytest.raises(ConfigError, match="standard Parquet file") as raised:
        duckdb_read_parquet_sql(duckdb.connect(), path, kms)
    assert "convert_parquet" in raised.value.hint


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_rotation_keeps_old_files_readable(kms: LocalKms, people: pa.Table, out: Path, flavour: Flavour) -> None:
    old, new = out / "old.parquet", out / "new.parquet"
    write_encrypted_parquet(people, old, kms, "customers", flavour=flavour)
    kms.rotate_key("customers")
    write_encrypted_parquet(people, new, kms, "customers", flavour=flavour)

    assert read_encrypted_parquet(old, kms).equals(people)
    assert read_encrypted_parquet(new, kms).equals(people)
    if flavour == "duckdb":
        assert describe_file(sidecar_path(new)).header.envelope.key_version == 2
    else:
        assert b":2:" in new.read_bytes()[footer_start(new) :]


def test_convert_both_ways_gives_identical_tables(kms: LocalKms, people: pa.Table, out: Path) -> None:
    standard, duck, back = out / "standard.parquet", out / "duck.parquet", out / "back.parquet"
    write_encrypted_parquet(people, standard, kms, "customers")

    convert_parquet(standard, duck, kms, "customers", to="duckdb")
    convert_parquet(duck, back, kms, "customers", to="standard")

    assert parquet_flavour(duck) == "duckdb"
    assert parquet_flavour(back) == "standard"
    assert read_encrypted_parquet(duck, kms).equals(people)
    assert read_encrypted_parquet(back, kms).equals(people)


def test_flavour_detection_of_plain_and_garbage(people: pa.Table, out: Path) -> None:
    plain = out / "plain.parquet"
    pq.write_table(people, plain)
    garbage = out / "garbage.parquet"
    garbage.write_bytes(b"PARE" + os.urandom(100))

    assert parquet_flavour(plain) == "plain"
    with pytest.raises(FormatError, match="no Parquet magic"):
        parquet_flavour(garbage)


def test_wrapped_key_string_round_trip_and_rejects_malformed() -> None:
    wrapped = WrappedKey("local", "k-0123456789abcdef", 3, os.urandom(60))
    assert decode_wrapped_key(encode_wrapped_key(wrapped)) == wrapped
    for bad in ["", "eml1:local:k-1:x:AAAA", "eml2:local:k-1:1:AAAA", "eml1:local:k-1:1", "eml1:local:k-1:1:A"]:
        with pytest.raises(FormatError):
            decode_wrapped_key(bad)


# --- wrong keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_another_kms_cannot_read(kms: LocalKms, people: pa.Table, tmp_path: Path, out: Path, flavour: Flavour) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour=flavour)
    with pytest.raises(KeyNotFound, match="is not in key store"):
        read_encrypted_parquet(path, other_kms(tmp_path))


def test_standard_key_metadata_pointing_at_another_key_does_not_unwrap(
    kms: LocalKms, people: pa.Table, out: Path
) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers")
    own, other = kms.describe_key("customers").key_id, kms.create_key("suppliers").key_id
    path.write_bytes(path.read_bytes().replace(own.encode(), other.encode()))  # same length
    with pytest.raises(IntegrityError):
        read_encrypted_parquet(path, kms)


def test_duckdb_sidecar_with_another_data_key_is_rejected(kms: LocalKms, people: pa.Table, out: Path) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour="duckdb")
    kms.create_key("suppliers")
    context = describe_file(sidecar_path(path)).header.bound.context_dict()  # bound to this very file
    sidecar_path(path).write_bytes(encrypt_bytes(os.urandom(32), kms, "suppliers", context=context))
    with pytest.raises(IntegrityError, match="cannot be decrypted"):
        read_encrypted_parquet(path, kms)


class ForeignKmsClient(pe.KmsClient):  # type: ignore[misc]
    """Someone else's key management: the data key stored in the clear (never do this)."""

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        return key_bytes.hex()

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        return bytes.fromhex(wrapped_key)


def test_key_metadata_of_another_kms_client_is_a_format_error(kms: LocalKms, people: pa.Table, out: Path) -> None:
    path = out / "foreign.parquet"
    factory = pe.CryptoFactory(lambda _config: ForeignKmsClient())
    properties = factory.file_encryption_properties(pe.KmsConnectionConfig(), encryption_configuration("customers"))
    pq.write_table(people, path, encryption_properties=properties)
    with pytest.raises(FormatError, match=r"foreign\.parquet: the Parquet key metadata does not hold an enclaveml"):
        read_encrypted_parquet(path, kms)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_destroyed_key_version_is_key_not_found(kms: LocalKms, people: pa.Table, out: Path, flavour: Flavour) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour=flavour)
    kms.rotate_key("customers")
    kms.destroy_key_version("customers", 1)
    with pytest.raises(KeyNotFound, match="version 1 was destroyed"):
        read_encrypted_parquet(path, kms)


# --- tampering and missing pieces ----------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("where", ["first page", "middle"])
def test_tampered_data_page_byte(kms: LocalKms, people: pa.Table, out: Path, flavour: Flavour, where: str) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour=flavour)
    flip(path, 40 if where == "first page" else footer_start(path) // 2)
    with pytest.raises(IntegrityError, match="cannot be decrypted"):
        read_encrypted_parquet(path, kms)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("where", ["footer tag", "footer ciphertext", "crypto metadata", "file aad"])
def test_tampered_footer_byte(kms: LocalKms, people: pa.Table, out: Path, flavour: Flavour, where: str) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour=flavour)
    size = path.stat().st_size
    start = footer_start(path)
    offsets = {"footer tag": size - 12, "footer ciphertext": size - 40, "crypto metadata": start + 1}
    offsets["file aad"] = start + 5  # standard: inside aad_file_unique; duckdb: the empty algorithm struct
    flip(path, offsets[where])
    with pytest.raises(IntegrityError):  # includes FormatError for unparseable crypto metadata
        read_encrypted_parquet(path, kms)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_file(kms: LocalKms, people: pa.Table, out: Path, flavour: Flavour, keep: float) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour=flavour)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FormatError, match="truncated"):
        read_encrypted_parquet(path, kms)


def test_deleted_sidecar(kms: LocalKms, people: pa.Table, out: Path) -> None:
    path = out / "people.parquet"
    write_encrypted_parquet(people, path, kms, "customers", flavour="duckdb")
    sidecar_path(path).unlink()
    with pytest.raises(ConfigError, match=r"key sidecar people\.parquet\.eml-key is missing"):
        read_encrypted_parquet(path, kms)


def test_sidecar_of_another_file(kms: LocalKms, people: pa.Table, out: Path) -> None:
    a, b = out / "a.parquet", out / "b.parquet"
    write_encrypted_parquet(people, a, kms, "customers", flavour="duckdb")
    write_encrypted_parquet(people.slice(0, 10), b, kms, "customers", flavour="duckdb")
    sidecar_path(a).write_bytes(sidecar_path(b).read_bytes())
    with pytest.raises(IntegrityError, match=r"sidecar a\.parquet\.eml-key does not belong to this file"):
        read_encrypted_parquet(a, kms)


def test_encrypted_file_without_key_metadata_or_sidecar(kms: LocalKms, people: pa.Table, out: Path) -> None:
    path = out / "foreign.parquet"  # encrypted by someone else's scheme with a raw key
    pq.write_table(people, path, encryption_properties=pe.create_encryption_properties(os.urandom(32)))
    with pytest.raises(ConfigError, match="encrypted without key metadata"):
        read_encrypted_parquet(path, kms)


def test_plain_file_is_refused_unless_allowed(kms: LocalKms, people: pa.Table, out: Path) -> None:
    path = out / "plain.parquet"
    pq.write_table(people, path)
    with pytest.raises(ConfigError, match="plaintext Parquet file") as raised:
        read_encrypted_parquet(path, kms)
    assert "allow_plain=True" in raised.value.hint
    assert read_encrypted_parquet(path, kms, allow_plain=True).equals(people)


# --- failed writes leave nothing; plaintext never reaches disk -----------------------------


class FailingWrapKms(LocalKms):
    """The real key store, except that the KMS goes away when asked to wrap."""

    def wrap_data_key(self, name_or_id: str, data_key: bytes, associated_data: bytes) -> WrappedKey:
        raise KeyServiceError("the KMS is unreachable")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_unknown_key_writes_nothing(kms: LocalKms, people: pa.Table, out: Path, flavour: Flavour) -> None:
    with pytest.raises(KeyNotFound, match="no key 'nope'"):
        write_encrypted_parquet(people, out / "people.parquet", kms, "nope", flavour=flavour)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kms_failure_mid_write_leaves_no_file(kms: LocalKms, people: pa.Table, out: Path, flavour: Flavour) -> None:
    failing = FailingWrapKms(kms.store_path, "correct horse battery staple")
    with pytest.raises(KeyServiceError, match="unreachable"):
        write_encrypted_parquet(people, out / "people.parquet", failing, "customers", flavour=flavour)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("to", FLAVOURS)
def test_failed_convert_leaves_no_file(kms: LocalKms, people: pa.Table, out: Path, to: Flavour) -> None:
    src, dst = out / "src.parquet", out / "dst.parquet"
    write_encrypted_parquet(people, src, kms, "customers", flavour="duckdb" if to == "standard" else "standard")
    flip(src, 40)
    before = {p.name for p in out.iterdir()}
    with pytest.raises(IntegrityError):
        convert_parquet(src, dst, kms, "customers", to=to)
    assert {p.name for p in out.iterdir()} == before


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_plaintext_never_touches_disk_during_write(
    kms: LocalKms, people: pa.Table, tmp_path: Path, out: Path, flavour: Flavour, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch, cwd = tmp_path / "tmpdir", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.chdir(cwd)  # DuckDB's default spill directory is ./.tmp

    write_encrypted_parquet(people, out / "people.parquet", kms, "customers", flavour=flavour)

    assert list(scratch.iterdir()) == []
    assert list(cwd.iterdir()) == []
    for written in out.iterdir():
        data = written.read_bytes()
        assert b"person 1234" not in data
        assert b"engineer" not in data


def test_importing_the_module_does_not_import_pyarrow_or_duckdb() -> None:
    code = "import sys, enclaveml.crypto.parquet; print(sorted({'pyarrow', 'duckdb'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
