"""The EML v1 header (docs/format.md section 2): encoding, strict parsing, fuzzing."""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclaveml.crypto._format import MAGIC, BoundHeader, Envelope, Header, layout, read_header
from enclaveml.errors import FormatError

texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)


@given(
    segment_size=st.integers(1024, 16 * 1024 * 1024),
    prefix=st.binary(min_size=7, max_size=7),
    kms_name=texts,
    key_id=texts,
    context=st.dictionaries(texts, st.text(max_size=30), max_size=5),
    version=st.integers(1, 2**32 - 1),
    wrapped=st.binary(min_size=1, max_size=200),
)
def test_header_round_trips(
    segment_size: int,
    prefix: bytes,
    kms_name: str,
    key_id: str,
    context: dict[str, str],
    version: int,
    wrapped: bytes,
) -> None:
    bound = BoundHeader.create(
        segment_size=segment_size, nonce_prefix=prefix, kms_name=kms_name, key_id=key_id, context=context
    )
    header = Header(bound, Envelope(version, wrapped))
    encoded = header.encode()
    assert encoded.startswith(MAGIC)
    assert len(encoded) == header.size
    assert read_header(io.BytesIO(encoded + b"payload")) == header
    assert dict(read_header(io.BytesIO(encoded)).bound.context) == context


@given(st.binary(max_size=400))
def test_arbitrary_bytes_give_a_format_error_or_a_header(data: bytes) -> None:
    with contextlib.suppress(FormatError):  # anything else (IndexError, struct.error...) fails
        read_header(io.BytesIO(data))


@given(st.binary(min_size=1, max_size=300))
def test_garbage_after_a_valid_magic_never_crashes(tail: bytes) -> None:
    with contextlib.suppress(FormatError):
        read_header(io.BytesIO(MAGIC + b"\x01\x01" + tail))


def _header(**context: str) -> Header:
    bound = BoundHeader.create(
        segment_size=1024, nonce_prefix=b"\x00" * 7, kms_name="local", key_id="k-1", context=context
    )
    return Header(bound, Envelope(1, b"w" * 60))


def test_every_truncation_of_a_header_names_the_missing_part() -> None:
    encoded = _header(tenant="acme").encode()
    for cut in range(len(encoded)):
        with pytest.raises(FormatError, match=r"truncated|magic"):
            read_header(io.BytesIO(encoded[:cut]))


def test_layout_follows_from_the_file_size() -> None:
    header = _header()
    assert layout(header, header.size + 16).plaintext_size == 0
    assert layout(header, header.size + 1040 + 17) == layout(header, header.size + 1040 + 17)
    shape = layout(header, header.size + 2 * 1040 + 21)
    assert (shape.segments, shape.last_segment_size, shape.plaintext_size) == (3, 21, 2048 + 5)
    with pytest.raises(FormatError, match="no segments"):
        layout(header, header.size)
    with pytest.raises(FormatError, match="shorter than its tag"):
        layout(header, header.size + 1040 + 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"segment_size": 512}, "segment_size"),
        ({"nonce_prefix": b"short"}, "nonce_prefix"),
        ({"kms_name": ""}, "kms_name"),
        ({"key_id": "x" * 256}, "key_id"),
        ({"context": {"": "v"}}, "context keys"),
        ({"context": {"k": "v" * 1025}}, "context keys"),
    ],
)
def test_writer_refuses_what_a_reader_would_reject(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "segment_size": 1024,
        "nonce_prefix": b"\x00" * 7,
        "kms_name": "local",
        "key_id": "k-1",
        "context": {},
    } | kwargs
    with pytest.raises(ValueError, match=message):
        BoundHeader.create(**args)  # type: ignore[arg-type]
