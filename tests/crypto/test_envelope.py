"""EML v1 files end to end with a real local KMS: round trips, rotation, and every attack."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaveml.crypto import (
    BoundHeader,
    decrypt_bytes,
    decrypt_file,
    describe_file,
    encrypt_bytes,
    encrypt_file,
    open_reader,
    rewrap_file,
)
from enclaveml.crypto._format import TAG_SIZE, read_header
from enclaveml.crypto._stream import SegmentCipher, open_buffer, opened_size, seal_buffer, sealed_size
from enclaveml.errors import ContextMismatch, FormatError, IntegrityError, KeyNotFound
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms

SEG = 1024
STORED = SEG + TAG_SIZE
VECTORS = Path(__file__).resolve().parents[2] / "docs" / "vectors"


def seal(kms: LocalKms, plaintext: bytes, **kwargs: object) -> bytes:
    out = io.BytesIO()
    encrypt_file(io.BytesIO(plaintext), out, kms, "customers", segment_size=SEG, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


def unseal(kms: LocalKms, blob: bytes, **kwargs: object) -> bytes:
    out = io.BytesIO()
    decrypt_file(io.BytesIO(blob), out, kms, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


def split(blob: bytes) -> tuple[bytes, list[bytes]]:
    size = describe_bytes(blob)
    head, payload = blob[:size], blob[size:]
    return head, [payload[i : i + STORED] for i in range(0, len(payload), STORED)]


def describe_bytes(blob: bytes) -> int:
    return read_header(io.BytesIO(blob)).size


BOUNDARY_SIZES = [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG - 1, 2 * SEG, 2 * SEG + 1, 5 * SEG + 17]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_round_trip_at_every_segment_boundary(kms: LocalKms, size: int) -> None:
    plaintext = os.urandom(size)
    blob = seal(kms, plaintext)
    segments = max(1, -(-size // SEG))
    assert len(blob) == describe_bytes(blob) + size + segments * TAG_SIZE
    assert unseal(kms, blob) == plaintext


def test_large_file_round_trip_through_paths(kms: LocalKms, tmp_path: Path) -> None:
    plain = tmp_path / "big.bin"
    plain.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    encrypt_file(plain, tmp_path / "big.eml", kms, "customers")
    decrypt_file(tmp_path / "big.eml", tmp_path / "back.bin", kms)
    assert (tmp_path / "back.bin").read_bytes() == plain.read_bytes()
    assert oct((tmp_path / "back.bin").stat().st_mode & 0o777) == "0o600"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4 * SEG + 3))
def test_round_trip_any_content(kms: LocalKms, data: bytes) -> None:
    assert unseal(kms, seal(kms, data)) == data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_flipping_any_bit_anywhere_is_rejected(kms: LocalKms, position: int, bit: int) -> None:
    blob = seal(kms, b"x" * (2 * SEG + 100))
    position %= len(blob)
    tampered = bytearray(blob)
    tampered[position] ^= 1 << bit
    # A flip inside the key reference names another KMS or key: refused before any unwrap.
    with pytest.raises((IntegrityError, KeyNotFound)):
        unseal(kms, bytes(tampered))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0))
def test_truncation_anywhere_is_rejected(kms: LocalKms, cut: int) -> None:
    blob = seal(kms, os.urandom(3 * SEG + 5))
    with pytest.raises(IntegrityError):
        unseal(kms, blob[: cut % len(blob)])


def test_truncation_at_each_segment_boundary(kms: LocalKms) -> None:
    blob = seal(kms, os.urandom(4 * SEG))
    head, segments = split(blob)
    for keep in range(len(segments)):
        with pytest.raises(IntegrityError, match=r"failed authentication|no segments"):
            unseal(kms, head + b"".join(segments[:keep]))


def test_dropped_swapped_duplicated_appended_segments(kms: LocalKms) -> None:
    head, s = split(seal(kms, os.urandom(3 * SEG + 9)))
    attacks = {
        "drop middle": [s[0], s[2], s[3]],
        "swap": [s[1], s[0], s[2], s[3]],
        "duplicate": [s[0], s[0], s[1], s[2], s[3]],
        "append": [*s, s[1]],
        "move last forward": [s[0], s[1], s[3]],
    }
    for name, order in attacks.items():
        with pytest.raises(IntegrityError, match="failed authentication"):
            unseal(kms, head + b"".join(order))
        assert name


def test_segment_spliced_from_another_file_under_the_same_key(kms: LocalKms) -> None:
    head_a, a = split(seal(kms, os.urandom(2 * SEG + 1)))
    _, b = split(seal(kms, os.urandom(2 * SEG + 1)))
    with pytest.raises(IntegrityError, match="failed authentication"):
        unseal(kms, head_a + b[0] + a[1] + a[2])


def test_wrapped_key_from_another_file_does_not_unwrap(kms: LocalKms) -> None:
    blob_a, blob_b = seal(kms, b"a" * 10), seal(kms, b"b" * 10)
    bound = describe_bytes(blob_a) - 66
    swapped = blob_a[:bound] + blob_b[bound : describe_bytes(blob_b)] + blob_a[describe_bytes(blob_a) :]
    with pytest.raises(IntegrityError, match="does not unwrap"):
        unseal(kms, swapped)


def test_context_must_match_exactly(kms: LocalKms) -> None:
    blob = seal(kms, b"secret rows", context={"tenant": "acme", "purpose": "train"})
    assert unseal(kms, blob, context={"purpose": "train", "tenant": "acme"}) == b"secret rows"
    for wrong in [{}, {"tenant": "acme"}, {"tenant": "globex", "purpose": "train"}]:
        with pytest.raises(ContextMismatch) as caught:
            unseal(kms, blob, context=wrong)
        assert "globex" not in caught.value.diagnostics()
        assert "acme" not in caught.value.diagnostics()


def test_wrong_key_store_cannot_decrypt(kms: LocalKms, tmp_path: Path) -> None:
    other = LocalKms.init(tmp_path / "other.json", "other", kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    other.create_key("customers")
    blob = seal(kms, b"payload")
    with pytest.raises(KeyNotFound):
        unseal(other, blob)


def test_rotation_then_rewrap_keeps_payload_and_moves_to_new_version(kms: LocalKms, tmp_path: Path) -> None:
    path = tmp_path / "rows.eml"
    encrypt_file(io.BytesIO(b"rows" * 1000), path, kms, "customers", segment_size=SEG)
    payload_before = path.read_bytes()[describe_file(path).header.size :]
    kms.rotate_key("customers")
    assert unseal(kms, path.read_bytes()) == b"rows" * 1000  # old version still decrypts
    old, new = rewrap_file(path, kms, "customers")
    assert (old.envelope.key_version, new.envelope.key_version) == (1, 2)
    assert path.read_bytes()[new.size :] == payload_before
    kms.destroy_key_version("customers", 1)
    assert unseal(kms, path.read_bytes()) == b"rows" * 1000


def test_destroyed_version_makes_old_files_unreadable(kms: LocalKms) -> None:
    blob = seal(kms, b"old data")
    kms.rotate_key("customers")
    kms.destroy_key_version("customers", 1)
    with pytest.raises(KeyNotFound, match="destroyed"):
        unseal(kms, blob)


def test_rewrap_to_a_different_key_is_refused(kms: LocalKms, tmp_path: Path) -> None:
    kms.create_key("other")
    path = tmp_path / "f.eml"
    encrypt_file(io.BytesIO(b"x"), path, kms, "customers")
    before = path.read_bytes()
    with pytest.raises(KeyNotFound, match="not other"):
        rewrap_file(path, kms, "other")
    assert path.read_bytes() == before


def test_failed_decrypt_to_a_path_leaves_no_file(kms: LocalKms, tmp_path: Path) -> None:
    blob = bytearray(seal(kms, os.urandom(5 * SEG)))
    blob[-3] ^= 0xFF  # the last segment: four verified segments come first
    (tmp_path / "bad.eml").write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        decrypt_file(tmp_path / "bad.eml", tmp_path / "out.bin", kms)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.eml", "home"]


def test_random_access_reads_only_what_it_needs(kms: LocalKms, tmp_path: Path) -> None:
    data = os.urandom(10 * SEG + 300)
    path = tmp_path / "r.eml"
    encrypt_file(io.BytesIO(data), path, kms, "customers", segment_size=SEG)
    with open_reader(path, kms) as reader:
        assert reader.size == len(data)
        for offset, n in [(0, 10), (SEG - 3, 7), (5 * SEG, 2 * SEG + 1), (10 * SEG + 250, 500), (len(data), 5)]:
            assert reader.pread(offset, n) == data[offset : offset + n]
    # A flipped byte in segment 7 is found when segment 7 is read, not before.
    blob = bytearray(path.read_bytes())
    blob[describe_file(path).header.size + 7 * (SEG + TAG_SIZE) + 5] ^= 1
    path.write_bytes(bytes(blob))
    with open_reader(path, kms) as reader:
        assert reader.pread(0, SEG) == data[:SEG]
        with pytest.raises(IntegrityError, match="segment 7"):
            reader.pread(7 * SEG, 1)


def test_random_access_detects_truncation_at_open(kms: LocalKms, tmp_path: Path) -> None:
    path = tmp_path / "t.eml"
    encrypt_file(io.BytesIO(os.urandom(4 * SEG)), path, kms, "customers", segment_size=SEG)
    path.write_bytes(path.read_bytes()[:-STORED])
    with pytest.raises(IntegrityError):
        open_reader(path, kms)


def test_not_an_eml_file(kms: LocalKms) -> None:
    with pytest.raises(FormatError, match="not an EML file"):
        unseal(kms, b"name,age\nann,41\n" * 10)


# ---------------------------------------------------------------------------------------
# In memory: encrypt_bytes / decrypt_bytes write and read exactly the bytes of the stream path.

DATA_KEY = bytes(range(32))
PREFIX = bytes.fromhex("a0a1a2a3a4a5a6")


def seal_bytes(kms: LocalKms, plaintext: bytes, **kwargs: object) -> bytearray:
    return encrypt_bytes(plaintext, kms, "customers", segment_size=SEG, **kwargs)  # type: ignore[arg-type]


def outcome(run: Callable[[], object]) -> tuple[str, str]:
    """What a decryption did: ("ok", repr of the plaintext) or (error class, message)."""
    try:
        return "ok", repr(bytes(run()))  # type: ignore[call-overload]
    except (IntegrityError, KeyNotFound) as error:
        return type(error).__name__, str(error)


def same_outcome(kms: LocalKms, blob: bytes, **kwargs: object) -> tuple[str, str]:
    """Decrypt ``blob`` with both paths; they must agree on the plaintext or on the exact error."""
    by_stream = outcome(lambda: unseal(kms, blob, **kwargs))
    by_bytes = outcome(lambda: decrypt_bytes(blob, kms, **kwargs))  # type: ignore[arg-type]
    assert by_bytes == by_stream
    return by_bytes


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_bytes_path_writes_the_stream_path_bytes(kms: LocalKms, size: int) -> None:
    plaintext = os.urandom(size)
    fixed = {"_data_key": DATA_KEY, "_nonce_prefix": PREFIX, "context": {"tenant": "acme"}}
    by_bytes = seal_bytes(kms, plaintext, **fixed)
    by_stream = seal(kms, plaintext, **fixed)
    header = read_header(io.BytesIO(by_stream))
    # Same bound header and segments; only the KMS's random wrap nonce differs.
    assert len(by_bytes) == len(by_stream) == header.size + size + max(1, -(-size // SEG)) * TAG_SIZE
    assert by_bytes[: len(header.bound.raw)] == header.bound.raw
    assert by_bytes[header.size :] == by_stream[header.size :]
    assert unseal(kms, bytes(by_bytes), context={"tenant": "acme"}) == plaintext
    assert decrypt_bytes(by_stream, kms, context={"tenant": "acme"}) == plaintext
    assert decrypt_bytes(by_bytes, kms, context={"tenant": "acme"}) == plaintext


def test_bytes_path_reproduces_the_known_answer_vectors() -> None:
    gen = _vector_generator()
    for name, length, context in [
        ("valid_empty.eml", 0, {}),
        ("valid_one_segment.eml", 100, gen.CONTEXT),
        ("valid_exact_boundary.eml", 2 * gen.SEGMENT, gen.CONTEXT),
        ("valid_three_segments.eml", 2 * gen.SEGMENT + 5, gen.CONTEXT),
    ]:
        blob = encrypt_bytes(
            gen.plaintext(length),
            gen.FixedKek(),
            gen.KEY_ID,
            context=context,
            segment_size=gen.SEGMENT,
            _data_key=gen.DATA_KEY,
            _nonce_prefix=gen.NONCE_PREFIX,
        )
        assert blob == (VECTORS / name).read_bytes(), name


def test_bytes_path_agrees_with_the_stream_path_on_every_vector(kms: LocalKms) -> None:
    gen = _vector_generator()
    manifest = json.loads((VECTORS / "vectors.json").read_text())["vectors"]
    expected = {"ok": "ok", "format": "FormatError", "integrity": "IntegrityError", "context": "ContextMismatch"}
    for vector in manifest:
        blob = (VECTORS / vector["file"]).read_bytes()
        by_stream = outcome(lambda: _unseal_with(gen.FixedKek(), blob, vector["context"]))  # noqa: B023
        by_bytes = outcome(lambda: decrypt_bytes(blob, gen.FixedKek(), context=vector["context"]))  # noqa: B023
        assert by_bytes == by_stream, vector["file"]
        assert by_bytes[0] == expected[vector["expect"]], vector["file"]


def test_bytes_path_takes_any_contiguous_buffer(kms: LocalKms) -> None:
    data = os.urandom(3 * SEG + 8)
    for buffer in (data, bytearray(data), memoryview(data), memoryview(bytearray(data)).cast("Q")):
        blob = seal_bytes(kms, buffer)  # type: ignore[arg-type]
        assert decrypt_bytes(memoryview(blob), kms) == data
        assert decrypt_bytes(bytes(blob), kms) == data
    with pytest.raises(ValueError, match="contiguous"):
        seal_bytes(kms, memoryview(data)[::2])  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4 * SEG + 3), segment_size=st.sampled_from([SEG, SEG + 1, 3000]))
def test_bytes_round_trip_any_content(kms: LocalKms, data: bytes, segment_size: int) -> None:
    blob = encrypt_bytes(data, kms, "customers", segment_size=segment_size)
    assert decrypt_bytes(blob, kms) == data
    assert unseal(kms, bytes(blob)) == data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_bytes_path_rejects_a_flipped_bit_like_the_stream_path(kms: LocalKms, position: int, bit: int) -> None:
    blob = bytearray(seal_bytes(kms, b"x" * (2 * SEG + 100)))
    blob[position % len(blob)] ^= 1 << bit
    assert same_outcome(kms, bytes(blob))[0] != "ok"


def test_bytes_path_rejects_truncation_anywhere_like_the_stream_path(kms: LocalKms) -> None:
    blob = bytes(seal_bytes(kms, os.urandom(3 * SEG + 5)))
    kinds = {same_outcome(kms, blob[:cut])[0] for cut in range(len(blob))}
    assert kinds == {"FormatError", "IntegrityError"}


def test_bytes_path_rejects_reordered_segments_like_the_stream_path(kms: LocalKms) -> None:
    head, s = split(bytes(seal_bytes(kms, os.urandom(3 * SEG + 9))))
    _, other = split(bytes(seal_bytes(kms, os.urandom(3 * SEG + 9))))
    for order in (
        [s[0], s[2], s[3]],
        [s[1], s[0], s[2], s[3]],
        [s[0], s[0], s[1], s[2], s[3]],
        [*s, s[1]],
        [s[0], s[1], s[3]],
        [other[0], s[1], s[2], s[3]],
        s[:3],
    ):
        kind, message = same_outcome(kms, head + b"".join(order))
        assert kind == "IntegrityError"
        assert "failed authentication" in message


def test_bytes_path_checks_the_context_first(kms: LocalKms) -> None:
    blob = seal_bytes(kms, b"rows", context={"tenant": "acme"})
    assert decrypt_bytes(blob, kms, context={"tenant": "acme"}) == b"rows"
    with pytest.raises(ContextMismatch):
        decrypt_bytes(blob, kms)
    same_outcome(kms, bytes(blob), context={"tenant": "globex"})


def test_open_buffer_zeroes_the_failed_segment_and_checks_sizes(kms: LocalKms) -> None:
    header = BoundHeader.create(segment_size=SEG, nonce_prefix=PREFIX, kms_name="local", key_id="k-1", context={})
    cipher = SegmentCipher(DATA_KEY, header)
    data = memoryview(os.urandom(2 * SEG + 1))
    sealed = bytearray(sealed_size(SEG, len(data)))
    with pytest.raises(ValueError, match="output must be"):
        seal_buffer(cipher, data, memoryview(sealed)[1:])
    seal_buffer(cipher, data, memoryview(sealed))
    sealed[STORED + 3] ^= 1  # segment 1
    plain = bytearray(b"\xff" * opened_size(SEG, len(sealed)))
    with pytest.raises(ValueError, match="output must be"):
        open_buffer(cipher, memoryview(sealed), memoryview(plain)[1:])
    with pytest.raises(IntegrityError, match="segment 1 failed authentication"):
        open_buffer(cipher, memoryview(sealed), memoryview(plain))
    assert plain[:SEG] == data[:SEG]  # verified before the failure
    assert plain[SEG : 2 * SEG] == bytes(SEG)  # the failed segment's output is zeroed


def _unseal_with(kms: object, blob: bytes, context: dict[str, str]) -> bytes:
    out = io.BytesIO()
    decrypt_file(io.BytesIO(blob), out, kms, context=context)  # type: ignore[arg-type]
    return out.getvalue()


def _vector_generator() -> ModuleType:
    module = sys.modules.get("make_eml_vectors")
    if module is None:
        spec = importlib.util.spec_from_file_location(
            "make_eml_vectors", VECTORS.parents[1] / "scripts/make_eml_vectors.py"
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
        spec.loader.exec_module(module)
    return module
