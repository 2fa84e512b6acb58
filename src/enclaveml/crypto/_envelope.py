"""Envelope encryption of whole files and streams in EML v1 (``docs/format.md``).

A fresh 256-bit data key per file encrypts the payload; the KMS's primary key wraps the
data key, with the bound header as associated data, and the wrapped key travels in the
header. The KMS is anything with the three methods of ``KeyWrapper`` (every
``KeyManagementService`` backend has them), so this module never imports a backend.

Outputs named by a path are written to a temporary file and renamed only after the last
segment verified: a failed decryption leaves no file behind. A stream output (stdout)
cannot be taken back; see ``decrypt_file``. ``encrypt_bytes`` / ``decrypt_bytes`` do the
same for a buffer in memory (a model, an Arrow buffer): the same file bytes, each segment
sealed or opened straight into one output buffer, nothing returned unless all verified.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from enclaveml._atomic import atomic_output
from enclaveml.crypto._format import (
    DEFAULT_SEGMENT_SIZE,
    MAX_DESCRIPTOR,
    MAX_ENVELOPE,
    NONCE_PREFIX_SIZE,
    BoundHeader,
    Envelope,
    Header,
    Layout,
    layout,
    read_header,
)
from enclaveml.crypto._stream import (
    Progress,
    SegmentCipher,
    decrypt_stream,
    encrypt_stream,
    open_buffer,
    opened_size,
    seal_buffer,
    sealed_size,
)
from enclaveml.errors import ContextMismatch, KeyNotFound

__all__ = [
    "DATA_KEY_SIZE",
    "FileDescription",
    "KeyReference",
    "KeyWrapper",
    "Source",
    "WrappedKey",
    "check_context",
    "decrypt_bytes",
    "decrypt_file",
    "describe_file",
    "encrypt_bytes",
    "encrypt_file",
    "open_data_key",
    "rewrap_file",
]

DATA_KEY_SIZE = 32
Source = str | os.PathLike[str] | BinaryIO
Buffer = bytes | bytearray | memoryview
_MAX_HEADER_SIZE = 23 + MAX_DESCRIPTOR + 2 + MAX_ENVELOPE  # section 2: fixed fields, descriptor, envelope


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted by one version of a primary key, plus the reference to it."""

    kms: str
    key_id: str
    key_version: int
    ciphertext: bytes


class KeyReference(Protocol):
    @property
    def kms(self) -> str: ...

    @property
    def key_id(self) -> str: ...


class KeyWrapper(Protocol):
    """The part of a KMS that envelope encryption needs."""

    def describe_key(self, name_or_id: str) -> KeyReference: ...

    def wrap_data_key(self, name_or_id: str, data_key: bytes, associated_data: bytes) -> WrappedKey: ...

    def unwrap_data_key(self, wrapped: WrappedKey, associated_data: bytes) -> bytes: ...


@contextlib.contextmanager
def _opened(target: Source, mode: str) -> Iterator[BinaryIO]:
    if isinstance(target, str | os.PathLike):
        with open(target, mode) as handle:
            yield handle  # type: ignore[misc]
    else:
        yield target


@contextlib.contextmanager
def _output(target: Source) -> Iterator[BinaryIO]:
    """A path gets all-or-nothing output (temp file + rename); a stream is written directly."""
    if isinstance(target, str | os.PathLike):
        with atomic_output(target) as handle:
            yield handle
    else:
        yield target


def check_context(header: BoundHeader, expected: Mapping[str, str] | None) -> None:
    want = dict(expected or {})
    have = header.context_dict()
    if have != want:
        raise ContextMismatch(
            "encryption context does not match: the file was encrypted with keys "
            f"[{', '.join(sorted(have))}], you gave [{', '.join(sorted(want))}]"
            + (" with different values" if sorted(have) == sorted(want) else "")
        )


def open_data_key(header: Header, kms: KeyWrapper) -> bytes:
    """Unwrap the file's data key with the KMS, binding the bound header."""
    wrapped = WrappedKey(
        header.bound.kms_name, header.bound.key_id, header.envelope.key_version, header.envelope.wrapped_key
    )
    return kms.unwrap_data_key(wrapped, header.bound.raw)


def _new_file(
    kms: KeyWrapper,
    key: str,
    context: Mapping[str, str] | None,
    segment_size: int,
    data_key: bytes | None,
    nonce_prefix: bytes | None,
) -> tuple[Header, SegmentCipher]:
    """A new file's header, its data key wrapped by the KMS, and the cipher for its segments."""
    ref = kms.describe_key(key)
    bound = BoundHeader.create(
        segment_size=segment_size,
        nonce_prefix=nonce_prefix if nonce_prefix is not None else os.urandom(NONCE_PREFIX_SIZE),
        kms_name=ref.kms,
        key_id=ref.key_id,
        context=context or {},
    )
    if data_key is None:
        data_key = os.urandom(DATA_KEY_SIZE)
    wrapped = kms.wrap_data_key(ref.key_id, data_key, bound.raw)
    if (wrapped.kms, wrapped.key_id) != (ref.kms, ref.key_id):
        raise KeyNotFound(f"the KMS wrapped with key {wrapped.key_id}, not the requested {ref.key_id}")
    return Header(bound, Envelope(wrapped.key_version, wrapped.ciphertext)), SegmentCipher(data_key, bound)


def encrypt_file(
    source: Source,
    destination: Source,
    kms: KeyWrapper,
    key: str,
    *,
    context: Mapping[str, str] | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    progress: Progress | None = None,
    _data_key: bytes | None = None,
    _nonce_prefix: bytes | None = None,
) -> Header:
    """Encrypt ``source`` into an EML file at ``destination`` under primary key ``key``.

    ``_data_key`` and ``_nonce_prefix`` exist only to produce known-answer vectors; real
    callers never pass them (section 5: both are fresh and random for every file).
    """
    header, cipher = _new_file(kms, key, context, segment_size, _data_key, _nonce_prefix)
    with _opened(source, "rb") as src, _output(destination) as dst:
        dst.write(header.encode())
        encrypt_stream(cipher, src, dst, progress)
    return header


def decrypt_file(
    source: Source,
    destination: Source,
    kms: KeyWrapper,
    *,
    context: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Header:
    """Verify and decrypt the EML file ``source`` into ``destination``.

    A path destination appears only if every segment verified. A stream destination gets
    each segment as soon as it verified; if a later one fails, what was written is
    unauthenticated and this raises, so the caller must report failure (exit non-zero).
    """
    with _opened(source, "rb") as src:
        header = read_header(src)
        check_context(header.bound, context)
        cipher = SegmentCipher(open_data_key(header, kms), header.bound)
        with _output(destination) as dst:
            decrypt_stream(cipher, src, dst, progress)
    return header


def _byte_view(data: Buffer) -> memoryview:
    """``data`` as a flat view of bytes, without copying it."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("the buffer must be contiguous")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def encrypt_bytes(
    data: Buffer,
    kms: KeyWrapper,
    key: str,
    *,
    context: Mapping[str, str] | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    _data_key: bytes | None = None,
    _nonce_prefix: bytes | None = None,
) -> bytearray:
    """Encrypt a buffer in memory into the bytes of an EML file, under primary key ``key``.

    The result is exactly what ``encrypt_file`` would write for the same plaintext (and
    ``decrypt_file`` reads it). ``data`` may be anything contiguous that supports the buffer
    protocol; it is read in place, and each segment is sealed straight into the returned
    bytearray (returned as is: turning it into ``bytes`` would copy it once more).
    ``_data_key`` and ``_nonce_prefix`` are for known-answer tests only, as in ``encrypt_file``.
    """
    view = _byte_view(data)
    header, cipher = _new_file(kms, key, context, segment_size, _data_key, _nonce_prefix)
    head = header.encode()
    out = bytearray(len(head) + sealed_size(segment_size, len(view)))
    out[: len(head)] = head
    with memoryview(out) as whole:
        seal_buffer(cipher, view, whole[len(head) :])
    return out


def decrypt_bytes(blob: Buffer, kms: KeyWrapper, *, context: Mapping[str, str] | None = None) -> bytearray:
    """Verify and decrypt the bytes of an EML file held in memory; returns the plaintext.

    Same checks and errors as ``decrypt_file``, in the same order (header, context, key
    unwrap, then the segments). The plaintext is returned only if every segment verified.
    """
    view = _byte_view(blob)
    header = read_header(io.BytesIO(view[:_MAX_HEADER_SIZE]))
    check_context(header.bound, context)
    cipher = SegmentCipher(open_data_key(header, kms), header.bound)
    payload = view[header.size :]
    out = bytearray(opened_size(header.bound.segment_size, len(payload)))
    with memoryview(out) as whole:
        open_buffer(cipher, payload, whole)
    return out


@dataclass(frozen=True)
class FileDescription:
    """What ``enclaveml inspect`` shows: header and layout, no secret, no key needed."""

    header: Header
    layout: Layout
    file_size: int


def describe_file(path: str | os.PathLike[str]) -> FileDescription:
    """Parse the header and compute the segment layout from the file size (unauthenticated)."""
    with open(path, "rb") as src:
        header = read_header(src)
        size = os.fstat(src.fileno()).st_size
    return FileDescription(header, layout(header, size), size)


def rewrap_file(path: str | os.PathLike[str], kms: KeyWrapper, key: str | None = None) -> tuple[Header, Header]:
    """Re-wrap the data key of ``path`` with the current primary version; payload untouched.

    ``key`` (name or id) must name the same primary key as the file; by default it is the
    file's own key. Returns the old and the new header.
    """
    with open(path, "rb") as src:
        old = read_header(src)
        ref = kms.describe_key(key if key is not None else old.bound.key_id)
        if (ref.kms, ref.key_id) != (old.bound.kms_name, old.bound.key_id):
            raise KeyNotFound(
                f"file is encrypted under {old.bound.kms_name} key {old.bound.key_id}, not {key}",
                "rewrap re-wraps with a newer version of the same key; to change keys, decrypt and encrypt",
            )
        data_key = open_data_key(old, kms)
        wrapped = kms.wrap_data_key(ref.key_id, data_key, old.bound.raw)
        new = Header(old.bound, Envelope(wrapped.key_version, wrapped.ciphertext))
        mode = os.fstat(src.fileno()).st_mode & 0o777
        with atomic_output(path, mode=mode, durable=True) as dst:
            dst.write(new.encode())
            shutil.copyfileobj(src, dst, 1 << 20)
    return old, new
