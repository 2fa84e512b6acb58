"""Random access to an EML file: ``open_reader(path, kms).pread(offset, n)``.

Section 2.4 of ``docs/format.md``: segment boundaries follow from the file size alone.
Opening authenticates the last segment (``last = 1``), which proves the plaintext length
(a file truncated at a segment boundary fails here); each read then decrypts only the
segments it touches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import BinaryIO

from enclaveml.crypto._envelope import KeyWrapper, check_context, open_data_key
from enclaveml.crypto._format import TAG_SIZE, Header, layout, read_header
from enclaveml.crypto._stream import SegmentCipher
from enclaveml.errors import FormatError

__all__ = ["EmlReader", "open_reader"]


class EmlReader:
    """A verified, seekable view of one EML file's plaintext. Use as a context manager."""

    def __init__(self, handle: BinaryIO, header: Header, cipher: SegmentCipher) -> None:
        self._handle = handle
        self.header = header
        self._cipher = cipher
        self._stored = header.bound.segment_size + TAG_SIZE
        shape = layout(header, os.fstat(handle.fileno()).st_size)
        self._segments, self._last_stored = shape.segments, shape.last_segment_size
        # Authenticating the last segment proves the length before any read trusts it.
        self._read_segment(self._segments - 1)
        self.size = shape.plaintext_size

    def _read_segment(self, index: int) -> bytes:
        last = index == self._segments - 1
        length = self._last_stored if last else self._stored
        data = os.pread(self._handle.fileno(), length, self.header.size + index * self._stored)
        if len(data) != length:
            raise FormatError("file changed size while it was being read")
        return self._cipher.open(index, last, data)

    def pread(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` plaintext bytes from ``offset`` (fewer at the end)."""
        if offset < 0 or size < 0:
            raise ValueError("offset and size must be non-negative")
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        seg = self.header.bound.segment_size
        first, last = offset // seg, (end - 1) // seg
        parts = [self._read_segment(i) for i in range(first, last + 1)]
        joined = b"".join(parts)
        start = offset - first * seg
        return joined[start : start + (end - offset)]

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> EmlReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(
    path: str | os.PathLike[str], kms: KeyWrapper, *, context: Mapping[str, str] | None = None
) -> EmlReader:
    """Open ``path`` for random access; raises if the header or last segment do not verify."""
    handle = open(path, "rb")  # noqa: SIM115 - owned by the returned reader
    try:
        header = read_header(handle)
        check_context(header.bound, context)
        return EmlReader(handle, header, SegmentCipher(open_data_key(header, kms), header.bound))
    except BaseException:
        handle.close()
        raise
