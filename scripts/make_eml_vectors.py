"""Regenerate the EML v1 known-answer vectors in ``docs/vectors/`` (``make vectors``).

Every input is fixed (data key, nonce prefix, key-encryption key, wrap nonce), so the
valid files are reproducible byte for byte; each negative file holds exactly one defect,
named by its file name. ``tests/crypto/test_vectors.py`` imports ``build_vectors`` from
here, regenerates everything in memory and compares it with the committed files.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from enclaveml.crypto import Header, WrappedKey, encrypt_file
from enclaveml.crypto._format import TAG_SIZE
from enclaveml.crypto._keywrap import unwrap_key, wrap_key
from enclaveml.crypto._stream import SegmentCipher

OUT = Path(__file__).resolve().parent.parent / "docs" / "vectors"
DATA_KEY = bytes(range(32))
NONCE_PREFIX = bytes.fromhex("a0a1a2a3a4a5a6")
OTHER_PREFIX = bytes.fromhex("b0b1b2b3b4b5b6")
KEK = bytes(range(0x40, 0x60))
WRAP_NONCE = bytes.fromhex("c0c1c2c3c4c5c6c7c8c9cacb")
KEY_ID = "k-0123456789abcdef"
SEGMENT = 1024
CONTEXT = {"tenant": "acme", "purpose": "kat"}


@dataclass(frozen=True)
class FixedKek:
    """A one-key KMS with fixed material and wrap nonce, following docs/format.md section 4."""

    kms: str = "local"
    key_id: str = KEY_ID

    def describe_key(self, name_or_id: str) -> FixedKek:
        return self

    def wrap_data_key(self, name_or_id: str, data_key: bytes, associated_data: bytes) -> WrappedKey:
        wrapped = wrap_key(KEK, KEY_ID, 1, data_key, associated_data, _nonce=WRAP_NONCE)
        return WrappedKey("local", KEY_ID, 1, wrapped)

    def unwrap_data_key(self, wrapped: WrappedKey, associated_data: bytes) -> bytes:
        return unwrap_key(KEK, wrapped.key_id, wrapped.key_version, wrapped.ciphertext, associated_data)


def plaintext(length: int) -> bytes:
    return bytes(i % 251 for i in range(length))


def encrypt(length: int, context: dict[str, str], prefix: bytes = NONCE_PREFIX) -> tuple[bytes, Header]:
    out = io.BytesIO()
    header = encrypt_file(
        io.BytesIO(plaintext(length)),
        out,
        FixedKek(),
        KEY_ID,
        context=context,
        segment_size=SEGMENT,
        _data_key=DATA_KEY,
        _nonce_prefix=prefix,
    )
    return out.getvalue(), header


def segments(blob: bytes, header: Header) -> tuple[bytes, list[bytes]]:
    head, payload = blob[: header.size], blob[header.size :]
    step = SEGMENT + TAG_SIZE
    return head, [payload[i : i + step] for i in range(0, len(payload), step)]


def flip(blob: bytes, offset: int) -> bytes:
    return blob[:offset] + bytes([blob[offset] ^ 0x01]) + blob[offset + 1 :]


def build_vectors() -> tuple[dict[str, bytes], list[dict[str, object]]]:
    """Return ``{file name: bytes}`` and the manifest entries describing each file."""
    files: dict[str, bytes] = {}
    manifest: list[dict[str, object]] = []

    def add(name: str, data: bytes, expect: str, length: int | None = None, context: object = CONTEXT) -> None:
        files[name] = data
        entry: dict[str, object] = {"file": name, "expect": expect, "context": context}
        if length is not None:
            entry |= {
                "plaintext_length": length,
                "plaintext_sha256": hashlib.sha256(plaintext(length)).hexdigest(),
            }
        manifest.append(entry)

    for name, length, context in [
        ("valid_empty.eml", 0, {}),
        ("valid_one_segment.eml", 100, CONTEXT),
        ("valid_exact_boundary.eml", 2 * SEGMENT, CONTEXT),
        ("valid_three_segments.eml", 2 * SEGMENT + 5, CONTEXT),
    ]:
        add(name, encrypt(length, context)[0], "ok", length, context)

    base, header = encrypt(2 * SEGMENT + 5, CONTEXT)
    head, segs = segments(base, header)
    bound = len(header.bound.raw)
    add("bad_magic.eml", b"\x89EMX" + base[4:], "format")
    add("unsupported_version.eml", base[:8] + b"\x02" + base[9:], "format")
    add("unsupported_algorithm.eml", base[:9] + b"\x07" + base[10:], "format")
    add("segment_size_too_small.eml", base[:10] + struct.pack(">I", 512) + base[14:], "format")
    add("header_truncated.eml", base[:30], "format")
    add("no_segments.eml", head, "format")
    add("descriptor_trailing_bytes.eml", _with_descriptor(header, header.bound.raw[23:] + b"\x00"), "format")
    add(
        "context_keys_unsorted.eml",
        _with_descriptor(header, _descriptor([("tenant", "acme"), ("purpose", "kat")])),
        "format",
    )
    add("key_version_zero.eml", base[: bound + 2] + b"\x00\x00\x00\x00" + base[bound + 6 :], "format")
    add("header_flipped.eml", flip(base, 14), "integrity")  # a nonce-prefix byte
    tampered_context = {"tenant": "acmd", "purpose": "kat"}  # what the flipped byte now says
    add("context_value_flipped.eml", flip(base, bound - 1), "integrity", context=tampered_context)
    add("key_version_changed.eml", base[: bound + 2] + struct.pack(">I", 2) + base[bound + 6 :], "integrity")
    add("wrapped_key_flipped.eml", flip(base, bound + 10), "integrity")
    add("segment_flipped.eml", flip(base, header.size + 7), "integrity")
    add("tag_flipped.eml", flip(base, header.size + SEGMENT + 3), "integrity")
    add("truncated_at_boundary.eml", head + segs[0] + segs[1], "integrity")
    add("truncated_mid_segment.eml", base[:-30], "integrity")
    add("truncated_inside_tag.eml", head + segs[0] + segs[1] + segs[2][:10], "format")
    add("segment_dropped.eml", head + segs[0] + segs[2], "integrity")
    add("segments_swapped.eml", head + segs[1] + segs[0] + segs[2], "integrity")
    add("segment_duplicated.eml", head + segs[0] + segs[0] + segs[1] + segs[2], "integrity")
    add("segment_appended.eml", base + segs[0], "integrity")
    other, other_header = encrypt(2 * SEGMENT + 5, CONTEXT, OTHER_PREFIX)
    add(
        "segment_spliced_from_other_file.eml",
        head + segments(other, other_header)[1][0] + segs[1] + segs[2],
        "integrity",
    )
    cipher = SegmentCipher(DATA_KEY, header.bound)
    empty_last = bytearray(TAG_SIZE)
    cipher.seal_into(1, True, memoryview(b""), memoryview(empty_last))
    add(
        "empty_final_segment.eml",
        head + _reseal_first_as_middle(cipher, segs[0]) + bytes(empty_last),
        "format",
    )
    add("wrong_context.eml", base, "context", context={"tenant": "globex", "purpose": "kat"})
    add("missing_context.eml", base, "context", context={})
    return files, manifest


def _descriptor(pairs: list[tuple[str, str]]) -> bytes:
    out = bytes([len("local")]) + b"local" + bytes([len(KEY_ID)]) + KEY_ID.encode() + struct.pack(">H", len(pairs))
    for key, value in pairs:
        out += struct.pack(">H", len(key)) + key.encode() + struct.pack(">H", len(value)) + value.encode()
    return out


def _with_descriptor(header: Header, descriptor: bytes) -> bytes:
    """The valid file's first segment behind a header whose descriptor was replaced."""
    fixed = header.bound.raw[:21] + struct.pack(">H", len(descriptor))
    return fixed + descriptor + header.envelope.encode() + b"\x00" * 64


def _reseal_first_as_middle(cipher: SegmentCipher, first: bytes) -> bytes:
    """Segment 0 re-sealed with last=0, so the only defect is the empty final segment."""
    plain = bytearray(SEGMENT)
    cipher.open_into(0, False, memoryview(first), memoryview(plain))
    out = bytearray(SEGMENT + TAG_SIZE)
    cipher.seal_into(0, False, memoryview(plain), memoryview(out))
    return bytes(out)


def main() -> int:
    files, manifest = build_vectors()
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.eml"):
        old.unlink()
    for name, data in files.items():
        (OUT / name).write_bytes(data)
    parameters = {
        "data_key": DATA_KEY.hex(),
        "nonce_prefix": NONCE_PREFIX.hex(),
        "other_file_nonce_prefix": OTHER_PREFIX.hex(),
        "kek": KEK.hex(),
        "kek_key_id": KEY_ID,
        "kek_version": 1,
        "wrap_nonce": WRAP_NONCE.hex(),
        "segment_size": SEGMENT,
        "plaintext": "byte i is i mod 251",
    }
    doc = {"format": "EML v1", "parameters": parameters, "vectors": manifest}
    (OUT / "vectors.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {len(files)} vectors to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
