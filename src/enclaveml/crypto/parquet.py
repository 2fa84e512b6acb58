"""Encrypted Parquet: Parquet modular encryption (AES-GCM) with data keys wrapped by our KMS.

Two flavours, because the engines do not interoperate (measured, see ``docs/parquet.md``):
DuckDB 1.5 writes encrypted files without key metadata and without a file-unique AAD, which
pyarrow and Spark cannot read, and it cannot read theirs.

``standard`` (interchange: pyarrow, Spark / parquet-mr)
    Written by ``pyarrow.parquet.encryption.CryptoFactory`` with our ``KmsClient``.
    AES_GCM_V1 (every module authenticated), encrypted footer, uniform encryption (every
    column under the footer data key: one key per file, one KMS call per write and per read;
    column-level access control is not a goal), a random file-unique AAD (parquet-cpp's
    default), 256-bit data keys, key material stored inside the file (``PKMT1`` JSON in the
    footer's key metadata). *Single wrapping*: the data key is wrapped straight by our KMS
    (AES-256 all the way; double wrapping would put a 128-bit KEK in between and only saves
    KMS calls across files written by one long-lived factory, which we do not keep).
    The Parquet master key identifier is our KMS key name. The wrapped key string is::

        eml1:<kms name>:<key id>:<key version>:<base64url ciphertext, no padding>

    so a file names the exact key version that wrapped it, and rotation keeps old files
    readable. The associated data of the wrap is the constant ``WRAP_ASSOCIATED_DATA``
    (the KmsClient callback is not told which file it serves; the file-unique AAD and the
    per-file data key keep modules from moving between files).

``duckdb`` (embedded fast path)
    Written by DuckDB ``COPY ... (ENCRYPTION_CONFIG {footer_key: ...})`` with the httpfs
    extension loaded (OpenSSL). A fresh random 256-bit data key per file, so the missing
    file-unique AAD cannot let pages move between files. The file has no key metadata, so
    the data key lives in a sidecar ``<file>.eml-key``: an EML container (``docs/format.md``)
    whose 32-byte payload is the data key, encrypted under our KMS key, with the encryption
    context ``{SIDECAR_PURPOSE_CONTEXT, "parquet.footer-sha256": <hex>}``. The digest covers
    the file's whole footer region (crypto metadata + encrypted footer + length + magic),
    which holds the footer's GCM tag: a sidecar opens for exactly one Parquet file, and a
    swapped sidecar or a changed footer fails *before* any KMS call. Reusing EML gives the
    sidecar ``enclaveml inspect`` and ``rewrap_file`` (rotation) for free.

Detection (``parquet_flavour``): ``PAR1`` at both ends is ``plain``; ``PARE`` at both ends
is encrypted, and the ``FileCryptoMetaData`` at the start of the footer region decides:
with key metadata it is ``standard``, without it ``duckdb`` (its key must come from the
sidecar). Anything else is not a whole Parquet file (``FormatError``).

Writes are atomic: a temporary file beside the target, renamed at the end; for ``duckdb``
the sidecar is renamed first, then the Parquet file, so a Parquet file never appears
without its key. Plaintext never touches disk: pyarrow encrypts while writing; DuckDB reads
the Arrow table registered in memory, with spilling to a temp directory switched off.

pyarrow and duckdb are imported inside the functions, so ``import enclaveml`` stays fast.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import importlib.util
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from enclaveml._atomic import atomic_output
from enclaveml.crypto._envelope import DATA_KEY_SIZE, WrappedKey, decrypt_bytes, encrypt_bytes
from enclaveml.errors import (
    ConfigError,
    ContextMismatch,
    EnclaveMLError,
    FormatError,
    IntegrityError,
    KeyServiceError,
)

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet.encryption as pe

    from enclaveml.kms import KeyManagementService

__all__ = [
    "SIDECAR_SUFFIX",
    "WRAP_ASSOCIATED_DATA",
    "Flavour",
    "convert_parquet",
    "duckdb_read_parquet_sql",
    "encryption_configuration",
    "kms_client_factory",
    "load_httpfs",
    "parquet_flavour",
    "read_encrypted_parquet",
    "sidecar_path",
    "write_encrypted_parquet",
]

Flavour = Literal["standard", "duckdb"]
PathLike = str | os.PathLike[str]

WRAP_ASSOCIATED_DATA = b"enclaveml parquet data key v1"
WRAPPED_KEY_TAG = "eml1"
SIDECAR_SUFFIX = ".eml-key"
SIDECAR_PURPOSE_CONTEXT = ("enclaveml.purpose", "parquet-duckdb-key")
_FOOTER_DIGEST_CONTEXT = "parquet.footer-sha256"
_MAX_CRYPTO_METADATA = 64 * 1024
_NOT_DECRYPTABLE = "cannot be decrypted: it was modified or truncated, or is not meant for this key"
_DAMAGED_HINT = "the file is damaged or not a whole Parquet file; restore it from a trusted copy"


# --- detection ---------------------------------------------------------------------------


def parquet_flavour(path: PathLike) -> Literal["plain", "standard", "duckdb"]:
    """Which kind of Parquet file ``path`` is, from its magic bytes and crypto metadata (no key)."""
    with open(path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        if size < 12:
            raise FormatError(f"{path}: {size} bytes is too short for a Parquet file (truncated?)", _DAMAGED_HINT)
        head = src.read(4)
        src.seek(size - 8)
        tail = src.read(8)
        if head == b"PAR1" and tail[4:] == b"PAR1":
            return "plain"
        if head != b"PARE" or tail[4:] != b"PARE":
            raise FormatError(f"{path}: no Parquet magic at both ends: truncated, or not a Parquet file", _DAMAGED_HINT)
        footer_len = int.from_bytes(tail[:4], "little")
        if footer_len > size - 12:
            raise FormatError(f"{path}: the footer length points outside the file (truncated?)", _DAMAGED_HINT)
        src.seek(size - 8 - footer_len)
        algorithm, key_metadata = _read_crypto_metadata(src.read(min(footer_len, _MAX_CRYPTO_METADATA)), path)
    if algorithm != 1:
        raise FormatError(
            f"{path}: encrypted with AES_GCM_CTR_V1, which leaves data pages unauthenticated",
            "re-encrypt it with AES_GCM_V1 (write_encrypted_parquet does)",
        )
    return "standard" if key_metadata else "duckdb"


class _Compact:
    """Just enough of Thrift's compact protocol to read Parquet's ``FileCryptoMetaData``."""

    def __init__(self, data: bytes, path: PathLike) -> None:
        self.data, self.pos, self.path = data, 0, path

    def fail(self) -> FormatError:
        return FormatError(f"{self.path}: the Parquet crypto metadata is malformed", _DAMAGED_HINT)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail()
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        value = shift = 0
        while shift < 64:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise self.fail()

    def binary(self) -> bytes:
        n = self.varint()
        if self.pos + n > len(self.data):
            raise self.fail()
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def fields(self) -> Iterator[tuple[int, int]]:
        """(field id, type) of each field of a struct, up to its stop byte."""
        field_id = 0
        while (head := self.byte()) != 0:
            delta, ftype = head >> 4, head & 0x0F
            field_id = field_id + delta if delta else self.varint() >> 1  # zigzag i16, non-negative ids
            yield field_id, ftype

    def skip(self, ftype: int, depth: int = 0) -> None:
        if depth > 16:
            raise self.fail()
        if ftype in (1, 2):  # bool: the value is in the type nibble
            return
        if ftype == 3:
            self.byte()
        elif ftype in (4, 5, 6):
            self.varint()
        elif ftype == 7:
            self.pos += 8
        elif ftype == 8:
            self.binary()
        elif ftype in (9, 10):
            head = self.byte()
            count = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(count):
                self.byte() if head & 0x0F in (1, 2) else self.skip(head & 0x0F, depth + 1)
        elif ftype == 12:
            for _, inner in self.fields():
                self.skip(inner, depth + 1)
        else:  # maps never occur in FileCryptoMetaData
            raise self.fail()


def _read_crypto_metadata(data: bytes, path: PathLike) -> tuple[int, bytes | None]:
    """(algorithm: 1 = AES_GCM_V1, 2 = AES_GCM_CTR_V1; key_metadata) of ``FileCryptoMetaData``."""
    reader = _Compact(data, path)
    algorithm, key_metadata = 0, None
    for field_id, ftype in reader.fields():
        if field_id == 1 and ftype == 12:  # EncryptionAlgorithm union: the set field names it
            for member, inner in reader.fields():
                algorithm = member
                reader.skip(inner)
        elif field_id == 2 and ftype == 8:
            key_metadata = reader.binary()
        else:
            reader.skip(ftype)
    if algorithm not in (1, 2):
        raise reader.fail()
    return algorithm, key_metadata


# --- standard flavour: pyarrow CryptoFactory + our KmsClient -------------------------------


def encode_wrapped_key(wrapped: WrappedKey) -> str:
    """``eml1:<kms>:<key id>:<version>:<base64url ciphertext>`` (the ``wrappedDEK`` string)."""
    if ":" in wrapped.kms or ":" in wrapped.key_id:
        raise ConfigError(f"KMS name {wrapped.kms!r} or key id {wrapped.key_id!r} contains ':'")
    ciphertext = base64.urlsafe_b64encode(wrapped.ciphertext).rstrip(b"=").decode("ascii")
    return f"{WRAPPED_KEY_TAG}:{wrapped.kms}:{wrapped.key_id}:{wrapped.key_version}:{ciphertext}"


def decode_wrapped_key(text: str) -> WrappedKey:
    parts = text.split(":")
    if len(parts) != 5 or parts[0] != WRAPPED_KEY_TAG or not parts[3].isdigit() or not parts[1] or not parts[2]:
        raise FormatError(
            "the Parquet key metadata does not hold an enclaveml wrapped key",
            "the file was encrypted through another key management scheme; read it with that scheme",
        )
    try:
        ciphertext = base64.urlsafe_b64decode(parts[4] + "=" * (-len(parts[4]) % 4))
    except (binascii.Error, ValueError):
        raise FormatError("the wrapped key in the Parquet key metadata is not base64url") from None
    return WrappedKey(parts[1], parts[2], int(parts[3]), ciphertext)


@functools.cache
def _kms_client_class() -> type[pe.KmsClient]:
    import pyarrow.parquet.encryption as pe

    class EnclaveKmsClient(pe.KmsClient):  # type: ignore[misc]
        """Parquet's KmsClient over a ``KeyManagementService``: master key id = our key name."""

        def __init__(self, kms: KeyManagementService) -> None:
            pe.KmsClient.__init__(self)
            self._kms = kms

        def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
            return encode_wrapped_key(self._kms.wrap_data_key(master_key_identifier, key_bytes, WRAP_ASSOCIATED_DATA))

        def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
            # The wrapped string names key id and version; the name is only informative.
            return self._kms.unwrap_data_key(decode_wrapped_key(wrapped_key), WRAP_ASSOCIATED_DATA)

    return EnclaveKmsClient


def kms_client_factory(kms: KeyManagementService) -> Callable[[pe.KmsConnectionConfig], pe.KmsClient]:
    """The ``kms_client_factory`` for ``pyarrow.parquet.encryption.CryptoFactory`` backed by ``kms``."""
    client_class = _kms_client_class()
    return lambda _config: client_class(kms)


def encryption_configuration(key: str) -> pe.EncryptionConfiguration:
    """The standard flavour's settings (module docstring), for ``key`` (our KMS key name)."""
    import pyarrow.parquet.encryption as pe

    return pe.EncryptionConfiguration(
        footer_key=key,
        uniform_encryption=True,
        encryption_algorithm="AES_GCM_V1",
        plaintext_footer=False,
        double_wrapping=False,
        internal_key_material=True,
        data_key_length_bits=256,
    )


def _write_standard(table: pa.Table, path: PathLike, kms: KeyManagementService, key: str) -> None:
    import pyarrow.parquet as pq
    import pyarrow.parquet.encryption as pe

    factory = pe.CryptoFactory(kms_client_factory(kms))
    properties = factory.file_encryption_properties(pe.KmsConnectionConfig(), encryption_configuration(key))
    with atomic_output(path) as out:
        pq.write_table(table, out, encryption_properties=properties)


def _read_standard(path: PathLike, kms: KeyManagementService, columns: Sequence[str] | None) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyarrow.parquet.encryption as pe

    factory = pe.CryptoFactory(kms_client_factory(kms))
    properties = factory.file_decryption_properties(pe.KmsConnectionConfig(), pe.DecryptionConfiguration())
    try:
        parquet = pq.ParquetFile(path, decryption_properties=properties)  # unwraps the key: KMS errors
        _check_columns(path, parquet.schema_arrow.names, columns)
        return parquet.read(columns=list(columns) if columns is not None else None)
    except (OSError, pa.ArrowException):
        raise IntegrityError(f"{path} {_NOT_DECRYPTABLE}") from None
    except (FormatError, KeyServiceError) as exc:  # raised by our KmsClient, which does not know the file
        raise exc.about(path) from None


def _check_columns(path: PathLike, names: Sequence[str], columns: Sequence[str] | None) -> None:
    missing = [c for c in columns or () if c not in names and c.split(".")[0] not in names]
    if missing:
        raise ConfigError(f"{path} has no column {', '.join(map(repr, missing))}", f"it has {', '.join(names)}")


# --- duckdb flavour: DuckDB COPY + EML sidecar ---------------------------------------------


def sidecar_path(path: PathLike) -> Path:
    """Where the wrapped data key of a duckdb-flavour file lives: ``<file>.eml-key``."""
    return Path(f"{os.fspath(path)}{SIDECAR_SUFFIX}")


def load_httpfs(con: duckdb.DuckDBPyConnection) -> None:
    """LOAD the httpfs extension shipped in the ``duckdb-extension-httpfs`` wheel (never downloads)."""
    import duckdb

    spec = importlib.util.find_spec("duckdb_extension_httpfs")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "DuckDB's httpfs extension is not installed: DuckDB cannot write encrypted Parquet without it",
            f"pip install duckdb-extension-httpfs=={duckdb.__version__}",
        )
    extension = Path(spec.origin).parent / "extensions" / f"v{duckdb.__version__}"
    extension /= "httpfs.duckdb_extension"
    if not extension.is_file():
        raise ConfigError(
            f"the installed duckdb-extension-httpfs has no extension for DuckDB {duckdb.__version__}",
            f"pip install duckdb-extension-httpfs=={duckdb.__version__}",
        )
    con.execute(f"LOAD {_sql_string(str(extension))}")


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect() -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB: no spilling (plaintext would reach the temp directory)."""
    import duckdb

    con = duckdb.connect(":memory:", config={"temp_directory": "", "enable_external_file_cache": False})
    load_httpfs(con)
    return con


def _add_key(con: duckdb.DuckDBPyConnection, name: str, data_key: bytes) -> None:
    import duckdb

    secret = base64.b64encode(data_key).decode("ascii")
    try:
        con.execute(f"PRAGMA add_parquet_key({_sql_string(name)}, '{secret}')")
    except duckdb.Error:
        # never chain: DuckDB quotes the statement, which holds the key
        raise ConfigError("DuckDB refused to register a Parquet key") from None


def _footer_digest(path: PathLike) -> str:
    """SHA-256 (hex) of the footer region: crypto metadata, encrypted footer, length, magic."""
    with open(path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        src.seek(size - 8)
        footer_len = int.from_bytes(src.read(4), "little")
        src.seek(size - 8 - footer_len)
        return hashlib.sha256(src.read(footer_len + 8)).hexdigest()


def _sidecar_context(digest: str) -> dict[str, str]:
    return {SIDECAR_PURPOSE_CONTEXT[0]: SIDECAR_PURPOSE_CONTEXT[1], _FOOTER_DIGEST_CONTEXT: digest}


def _open_sidecar(path: PathLike, kms: KeyManagementService) -> tuple[bytes, str]:
    """The data key of a duckdb-flavour file, and its footer digest; checks the pairing first."""
    sidecar = sidecar_path(path)
    try:
        blob = sidecar.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is encrypted without key metadata and its key sidecar {sidecar.name} is missing",
            "the sidecar holds the file's wrapped data key; restore it beside the file (it cannot be recreated)",
        ) from None
    digest = _footer_digest(path)
    try:
        data_key = decrypt_bytes(blob, kms, context=_sidecar_context(digest))
    except ContextMismatch:
        raise IntegrityError(
            f"{path}: key sidecar {sidecar.name} does not belong to this file "
            "(a swapped sidecar, or the file's footer was modified)"
        ) from None
    except EnclaveMLError as exc:
        raise exc.about(sidecar) from None
    if len(data_key) != DATA_KEY_SIZE:
        raise FormatError(f"{sidecar}: holds {len(data_key)} bytes, not a {DATA_KEY_SIZE}-byte data key")
    return bytes(data_key), digest


def _write_duckdb(table: pa.Table, path: PathLike, kms: KeyManagementService, key: str) -> None:
    import duckdb

    kms.describe_key(key)  # unknown key: fail before anything is written
    target, sidecar = Path(path), sidecar_path(path)
    data_key = secrets.token_bytes(DATA_KEY_SIZE)
    key_name = "eml_write_" + secrets.token_hex(8)
    with _temporary_beside(target) as tmp_parquet, _temporary_beside(sidecar) as tmp_sidecar:
        con = _connect()
        try:
            _add_key(con, key_name, data_key)
            con.register("eml_source", table)
            con.execute(  # every interpolated value goes through _sql_string
                f"COPY (SELECT * FROM eml_source) TO {_sql_string(str(tmp_parquet))} "  # noqa: S608
                f"(FORMAT parquet, ENCRYPTION_CONFIG {{footer_key: {_sql_string(key_name)}}})"
            )
        except duckdb.Error as exc:
            raise ConfigError(f"DuckDB could not write {target}: {type(exc).__name__}") from None
        finally:
            con.close()
        tmp_parquet.chmod(0o600)  # DuckDB recreates the file; match atomic_output's mode
        blob = encrypt_bytes(data_key, kms, key, context=_sidecar_context(_footer_digest(tmp_parquet)))
        tmp_sidecar.write_bytes(blob)
        tmp_sidecar.replace(sidecar)  # the key first: never a Parquet file without its key
        tmp_parquet.replace(target)


@contextlib.contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    """A 0600 temporary path in ``target``'s directory, removed unless renamed away."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def duckdb_read_parquet_sql(con: duckdb.DuckDBPyConnection, path: PathLike, kms: KeyManagementService) -> str:
    """Register a duckdb-flavour file's key in ``con``; return ``read_parquet(...)`` for a FROM clause."""
    flavour = parquet_flavour(path)
    if flavour != "duckdb":
        raise ConfigError(
            f"{path} is a {flavour} Parquet file, which DuckDB cannot read with an enclaveml key",
            "read it with read_encrypted_parquet, or convert it: convert_parquet(src, dst, kms, key, to='duckdb')",
        )
    data_key, digest = _open_sidecar(path, kms)
    load_httpfs(con)
    key_name = "eml_" + digest[:32]  # one name per file; the digest is public (footer bytes)
    _add_key(con, key_name, data_key)
    return f"read_parquet({_sql_string(os.fspath(path))}, encryption_config={{footer_key: {_sql_string(key_name)}}})"


def _read_duckdb(path: PathLike, kms: KeyManagementService, columns: Sequence[str] | None) -> pa.Table:
    import duckdb

    con = _connect()
    try:
        source = duckdb_read_parquet_sql(con, path, kms)
        try:
            empty: pa.Table = con.execute(f"SELECT * FROM {source} LIMIT 0").to_arrow_table()  # noqa: S608 - quoted
            _check_columns(path, empty.schema.names, columns)
            selected = "*" if columns is None else ", ".join(_sql_identifier(c) for c in columns)
            query = f"SELECT {selected} FROM {source}"  # noqa: S608 - names and path are quoted
            table: pa.Table = con.execute(query).to_arrow_table()
        except (duckdb.InvalidInputException, duckdb.IOException):  # "Computed AES tag differs", bad offsets
            raise IntegrityError(f"{path} {_NOT_DECRYPTABLE}") from None
        except duckdb.Error as exc:  # e.g. out of memory: not the file's fault
            raise ConfigError(f"DuckDB could not read {path}: {type(exc).__name__}") from None
    finally:
        con.close()
    return table


# --- the API ------------------------------------------------------------------------------


def write_encrypted_parquet(
    table: pa.Table, path: PathLike, kms: KeyManagementService, key: str, *, flavour: Flavour = "standard"
) -> None:
    """Write ``table`` encrypted under KMS key ``key``; ``path`` appears only when complete."""
    if flavour == "standard":
        _write_standard(table, path, kms, key)
    elif flavour == "duckdb":
        _write_duckdb(table, path, kms, key)
    else:
        raise ConfigError(f"unknown Parquet flavour {flavour!r}", "use 'standard' or 'duckdb'")


def read_encrypted_parquet(
    path: PathLike,
    kms: KeyManagementService,
    *,
    columns: Sequence[str] | None = None,
    allow_plain: bool = False,
) -> pa.Table:
    """Read an encrypted Parquet file of either flavour into Arrow (plaintext only in memory).

    A plaintext file is refused unless ``allow_plain=True``: a reader that silently accepts
    one could be handed a forged, unencrypted substitute.
    """
    flavour = parquet_flavour(path)
    if flavour == "standard":
        return _read_standard(path, kms, columns)
    if flavour == "duckdb":
        return _read_duckdb(path, kms, columns)
    if not allow_plain:
        raise ConfigError(
            f"{path} is a plaintext Parquet file, not an encrypted one",
            "pass allow_plain=True to read unencrypted Parquet on purpose",
        )
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=list(columns) if columns is not None else None)


def convert_parquet(src: PathLike, dst: PathLike, kms: KeyManagementService, key: str, *, to: Flavour) -> None:
    """Re-encrypt ``src`` (either flavour) into ``dst`` of flavour ``to`` under ``key``, atomically.

    The table is held in memory between the two steps; nothing plaintext is written.
    """
    table = read_encrypted_parquet(src, kms)
    write_encrypted_parquet(table, dst, kms, key, flavour=to)
