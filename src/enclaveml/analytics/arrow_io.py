"""CSV and newline-delimited JSON, encrypted (EML) or plain, as Arrow tables.

Reading: each file (or each part file of a directory, in name order) is opened through a
``DecryptingReader`` and parsed by Arrow (``pyarrow.csv.read_csv``, ``pyarrow.json.read_json``):
Arrow pulls the plaintext block by block and parses blocks on its thread pool, so the
decrypted bytes are never held whole, only the parsed table (which is what DuckDB queries).
A table is returned only after the whole stream verified (the ``last`` segment included).
The first part fixes the schema; later parts are parsed with it, so one table never mixes
inferred types.

Writing: record batches go through Arrow's CSV writer, or one JSON object per line, into
an ``EncryptingWriter`` (or a plain file when asked), inside an ``atomic_output``.

Errors never carry plaintext: Arrow's parse errors quote the offending row, so they become a
``FormatError`` that names only the file and the format.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from enclaveml.analytics.eml_io import DecryptingReader, EncryptingWriter, is_eml_file
from enclaveml.crypto import KeyWrapper
from enclaveml.errors import ConfigError, EnclaveMLError, FormatError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["TextFormat", "TextTableReader", "part_files", "write_text_batches"]

TextFormat = Literal["csv", "json"]
_BLOCK_SIZE = 4 << 20  # Arrow's parse unit: large blocks parse faster; memory is a few blocks
_SKIPPED_PREFIXES = (".", "_")  # hidden files, _SUCCESS / _metadata markers of Spark and Hive
_SKIPPED_SUFFIXES = (".eml-key",)  # the key sidecars of DuckDB-flavour Parquet parts


def part_files(path: Path) -> list[Path]:
    """``path`` itself, or the part files of a directory in name order.

    Skipped: hidden files, ``_*`` markers (``_SUCCESS``) and ``*.eml-key`` Parquet key sidecars.
    """
    if not path.is_dir():
        if not path.exists():
            raise ConfigError(f"{path}: no such file or directory")
        return [path]
    parts = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(_SKIPPED_PREFIXES) and not p.name.endswith(_SKIPPED_SUFFIXES)
    )
    if not parts:
        raise ConfigError(f"{path}: the directory holds no part files")
    return parts


class TextTableReader:
    """Reads CSV / JSON files into one Arrow table, decrypting EML files as Arrow pulls bytes.

    Any failure is raised as an enclaveml error: the decrypting reader's own error when Arrow
    wrapped it, an opaque ``FormatError`` for Arrow's parse errors.
    """

    def __init__(self, paths: list[Path], fmt: TextFormat, kms: KeyWrapper, *, allow_plain: bool) -> None:
        self._paths, self._fmt, self._kms, self._allow_plain = paths, fmt, kms, allow_plain
        self._open: list[DecryptingReader] = []

    def read(self) -> pa.Table:
        import pyarrow as pa

        try:
            tables = [self._guarded(self._paths[0], lambda: self._read_part(self._paths[0], None))]
            for path in self._paths[1:]:
                tables.append(self._guarded(path, lambda p=path: self._read_part(p, tables[0].schema)))
        finally:
            for reader in self._open:
                reader.close()
            self._open.clear()
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def _read_part(self, path: Path, schema: pa.Schema | None) -> pa.Table:
        import pyarrow.csv as pa_csv
        import pyarrow.json as pa_json

        source: BinaryIO | str
        if is_eml_file(path):
            reader = DecryptingReader(path, self._kms)
            self._open.append(reader)
            source = reader  # type: ignore[assignment]
        elif self._allow_plain:
            source = str(path)
        else:
            raise ConfigError(
                "not encrypted (no EML header)",  # _classify prefixes the path
                "encrypt it with `enclaveml encrypt`, or pass allow_plain=True to read plaintext on purpose",
            )
        if self._fmt == "csv":
            return pa_csv.read_csv(
                source,
                read_options=pa_csv.ReadOptions(block_size=_BLOCK_SIZE),
                convert_options=pa_csv.ConvertOptions(column_types=schema) if schema is not None else None,
            )
        return pa_json.read_json(
            source,
            read_options=pa_json.ReadOptions(block_size=_BLOCK_SIZE),
            parse_options=pa_json.ParseOptions(explicit_schema=schema) if schema is not None else None,
        )

    def _guarded(self, path: Path, step: Any) -> Any:
        try:
            return step()
        except Exception as exc:
            raise self._classify(path, exc) from None

    def _classify(self, path: Path, exc: Exception) -> EnclaveMLError:
        import pyarrow as pa

        # Arrow may wrap the decrypting reader's exception: the reader kept the real one.
        for reader in self._open:
            if reader.error is not None:
                return reader.error.about(path)
        if isinstance(exc, EnclaveMLError):
            return exc.about(path)
        if isinstance(exc, pa.ArrowInvalid | pa.ArrowTypeError | pa.ArrowNotImplementedError | UnicodeDecodeError):
            # Arrow's message quotes the row that failed: never repeat it.
            return FormatError(
                f"{path}: not well-formed {self._fmt.upper()} (or a schema different from the first part)",
                "check the file before encrypting it; parse details are withheld because they quote the data",
            )
        raise exc


def _json_value(value: object) -> object:
    """``json.dumps`` fallback for Arrow's non-JSON scalar types."""
    if isinstance(value, datetime.date | datetime.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot write a {type(value).__name__} value as JSON")


def _write_json_lines(reader: pa.RecordBatchReader, sink: BinaryIO) -> None:
    encode = json.JSONEncoder(default=_json_value, ensure_ascii=False, separators=(",", ":")).encode
    for batch in reader:
        lines = "".join(encode(row) + "\n" for row in batch.to_pylist())
        sink.write(lines.encode("utf-8"))


def write_text_batches(
    reader: pa.RecordBatchReader,
    path: str | os.PathLike[str],
    fmt: TextFormat,
    *,
    kms: KeyWrapper | None,
    key: str,
) -> None:
    """Write all of ``reader`` to ``path`` as CSV / JSON lines, sealed under ``key`` unless ``kms`` is None.

    All or nothing: the file appears (by rename in its directory) only after the last batch
    and, when encrypted, the last segment were written; a failure leaves nothing behind.
    """
    import pyarrow.csv as pa_csv

    from enclaveml._atomic import atomic_output

    with atomic_output(path) as raw:
        sink: BinaryIO = raw
        writer = EncryptingWriter(raw, kms, key) if kms is not None else None
        if writer is not None:
            sink = writer  # type: ignore[assignment]
        if fmt == "csv":
            with pa_csv.CSVWriter(sink, reader.schema) as csv_writer:
                for batch in reader:
                    csv_writer.write_batch(batch)
        else:
            _write_json_lines(reader, sink)
        if writer is not None:
            writer.finish()
