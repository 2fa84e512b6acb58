"""The STREAM segment layer of EML v1 (``docs/format.md`` sections 2.3 and 3).

One function per formula: ``segment_nonce`` is section 2.3's nonce, ``SegmentCipher`` seals
and opens one segment with the bound header as associated data, and ``encrypt_stream`` /
``decrypt_stream`` run it over binary streams with two reusable buffers, so memory is
bounded by twice the segment size whatever the stream length. ``seal_buffer`` /
``open_buffer`` run it over a buffer already in memory, straight into one preallocated
output (``sealed_size`` / ``opened_size`` give its length): no copy besides the cipher's own
read and write. Written by hand because the container is ours; every primitive comes from
``cryptography``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclaveml.crypto._format import TAG_SIZE, BoundHeader
from enclaveml.errors import FormatError, IntegrityError

__all__ = [
    "SegmentCipher",
    "decrypt_stream",
    "encrypt_stream",
    "open_buffer",
    "opened_size",
    "seal_buffer",
    "sealed_size",
    "segment_nonce",
]

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


def sealed_size(segment_size: int, plaintext_size: int) -> int:
    """Stored bytes of the segments of ``plaintext_size`` bytes: ``L + n·16``, ``n = max(1, ceil(L / S))``."""
    segments = max(1, -(-plaintext_size // segment_size))
    if segments > _MAX_SEGMENTS:
        raise IntegrityError("stream has more than 2^32 segments")
    return plaintext_size + segments * TAG_SIZE


def opened_size(segment_size: int, payload_size: int) -> int:
    """Plaintext bytes in ``payload_size`` bytes of segments (section 2.4).

    Raises ``FormatError`` for a payload no writer produces (section 3, rules 3 and 5): none
    at all, a last segment shorter than its tag, or an empty last segment after data.
    """
    if payload_size <= 0:
        raise FormatError("file is truncated: it has a header but no segments")
    stored = segment_size + TAG_SIZE
    segments = -(-payload_size // stored)
    last = payload_size - (segments - 1) * stored
    if last < TAG_SIZE:
        raise FormatError("file is truncated: the last segment is shorter than its tag")
    if last == TAG_SIZE and segments > 1:
        raise FormatError("file ends with an empty segment after data (never written by EML v1)")
    if segments > _MAX_SEGMENTS:
        raise IntegrityError("stream has more than 2^32 segments")
    return payload_size - segments * TAG_SIZE


def seal_buffer(cipher: SegmentCipher, data: memoryview, out: memoryview) -> None:
    """Encrypt all of ``data`` into ``out``, exactly ``sealed_size(S, len(data))`` bytes.

    The segments only (the caller writes the header): each is one ``encrypt_into`` from a
    slice of ``data`` into a slice of ``out``. Both must be contiguous byte views.
    """
    size = cipher.segment_size
    if len(out) != sealed_size(size, len(data)):
        raise ValueError(f"output must be {sealed_size(size, len(data))} bytes, not {len(out)}")
    encrypt_into, prefix, aad, pack = cipher._aead.encrypt_into, cipher._prefix, cipher._aad, _COUNTER_FLAG.pack
    stored = size + TAG_SIZE
    last = max(0, len(data) - 1) // size
    for index in range(last + 1):
        start, at = index * size, index * stored
        encrypt_into(prefix + pack(index, index == last), data[start : start + size], aad, out[at : at + stored])


def open_buffer(cipher: SegmentCipher, payload: memoryview, out: memoryview) -> None:
    """Verify and decrypt the segments ``payload`` into ``out``, ``opened_size(S, len(payload))`` bytes.

    Rejects the same inputs, with the same errors, as ``decrypt_stream``; the payload's
    shape (rules 3 and 5) is checked before any decryption. If a segment fails
    authentication, its part of ``out`` is zeroed; the segments before it did verify, but
    the caller must discard all of ``out`` (the whole did not).
    """
    size = cipher.segment_size
    want = opened_size(size, len(payload))
    if len(out) != want:
        raise ValueError(f"output must be {want} bytes, not {len(out)}")
    decrypt_into, prefix, aad, pack = cipher._aead.decrypt_into, cipher._prefix, cipher._aad, _COUNTER_FLAG.pack
    stored = size + TAG_SIZE
    last = (len(payload) - 1) // stored
    index = 0
    try:
        for index in range(last + 1):
            start, at = index * stored, index * size
            decrypt_into(prefix + pack(index, index == last), payload[start : start + stored], aad, out[at : at + size])
    except InvalidTag:
        failed = out[index * size : (index + 1) * size]
        failed[:] = bytes(len(failed))
        raise IntegrityError(f"segment {index} failed authentication") from None
