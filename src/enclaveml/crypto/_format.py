"""EML v1 header: byte layout, encoding and strict parsing (``docs/format.md`` section 2).

Written by hand because it is our own format; every rejection rule of section 3 (rules 1–3)
raises ``FormatError`` naming the field, never the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

from enclaveml.errors import FormatError

__all__ = [
    "ALGORITHM_AES256_GCM_STREAM",
    "DEFAULT_SEGMENT_SIZE",
    "MAGIC",
    "MAX_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "NONCE_PREFIX_SIZE",
    "TAG_SIZE",
    "BoundHeader",
    "Envelope",
    "Header",
    "Layout",
    "layout",
    "read_header",
]

MAGIC = b"\x89EML\r\n\x1a\n"
VERSION = 1
ALGORITHM_AES256_GCM_STREAM = 1
NONCE_PREFIX_SIZE = 7
TAG_SIZE = 16
MIN_SEGMENT_SIZE = 1024
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
DEFAULT_SEGMENT_SIZE = 256 * 1024
MAX_DESCRIPTOR = 4096
MAX_ENVELOPE = 1024
MAX_CONTEXT_KEY = 255
MAX_CONTEXT_VALUE = 1024

_FIXED = struct.Struct(">8sBBI7sH")  # magic, version, algorithm, segment_size, nonce_prefix, D


@dataclass(frozen=True)
class Envelope:
    """The wrapped data key and the primary key version that wrapped it (section 2.2)."""

    key_version: int
    wrapped_key: bytes

    def encode(self) -> bytes:
        size = 4 + len(self.wrapped_key)
        if self.key_version < 1 or self.key_version > 0xFFFFFFFF:
            raise ValueError("key_version must be a u32 >= 1")
        if not 4 < size <= MAX_ENVELOPE:
            raise ValueError("wrapped key must be 1..1020 bytes")
        return struct.pack(">HI", size, self.key_version) + self.wrapped_key


@dataclass(frozen=True)
class BoundHeader:
    """The bound header (section 2.1): authenticated by every segment and by the key wrap.

    ``raw`` holds its exact bytes, which are the associated data of every segment.
    """

    segment_size: int
    nonce_prefix: bytes
    kms_name: str
    key_id: str
    context: tuple[tuple[str, str], ...]
    raw: bytes

    @classmethod
    def create(
        cls,
        *,
        segment_size: int,
        nonce_prefix: bytes,
        kms_name: str,
        key_id: str,
        context: Mapping[str, str],
    ) -> BoundHeader:
        """Build a bound header, validating every field as a reader would."""
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(f"segment_size must be in [{MIN_SEGMENT_SIZE}, {MAX_SEGMENT_SIZE}]")
        if len(nonce_prefix) != NONCE_PREFIX_SIZE:
            raise ValueError("nonce_prefix must be 7 bytes")
        pairs = tuple(sorted(context.items(), key=lambda kv: kv[0].encode()))
        descriptor = _str8(kms_name, "kms_name") + _str8(key_id, "key_id") + struct.pack(">H", len(pairs))
        for key, value in pairs:
            kb, vb = key.encode(), value.encode()
            if not 1 <= len(kb) <= MAX_CONTEXT_KEY or len(vb) > MAX_CONTEXT_VALUE:
                raise ValueError("context keys must be 1..255 bytes and values at most 1024 bytes")
            descriptor += struct.pack(">H", len(kb)) + kb + struct.pack(">H", len(vb)) + vb
        if len(descriptor) > MAX_DESCRIPTOR:
            raise ValueError("key reference and context together exceed 4096 bytes")
        fixed = _FIXED.pack(MAGIC, VERSION, ALGORITHM_AES256_GCM_STREAM, segment_size, nonce_prefix, len(descriptor))
        return cls(segment_size, nonce_prefix, kms_name, key_id, pairs, fixed + descriptor)

    def context_dict(self) -> dict[str, str]:
        return dict(self.context)


@dataclass(frozen=True)
class Header:
    """Everything before the first segment: the bound header and the envelope."""

    bound: BoundHeader
    envelope: Envelope

    def encode(self) -> bytes:
        return self.bound.raw + self.envelope.encode()

    @property
    def size(self) -> int:
        """File offset of the first segment."""
        return len(self.bound.raw) + 2 + 4 + len(self.envelope.wrapped_key)


@dataclass(frozen=True)
class Layout:
    """Segment layout computed from the file size alone (section 2.4); unauthenticated."""

    segments: int
    last_segment_size: int  # stored bytes, tag included
    plaintext_size: int


def layout(header: Header, file_size: int) -> Layout:
    """Where the segments are, for a file of ``file_size`` bytes with this header."""
    payload = file_size - header.size
    if payload <= 0:
        raise FormatError("file is truncated: it has a header but no segments")
    stored = header.bound.segment_size + TAG_SIZE
    segments = -(-payload // stored)
    last = payload - (segments - 1) * stored
    if last < TAG_SIZE:
        raise FormatError("file is truncated: the last segment is shorter than its tag")
    return Layout(segments, last, (segments - 1) * header.bound.segment_size + last - TAG_SIZE)


def _str8(text: str, name: str) -> bytes:
    raw = text.encode()
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"{name} must be 1..255 bytes of UTF-8")
    return bytes([len(raw)]) + raw


def read_header(source: BinaryIO) -> Header:
    """Read and validate the header from the start of ``source`` (rules 1–3)."""
    fixed = _read_exact(source, _FIXED.size, "header")
    magic, version, algorithm, segment_size, nonce_prefix, d_len = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise FormatError("not an EML file: the magic bytes do not match")
    if version != VERSION:
        raise FormatError(f"unsupported EML version {version} (this reader supports version 1)")
    if algorithm != ALGORITHM_AES256_GCM_STREAM:
        raise FormatError(f"unsupported EML algorithm {algorithm}")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise FormatError(f"header field segment_size={segment_size} is out of range")
    if d_len > MAX_DESCRIPTOR:
        raise FormatError(f"header field descriptor_length={d_len} exceeds {MAX_DESCRIPTOR}")
    descriptor = _read_exact(source, d_len, "descriptor")
    kms_name, key_id, context = _parse_descriptor(descriptor)
    (e_len,) = struct.unpack(">H", _read_exact(source, 2, "envelope_length"))
    if not 4 < e_len <= MAX_ENVELOPE:
        raise FormatError(f"header field envelope_length={e_len} is out of range")
    envelope_bytes = _read_exact(source, e_len, "envelope")
    (key_version,) = struct.unpack(">I", envelope_bytes[:4])
    if key_version == 0:
        raise FormatError("header field key_version=0 is invalid")
    bound = BoundHeader(segment_size, nonce_prefix, kms_name, key_id, context, fixed + descriptor)
    return Header(bound, Envelope(key_version, envelope_bytes[4:]))


def _read_exact(source: BinaryIO, size: int, field: str) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise FormatError(f"file is truncated inside the {field}")
    return data


class _Cursor:
    """Bounds-checked reads over the descriptor; any overrun is a FormatError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int, field: str) -> bytes:
        if self.pos + size > len(self.data):
            raise FormatError(f"header field {field} runs past the end of the descriptor")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def text(self, size: int, field: str) -> str:
        try:
            return self.take(size, field).decode()
        except UnicodeDecodeError:
            raise FormatError(f"header field {field} is not valid UTF-8") from None


def _parse_descriptor(data: bytes) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    cur = _Cursor(data)
    kms_name = cur.text(cur.u8("kms_name length"), "kms_name")
    key_id = cur.text(cur.u8("key_id length"), "key_id")
    if not kms_name or not key_id:
        raise FormatError("header fields kms_name and key_id must not be empty")
    pairs: list[tuple[str, str]] = []
    previous: bytes | None = None
    for _ in range(cur.u16("context count")):
        k_len = cur.u16("context key length")
        if not 1 <= k_len <= MAX_CONTEXT_KEY:
            raise FormatError("header field context key length is out of range")
        key = cur.text(k_len, "context key")
        v_len = cur.u16("context value length")
        if v_len > MAX_CONTEXT_VALUE:
            raise FormatError("header field context value length is out of range")
        value = cur.text(v_len, "context value")
        if previous is not None and key.encode() <= previous:
            raise FormatError("header context keys are not strictly ascending")
        previous = key.encode()
        pairs.append((key, value))
    if cur.pos != len(data):
        raise FormatError("header descriptor has trailing bytes")
    return kms_name, key_id, tuple(pairs)
