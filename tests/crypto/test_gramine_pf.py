"""Gramine protected files: files Gramine wrote decrypt, our files are Gramine's bytes, attacks fail.

The vectors in ../shared/vectors/gramine_pf/ were written by Gramine's own
protected_files.c (v1.3.1: format v1; 2025 HEAD: format v2). Everything random in such a
file (KDF nonce, node keys) can be read back once it is decrypted, so replaying those
draws through our writer must give the same file byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaveml.crypto import gramine_pf as pf
from enclaveml.errors import ConfigError, FormatError, IntegrityError

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "gramine_pf"
KDK = (VECTORS / "kdk_cczoo_wrap_key.bin").read_bytes()
SMALL_PATH = "ssl.cfg"
BIG_PATH = "models/resnet50-v15-fp32/1/saved_model.pb"
SMALL = (VECTORS / "pf_small.plaintext").read_bytes()
BIG = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(12900))[:412795]
NODE = pf.PF_NODE_SIZE
GROUP = 3072 + 96 * NODE  # the largest file one (root) MHT node covers
VECTOR_CASES = [
    ("pf_v1_small.pf", 1, SMALL_PATH, SMALL),
    ("pf_v2_small.pf", 2, SMALL_PATH, SMALL),
    ("pf_v1_big.pf", 1, BIG_PATH, BIG),
    ("pf_v2_big.pf", 2, BIG_PATH, BIG),
]


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def deterministic(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def recorded_draws(data: bytes) -> Callable[[str, int], bytes]:
    """The nonce and node keys Gramine drew for ``data``, read back by decrypting it independently."""
    header = 58 if data[8] == 1 else 59
    nonce = data[10:42]
    metadata = AESGCM(pf.derive_metadata_key(KDK, nonce)).decrypt(
        bytes(12), data[header : header + 3884] + data[42:58], None
    )
    (size,) = struct.unpack_from("<Q", metadata, 772)
    table = {("nonce", 0): nonce}
    data_nodes = max(0, -(-(size - 3072) // NODE))
    mhts: list[bytes] = []
    for m in range(-(-data_nodes // 96)):
        if m == 0:
            slot = metadata[780:812]
        else:
            child = 96 + (m - 1) % 32
            slot = mhts[(m - 1) // 32][child * 32 : child * 32 + 32]
        table["mht", m] = slot[:16]
        at = (1 + 97 * m) * NODE
        mhts.append(AESGCM(slot[:16]).decrypt(bytes(12), data[at : at + NODE] + slot[16:], None))
    for d in range(data_nodes):
        table["data", d] = mhts[d // 96][(d % 96) * 32 : (d % 96) * 32 + 16]
    return lambda what, index: table[what, index]


# -- Gramine's files ------------------------------------------------------------------------


def test_the_big_plaintext_is_the_one_the_vectors_state() -> None:
    assert hashlib.sha256(BIG).hexdigest() == "2fd0c31c7630358876e966b8bdc21802612f62083eea19ff9b2090bcc66a9f90"
    assert SMALL == b"hello gramine protected files\n"


@pytest.mark.parametrize(("name", "version", "path", "plaintext"), VECTOR_CASES, ids=[c[0] for c in VECTOR_CASES])
def test_files_written_by_gramine_decrypt(name: str, version: int, path: str, plaintext: bytes) -> None:
    data = vector(name)
    assert pf.is_pf(data)
    assert pf.pf_version(data) == version
    assert pf.decrypt_pf(data, KDK, path) == plaintext


@pytest.mark.parametrize(("name", "version", "path", "plaintext"), VECTOR_CASES, ids=[c[0] for c in VECTOR_CASES])
def test_our_writer_given_gramines_random_draws_writes_gramines_bytes(
    name: str, version: int, path: str, plaintext: bytes
) -> None:
    data = vector(name)
    assert pf._encrypt_pf_with(plaintext, KDK, path, version, recorded_draws(data)) == data


def test_the_big_vector_has_the_documented_layout() -> None:
    info = pf.describe_pf(vector("pf_v2_big.pf"), len(vector("pf_v2_big.pf")))
    assert (info.version, info.header_size, info.nodes, info.pending_write) == (2, 59, 104, False)
    assert info.plaintext_size_min <= len(BIG) <= info.plaintext_size_max
    assert pf.describe_pf(vector("pf_v1_big.pf"), 104 * NODE).header_size == 58


# -- attacks on Gramine's files: each one fails, with the reason --------------------------


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def node(data: bytes, physical: int) -> bytes:
    return data[physical * NODE : (physical + 1) * NODE]


def swap(data: bytes, a: int, b: int) -> bytes:
    nodes = [node(data, i) for i in range(len(data) // NODE)]
    nodes[a], nodes[b] = nodes[b], nodes[a]
    return b"".join(nodes)


TAMPERED = {
    "metadata nonce": lambda d: flip(d, 20),
    "metadata tag": lambda d: flip(d, 50),
    "metadata encrypted part": lambda d: flip(d, 100),
    "metadata file data": lambda d: flip(d, 3000),
    "root MHT node": lambda d: flip(d, 1 * NODE + 7),
    "second MHT node": lambda d: flip(d, 98 * NODE + 4095),
    "first data node": lambda d: flip(d, 2 * NODE),
    "last data node": lambda d: flip(d, len(d) - 1),
    "two data nodes swapped": lambda d: swap(d, 2, 3),
    "data and MHT node swapped": lambda d: swap(d, 97, 98),
    "last node dropped": lambda d: d[:-NODE],
    "one node appended": lambda d: d + node(d, 5),
    "zero node appended": lambda d: d + bytes(NODE),
    "last byte cut": lambda d: d[:-1],
    "version 2 relabelled 1 (or 1 as 2)": lambda d: d[:8] + bytes([3 - d[8]]) + d[9:],
}


@pytest.mark.parametrize("name", ["pf_v1_big.pf", "pf_v2_big.pf"])
@pytest.mark.parametrize("attack", list(TAMPERED), ids=list(TAMPERED))
def test_any_change_to_a_file_is_an_integrity_error(name: str, attack: str) -> None:
    tampered = TAMPERED[attack](vector(name))
    with pytest.raises(IntegrityError) as caught:
        pf.decrypt_pf(tampered, KDK, BIG_PATH)
    assert BIG[:16].hex() not in str(caught.value)


def test_a_changed_node_is_named_but_not_the_byte() -> None:
    with pytest.raises(IntegrityError, match=r"^node 2 of the Gramine protected file failed authentication$"):
        pf.decrypt_pf(flip(vector("pf_v2_big.pf"), 2 * NODE + 1234), KDK, BIG_PATH)


def test_a_dropped_node_is_truncation() -> None:
    with pytest.raises(IntegrityError, match="truncated: 103 nodes, expected 104"):
        pf.decrypt_pf(vector("pf_v2_big.pf")[:-NODE], KDK, BIG_PATH)


def test_an_appended_node_is_refused_although_gramine_would_ignore_it() -> None:
    with pytest.raises(IntegrityError, match="longer than its metadata says: 105 nodes, expected 104"):
        pf.decrypt_pf(vector("pf_v2_big.pf") + bytes(NODE), KDK, BIG_PATH)


def test_a_partial_node_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="whole number of 4096-byte nodes; this one is 425983 bytes"):
        pf.decrypt_pf(vector("pf_v2_big.pf")[:-1], KDK, BIG_PATH)


@pytest.mark.parametrize("name", ["pf_v1_small.pf", "pf_v2_small.pf"])
def test_the_wrong_key_fails_the_metadata_tag(name: str) -> None:
    wrong = bytes(16)
    with pytest.raises(
        IntegrityError, match="metadata failed authentication: wrong wrap key, or the file was modified"
    ):
        pf.decrypt_pf(vector(name), wrong, SMALL_PATH)


@pytest.mark.parametrize("name", ["pf_v1_small.pf", "pf_v2_big.pf"])
def test_the_file_is_bound_to_its_path(name: str) -> None:
    for wrong in ("/ssl.cfg", "./ssl.cfg", "SSL.cfg", "ssl.cf", BIG_PATH + "x", "/" + BIG_PATH):
        with pytest.raises(IntegrityError, match="bound to a different path than") as caught:
            pf.decrypt_pf(vector(name), KDK, wrong)
        assert repr(wrong) in str(caught.value)
        assert "resnet" not in str(caught.value).replace(wrong, "")  # the stored path is not shown


def test_a_non_protected_file_is_a_format_error() -> None:
    assert not pf.is_pf(b"\x89EML\r\n\x1a\n")
    with pytest.raises(FormatError, match="no GRAFS_PF file id"):
        pf.decrypt_pf(b"GRAFS_PX" + vector("pf_v2_small.pf")[8:], KDK, SMALL_PATH)


@pytest.mark.parametrize(("major", "minor", "message"), [(3, 0, "version 3.0"), (0, 0, "version 0.0"), (2, 1, "2.1")])
def test_unknown_versions_are_named(major: int, minor: int, message: str) -> None:
    data = vector("pf_v2_small.pf")
    with pytest.raises(FormatError, match=message):
        pf.decrypt_pf(data[:8] + bytes([major, minor]) + data[10:], KDK, SMALL_PATH)


def test_a_pending_write_needs_recovery_first() -> None:
    data = vector("pf_v2_small.pf")
    with pytest.raises(IntegrityError, match="pending write") as caught:
        pf.decrypt_pf(data[:58] + b"\x01" + data[59:], KDK, SMALL_PATH)
    assert "recover" in caught.value.hint


def test_unknown_flags_and_non_zero_padding_are_format_errors() -> None:
    data = vector("pf_v2_small.pf")
    with pytest.raises(FormatError, match="unknown Gramine protected file feature flags 0x02"):
        pf.decrypt_pf(data[:58] + b"\x02" + data[59:], KDK, SMALL_PATH)
    with pytest.raises(FormatError, match="padding is not zero"):
        pf.decrypt_pf(flip(data, NODE - 1), KDK, SMALL_PATH)


@pytest.mark.parametrize("key", [b"", bytes(15), bytes(17), bytes(32)])
def test_a_key_must_be_exactly_16_bytes(key: bytes) -> None:
    with pytest.raises(ConfigError, match=f"exactly 16 bytes, got {len(key)}"):
        pf.decrypt_pf(vector("pf_v2_small.pf"), key, SMALL_PATH)
    with pytest.raises(ConfigError, match="exactly 16 bytes"):
        pf.encrypt_pf(b"x", key, SMALL_PATH)


# -- our writer ----------------------------------------------------------------------------


def layout_nodes(size: int) -> int:
    """The node count docs/gramine-pf.md §4 gives, written out once more from its formulas."""
    if size <= 3072:
        return 1
    data = -(-(size - 3072) // NODE)
    return 1 + data + -(-data // 96)


SIZES = [0, 1, 3071, 3072, 3073, 3072 + NODE, 3072 + NODE + 1, GROUP - 1, GROUP, GROUP + 1, GROUP + 96 * NODE + 1]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_at_the_layout_boundaries(size: int) -> None:
    plaintext = deterministic(size)
    sealed = pf.encrypt_pf(plaintext, KDK, "models/m/1/model.onnx")
    assert len(sealed) == layout_nodes(size) * NODE
    info = pf.describe_pf(sealed, len(sealed))
    assert info.plaintext_size_min <= size <= info.plaintext_size_max
    assert pf.decrypt_pf(sealed, KDK, "models/m/1/model.onnx") == plaintext


@settings(max_examples=30, deadline=None)
@given(
    size=st.one_of(st.sampled_from(SIZES), st.integers(min_value=0, max_value=GROUP + 3 * 96 * NODE)),
    version=st.sampled_from(pf.PF_VERSIONS),
)
def test_round_trip_any_size(size: int, version: int) -> None:
    plaintext = deterministic(size)
    sealed = pf.encrypt_pf(plaintext, KDK, "a", version=version)
    assert pf.pf_version(sealed) == version
    assert pf.decrypt_pf(sealed, KDK, "a") == plaintext


def test_a_deep_tree_with_grandchild_mht_nodes_round_trips() -> None:
    # MHT 33 is the first child of MHT 1 (not of the root): 33 full groups of 96 data nodes, plus one.
    size = 3072 + 33 * 96 * NODE + 1
    plaintext = deterministic(size)
    sealed = pf.encrypt_pf(plaintext, KDK, "deep")
    assert len(sealed) == layout_nodes(size) * NODE == (1 + 34 + 33 * 96 + 1) * NODE
    assert pf.decrypt_pf(sealed, KDK, "deep") == plaintext
    first_grandchild = 1 + 97 * 33
    with pytest.raises(IntegrityError, match=f"node {first_grandchild} of"):
        pf.decrypt_pf(flip(sealed, first_grandchild * NODE), KDK, "deep")


@pytest.mark.parametrize(("version", "header_size"), [(1, 58), (2, 59)])
def test_each_version_has_its_header(version: int, header_size: int) -> None:
    sealed = pf.encrypt_pf(SMALL, KDK, SMALL_PATH, version=version)
    assert sealed[:10] == b"GRAFS_PF" + bytes([version, 0])
    assert pf.describe_pf(sealed, len(sealed)).header_size == header_size
    assert not any(sealed[header_size + 3884 :])
    assert pf.decrypt_pf(sealed, KDK, SMALL_PATH) == SMALL


def test_every_encryption_draws_a_fresh_nonce_and_fresh_node_keys() -> None:
    plaintext = deterministic(GROUP + 1)
    one, two = (pf.encrypt_pf(plaintext, KDK, "p") for _ in range(2))
    assert one[10:42] != two[10:42]
    assert all(node(one, i) != node(two, i) for i in range(len(one) // NODE))


def test_the_writer_refuses_what_gramine_could_not_open() -> None:
    with pytest.raises(ConfigError, match="unknown Gramine protected file version 3"):
        pf.encrypt_pf(b"x", KDK, "p", version=3)
    with pytest.raises(ConfigError, match="Gramine stores at most 771"):
        pf.encrypt_pf(b"x", KDK, "p" * 772)
    assert pf.decrypt_pf(pf.encrypt_pf(b"x", KDK, "p" * 771), KDK, "p" * 771) == b"x"
    for bad in ("", "a\0b"):
        with pytest.raises(ConfigError, match="empty or contains NUL"):
            pf.encrypt_pf(b"x", KDK, bad)


def test_paths_are_normalised_as_gramines_libos_passes_them() -> None:
    assert pf.gramine_path("./models//m/./1/model.pb") == "models/m/1/model.pb"
    assert pf.gramine_path("models/m/2/../1/model.pb") == "models/m/1/model.pb"
    assert pf.gramine_path("//abs/x") == "/abs/x"
    assert pf.gramine_path(Path("/abs/x")) == "/abs/x"


# -- files -------------------------------------------------------------------------------


def test_encrypt_pf_file_binds_the_output_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("model.pb").write_bytes(BIG)
    Path("models/m/1").mkdir(parents=True)
    bound = pf.encrypt_pf_file("model.pb", "./models/m/1/saved_model.pb", KDK, version=1)
    assert bound == "models/m/1/saved_model.pb"
    written = Path("models/m/1/saved_model.pb")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert pf.pf_version(written.read_bytes()) == 1
    assert pf.read_pf_file(written, KDK, bound) == BIG
    assert [p.name for p in written.parent.iterdir()] == ["saved_model.pb"]  # no temporary left


def test_encrypt_pf_file_with_an_explicit_path(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(SMALL)
    bound = pf.encrypt_pf_file(tmp_path / "in", tmp_path / "out", KDK, path="ssl.cfg")
    assert bound == "ssl.cfg"
    assert pf.read_pf_file(tmp_path / "out", KDK, "ssl.cfg") == SMALL


def test_a_failed_encryption_leaves_no_file(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(SMALL)
    with pytest.raises(ConfigError):
        pf.encrypt_pf_file(tmp_path / "in", tmp_path / "out", bytes(15))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_read_pf_file_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "saved_model.pb"
    target.write_bytes(flip(vector("pf_v1_big.pf"), 5 * NODE))
    with pytest.raises(IntegrityError, match=r"saved_model.pb: node 5 of the Gramine protected file"):
        pf.read_pf_file(target, KDK, BIG_PATH)


def test_a_new_wrap_key_is_private_random_and_never_overwritten(tmp_path: Path) -> None:
    pf.new_wrap_key_file(tmp_path / "wrap.key")
    pf.new_wrap_key_file(tmp_path / "other.key")
    key = pf.read_wrap_key_file(tmp_path / "wrap.key")
    assert len(key) == 16
    assert key != pf.read_wrap_key_file(tmp_path / "other.key")
    assert stat.S_IMODE((tmp_path / "wrap.key").stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        pf.new_wrap_key_file(tmp_path / "wrap.key")
    assert pf.read_wrap_key_file(tmp_path / "wrap.key") == key
    assert sorted(os.listdir(tmp_path)) == ["other.key", "wrap.key"]


def test_a_hex_wrap_key_file_is_refused_with_a_conversion_hint(tmp_path: Path) -> None:
    (tmp_path / "wrap.hex").write_text(KDK.hex() + "\n")
    with pytest.raises(ConfigError, match="holds 33 bytes, not a 16-byte wrap key") as caught:
        pf.read_wrap_key_file(tmp_path / "wrap.hex")
    assert "xxd -r -p" in caught.value.hint
    assert KDK.hex() not in caught.value.diagnostics()
