"""EML files as Python streams: a verifying plaintext reader and a sealing writer.

Arrow's CSV and JSON readers pull bytes from a file-like object and its writers push bytes
into one. ``DecryptingReader`` gives them an EML file's plaintext one verified segment at a
time and ``EncryptingWriter`` seals what they write into EML segments as it arrives, so the
plaintext only ever exists in memory, a couple of segments at a time (``docs/format.md``
sections 2 and 3 define the segments; both classes follow ``crypto._stream``'s loops, but
turned inside out: driven by the consumer's ``readinto`` / the producer's ``write``).

A reader hands out segments as soon as each verified. Truncation (the missing ``last``
flag) and trailing tampering surface only at the end of the stream, so a consumer must
treat everything it read as unauthenticated until EOF was reached without error;
``TrustedContext`` loads a table in one DuckDB statement, which a raise rolls back.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, BinaryIO

from enclaveml.crypto import DEFAULT_SEGMENT_SIZE, KeyWrapper
from enclaveml.crypto._envelope import _new_file, check_context, open_data_key
from enclaveml.crypto._format import MAGIC, TAG_SIZE, read_header
from enclaveml.crypto._stream import SegmentCipher
from enclaveml.errors import EnclaveMLError, FormatError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["DecryptingReader", "EncryptingWriter", "is_eml_file"]


def is_eml_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts with the EML magic (unauthenticated: a hint for format detection)."""
    with open(path, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def _fill(source: BinaryIO, view: memoryview) -> int:
    """Read until ``view`` is full or the file ends."""
    filled = 0
    while filled < len(view):
        got = source.readinto(view[filled:])  # type: ignore[attr-defined]
        if not got:
            break
        filled += got
    return filled


class DecryptingReader(io.RawIOBase):
    """The verified plaintext of one EML file, read front to back.

    Opening reads the header, checks the encryption ``context`` and unwraps the data key with
    ``kms`` (any ``KeyWrapper``: a KMS backend or an ``enclaveml.session()``). Each
    ``readinto`` decrypts the segments it needs; a segment is handed out only after it
    verified. The first ``EnclaveMLError`` raised is also kept in ``error``, so a caller whose
    consumer (Arrow, DuckDB) turns exceptions into strings can re-raise the real one.
    Memory: one stored segment plus one plaintext segment.
    """

    def __init__(
        self, path: str | os.PathLike[str], kms: KeyWrapper, *, context: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        self.error: EnclaveMLError | None = None
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            header = read_header(self._file)
            check_context(header.bound, context)
            self._cipher = SegmentCipher(open_data_key(header, kms), header.bound)
        except BaseException:
            self._file.close()
            raise
        size = header.bound.segment_size
        self._segment_size = size
        self._stored = size + TAG_SIZE
        # One byte of look-ahead past each stored segment tells whether it is the last one.
        self._buf = memoryview(bytearray(self._stored + 1))
        self._plain = memoryview(bytearray(size))
        self._plain_start = self._plain_end = 0
        self._index = 0
        self._done = False
        self._n = _fill(self._file, self._buf)
        if self._n == 0:
            self._file.close()
            raise FormatError("file is truncated: it has a header but no segments")

    def readable(self) -> bool:
        return True

    def readinto(self, target: WriteableBuffer) -> int:
        out = memoryview(target).cast("B")
        try:
            return self._read_into(out)
        except EnclaveMLError as exc:
            if self.error is None:
                self.error = exc
            raise

    def _read_into(self, out: memoryview) -> int:
        written = 0
        while written < len(out):
            if self._plain_start < self._plain_end:
                take = min(len(out) - written, self._plain_end - self._plain_start)
                out[written : written + take] = self._plain[self._plain_start : self._plain_start + take]
                self._plain_start += take
                written += take
            elif self._done:
                break
            elif len(out) - written >= self._segment_size:
                # Room for a whole segment: decrypt straight into the caller's buffer.
                written += self._open_next(out[written : written + self._segment_size])
            else:
                self._plain_end = self._open_next(self._plain)
                self._plain_start = 0
        return written

    def _open_next(self, into: memoryview) -> int:
        """Verify and decrypt the next segment into ``into``; returns its plaintext size."""
        n, stored = self._n, self._stored
        if n > stored:
            self._cipher.open_into(self._index, False, self._buf[:stored], into[: self._segment_size])
            self._buf[0] = self._buf[stored]
            self._n = 1 + _fill(self._file, self._buf[1:])
            self._index += 1
            return self._segment_size
        size = max(0, n - TAG_SIZE)
        self._cipher.open_into(self._index, True, self._buf[:n], into[:size])
        self._done = True
        return size

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            self._plain[:] = bytes(len(self._plain))  # drop the last plaintext segment from memory
        super().close()


class EncryptingWriter(io.RawIOBase):
    """Seals everything written to it into an EML file on ``sink``, under primary key ``key``.

    The header is written at once (its data key wrapped by ``kms``); segments follow as they
    fill; ``finish()`` seals the last one (with the ``last`` flag) and must be called exactly
    once, after which the EML file on ``sink`` is complete. ``sink`` should be an
    ``atomic_output``: a failure before ``finish()`` must leave no file behind.
    """

    def __init__(
        self,
        sink: BinaryIO,
        kms: KeyWrapper,
        key: str,
        *,
        context: Mapping[str, str] | None = None,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> None:
        super().__init__()
        header, self._cipher = _new_file(kms, key, context, segment_size, None, None)
        self._sink = sink
        self._segment_size = segment_size
        self._pending = bytearray()
        self._out = memoryview(bytearray(segment_size + TAG_SIZE))
        self._index = 0
        self._finished = False
        sink.write(header.encode())

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        if self._finished:
            raise ValueError("write after finish()")
        view = memoryview(data).cast("B")
        self._pending += view
        size = self._segment_size
        if len(self._pending) > size:
            # Keep at least one byte back: only finish() knows which segment is the last.
            whole = (len(self._pending) - 1) // size
            with memoryview(self._pending) as pending:
                for i in range(whole):
                    self._seal(pending[i * size : (i + 1) * size], last=False)
            del self._pending[: whole * size]
        return len(view)

    def _seal(self, chunk: memoryview, *, last: bool) -> None:
        out = self._out[: len(chunk) + TAG_SIZE]
        self._cipher.seal_into(self._index, last, chunk, out)
        self._sink.write(out)
        self._index += 1

    def finish(self) -> None:
        """Seal the last segment. The EML file is complete only after this returns."""
        if self._finished:
            raise ValueError("finish() called twice")
        with memoryview(self._pending) as pending:
            self._seal(pending, last=True)
        self._pending.clear()
        self._finished = True
