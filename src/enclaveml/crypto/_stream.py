"""The STREAM segment layer of EML v1 (``docs/format.md`` sections 2.3 and 3).

One function per formula: ``segment_nonce`` is section 2.3's nonce, ``SegmentCipher`` seals
and opens one segment with the bound header as associated data, and ``encrypt_stream`` /
``decrypt_stream`` run it over binary streams with two reusable buffers, so memory is
bounded by twice the segment size whatever the stream length. Written by hand because the
container is ours; every primitive comes from ``cryptography``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclaveml.crypto._format import TAG_SIZE, BoundHeader
from enclaveml.errors import FormatError, IntegrityError

__all__ = ["SegmentCipher", "decrypt_stream", "encrypt_stream", "segment_nonce"]

Progress = Callable[[int], None]
_MAX_SEGMENTS = 1 << 32
_COUNTER_FLAG = struct.Struct(">IB")


def segment_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    """``nonce_prefix ‖ u32(index) ‖ u8(last)``."""
    if not 0 <= index < _MAX_SEGMENTS:
        raise IntegrityError("stream has more than 2^32 segments")
    return prefix + _COUNTER_FLAG.pack(index, 1 if last else 0)


class SegmentCipher:
    """Seals and opens the segments of one file: its data key and bound header."""

    def __init__(self, data_key: bytes, header: BoundHeader) -> None:
        if len(data_key) != 32:
            raise ValueError("data key must be 32 bytes")
        self._aead = AESGCM(data_key)
        self._prefix = header.nonce_prefix
        self._aad = header.raw
        self.segment_size = header.segment_size

    def seal_into(self, index: int, last: bool, chunk: memoryview, out: memoryview) -> None:
        """Encrypt ``chunk`` into ``out`` (exactly ``len(chunk) + 16`` bytes)."""
        self._aead.encrypt_into(segment_nonce(self._prefix, index, last), chunk, self._aad, out)

    def open_into(self, index: int, last: bool, segment: memoryview, out: memoryview) -> None:
        """Decrypt and verify ``segment`` into ``out``; ``out`` is garbage if this raises."""
        if len(segment) < TAG_SIZE:
            raise FormatError("file is truncated: the last segment is shorter than its tag")
        if last and index > 0 and len(segment) == TAG_SIZE:
            raise FormatError("file ends with an empty segment after data (never written by EML v1)")
        try:
            self._aead.decrypt_into(segment_nonce(self._prefix, index, last), segment, self._aad, out)
        except InvalidTag:
            raise IntegrityError(f"segment {index} failed authentication") from None

    def open(self, index: int, last: bool, segment: bytes) -> bytes:
        out = bytearray(max(0, len(segment) - TAG_SIZE))
        self.open_into(index, last, memoryview(segment), memoryview(out))
        return bytes(out)


def _fill(source: BinaryIO, view: memoryview) -> int:
    """Read until ``view`` is full or the stream ends; pipes may return short reads."""
    filled = 0
    want = len(view)
    while filled < want:
        got = source.readinto(view[filled:] if filled else view)  # type: ignore[attr-defined]
        if not got:
            break
        filled += got
    return filled


def encrypt_stream(cipher: SegmentCipher, source: BinaryIO, sink: BinaryIO, progress: Progress | None = None) -> int:
    """Encrypt all of ``source`` into ``sink`` (segments only; the caller writes the header).

    Reads one byte past each segment so it knows which segment is the last: the buffer
    holds a segment plus that byte, which then starts the next segment. One input buffer
    (not two alternating ones) keeps each segment in cache between its read and its
    encryption. Returns plaintext bytes.
    """
    size = cipher.segment_size
    buf = memoryview(bytearray(size + 1))
    out = memoryview(bytearray(size + TAG_SIZE))
    chunk, rest = buf[:size], buf[1:]
    n = _fill(source, buf)
    index = total = 0
    while n > size:
        cipher.seal_into(index, False, chunk, out)
        sink.write(out)
        total += size
        if progress is not None:
            progress(size)
        buf[0] = buf[size]
        n = 1 + _fill(source, rest)
        index += 1
    cipher.seal_into(index, True, buf[:n], out[: n + TAG_SIZE])
    sink.write(out[: n + TAG_SIZE])
    if progress is not None:
        progress(n)
    return total + n


def decrypt_stream(cipher: SegmentCipher, source: BinaryIO, sink: BinaryIO, progress: Progress | None = None) -> int:
    """Verify and decrypt the segments of ``source`` (positioned after the header) into ``sink``.

    Each segment is written only after it verified. A failure in a later segment leaves the
    earlier plaintext in ``sink``: callers writing files must write to a temporary file.
    Like ``encrypt_stream``, it reads one byte past each segment to learn which is the last.
    """
    size = cipher.segment_size
    stored = size + TAG_SIZE
    buf = memoryview(bytearray(stored + 1))
    plain = memoryview(bytearray(size))
    segment, rest = buf[:stored], buf[1:]
    n = _fill(source, buf)
    if n == 0:
        raise FormatError("file is truncated: it has a header but no segments")
    index = total = 0
    while n > stored:
        cipher.open_into(index, False, segment, plain)
        sink.write(plain)
        total += size
        if progress is not None:
            progress(stored)
        buf[0] = buf[stored]
        n = 1 + _fill(source, rest)
        index += 1
    n_plain = max(0, n - TAG_SIZE)
    cipher.open_into(index, True, buf[:n], plain[:n_plain])
    sink.write(plain[:n_plain])
    if progress is not None:
        progress(n)
    return total + n_plain
