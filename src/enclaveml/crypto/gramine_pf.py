"""Gramine protected ("encrypted") files, on-disk formats v1 and v2: reader and writer.

Gramine's LibOS decrypts files mounted with ``type = "encrypted"`` itself, inside the
enclave, with a 16-byte key derivation key (KDK, "wrap key") it received by secret
provisioning. This module writes such files for a model owner (what
``gramine-sgx-pf-crypt encrypt`` does) and reads them back (what ``... decrypt`` does),
so that a model can be prepared, checked and recovered without Gramine installed.

Hand-written because no library implements this format: Gramine's own code is C inside
its LibOS and tools. Every primitive comes from ``cryptography``: AES-128-GCM
(``AESGCM``) and AES-CMAC (the PRF of the SP 800-108 key derivation). The format is
specified in ``docs/gramine-pf.md``; in short (section numbers refer to that file):

* 4096-byte nodes. Node 0 is the metadata node: a plaintext header (file id ``GRAFS_PF``,
  major version 1 or 2, minor 0, a 32-byte KDF nonce, the metadata tag, and in v2 one
  flags byte) and an encrypted part (bound path, file size, root-MHT key and tag, the
  first 3072 bytes of the file) under a key derived from the KDK and the nonce (§2, §3).
* Larger files add Merkle-hash-tree (MHT) nodes, each holding the key and GCM tag of 96
  data nodes and 32 child MHT nodes, interleaved with their data nodes (§4). Every node
  is AES-128-GCM under its own random key, all-zero IV, no AAD; tags are out of band.
* The file is bound to one path: decryption succeeds only with the exact stored path.

Checks on read, in the order of §6: file id, version, flags, length, pending write and
padding; then the metadata tag, the path, the node count, every MHT and every data node
tag. Malformed input is a ``FormatError``, a failed check an ``IntegrityError``. There is
no rollback protection: an older complete file under the same key and path still
decrypts (§7).

The pure functions take and return bytes. ``encrypt_pf_file`` / ``read_pf_file`` and the
wrap-key file helpers are the only ones that touch files.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclaveml._atomic import atomic_output
from enclaveml.errors import ConfigError, FormatError, IntegrityError

__all__ = [
    "KEY_SIZE",
    "PF_FILE_ID",
    "PF_NODE_SIZE",
    "PF_VERSIONS",
    "PfInfo",
    "decrypt_pf",
    "derive_metadata_key",
    "derive_wrap_key",
    "describe_pf",
    "encrypt_pf",
    "encrypt_pf_file",
    "gramine_path",
    "is_pf",
    "new_wrap_key_file",
    "pf_version",
    "read_pf_file",
    "read_wrap_key_file",
    "write_wrap_key_file",
]

PF_NODE_SIZE = 4096
PF_FILE_ID = b"GRAFS_PF"  # u64 0x46505f5346415247, little-endian on disk
PF_VERSIONS = (1, 2)
KEY_SIZE = 16  # KDK, node keys and GCM tags are all 16 bytes
NONCE_SIZE = 32
PATH_MAX_SIZE = 260 + 512  # the stored path field, NUL included
MD_USER_DATA_SIZE = 3072  # file bytes carried by the metadata node
DATA_SLOTS = 96  # data nodes per MHT node
CHILD_SLOTS = 32  # child MHT nodes per MHT node
HAS_PENDING_WRITE = 0x01  # v2 feature flag: an interrupted write, needs Gramine's recovery
METADATA_KEY_LABEL = b"SGX-PROTECTED-FS-METADATA-KEY"
_LABEL_SIZE = 64
_HEADER_SIZE = {1: 58, 2: 59}
_ENCRYPTED_SIZE = PATH_MAX_SIZE + 8 + KEY_SIZE + KEY_SIZE + MD_USER_DATA_SIZE  # 3884
_SIZE_FIELD = struct.Struct("<Q")
_SLOT = 2 * KEY_SIZE  # key ‖ tag
_ZERO_IV = bytes(12)

Draw = Callable[[str, int], bytes]
"""``draw(what, index)``: 32 random bytes for ``("nonce", 0)``, 16 for ``("data", d)``,
``("mht", m)`` (``m = 0`` is the root MHT). Injected only by known-answer tests."""


# -- layout (docs/gramine-pf.md §4) ------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    data_nodes: int
    mht_nodes: int

    @property
    def nodes(self) -> int:
        return 1 + self.mht_nodes + self.data_nodes


def _layout(file_size: int) -> _Layout:
    """Node counts for a plaintext of ``file_size`` bytes: ≤ 3072 bytes fit the metadata node."""
    if file_size <= MD_USER_DATA_SIZE:
        return _Layout(0, 0)
    data = -(-(file_size - MD_USER_DATA_SIZE) // PF_NODE_SIZE)
    return _Layout(data, -(-data // DATA_SLOTS))


def _mht_physical(m: int) -> int:
    """Physical node of logical MHT ``m``: the root (0) is node 1, each MHT precedes its 96 data nodes."""
    return 1 + m * (1 + DATA_SLOTS)


def _data_physical(d: int) -> int:
    """Physical node of logical data node ``d``: after the metadata node and ``d // 96 + 1`` MHT nodes."""
    return d + 2 + d // DATA_SLOTS


def _parent_slot(m: int) -> tuple[int, int]:
    """The parent MHT of MHT ``m > 0`` and the child slot (0..31) that holds its key and tag."""
    return (m - 1) // CHILD_SLOTS, (m - 1) % CHILD_SLOTS


def _data_slot_offset(d: int) -> int:
    return (d % DATA_SLOTS) * _SLOT


def _child_slot_offset(slot: int) -> int:
    return (DATA_SLOTS + slot) * _SLOT


# -- key derivation (docs/gramine-pf.md §3) ----------------------------------------------


def derive_metadata_key(kdk: bytes, nonce: bytes) -> bytes:
    """``AES-CMAC(KDK, u32le(1) ‖ label zero-padded to 64 ‖ nonce[32] ‖ u32le(128))``: SP 800-108 counter mode."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("the metadata key nonce must be 32 bytes")
    mac = CMAC(algorithms.AES(_check_key(kdk)))
    mac.update(struct.pack("<I", 1) + METADATA_KEY_LABEL.ljust(_LABEL_SIZE, b"\0") + nonce + struct.pack("<I", 128))
    return mac.finalize()


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise ConfigError(
            f"a Gramine wrap key must be exactly 16 bytes, got {size}",
            "use the raw 16-byte key file (`enclaveml model wrap-key` makes one)",
        )
    return bytes(key)


def _path_bytes(path: str) -> bytes:
    raw = path.encode("utf-8", "surrogateescape")
    if not raw or b"\0" in raw:
        raise ConfigError("the protected file path is empty or contains NUL", "give the path the manifest uri names")
    if len(raw) >= PATH_MAX_SIZE:
        raise ConfigError(f"the protected file path is {len(raw)} bytes; Gramine stores at most {PATH_MAX_SIZE - 1}")
    return raw


def gramine_path(path: str | os.PathLike[str]) -> str:
    """``path`` as Gramine's LibOS passes it: lexically normalised (``./a//b`` → ``a/b``), relative stays relative."""
    text = posixpath.normpath(os.fspath(path))
    return "/" + text.lstrip("/") if text.startswith("//") else text


# -- header (docs/gramine-pf.md §2) ------------------------------------------------------


def is_pf(prefix: bytes) -> bool:
    """Whether ``prefix`` (the first bytes of a file) starts with Gramine's file id ``GRAFS_PF``."""
    return bytes(prefix[:8]) == PF_FILE_ID


def pf_version(prefix: bytes) -> int:
    """The major format version (1 or 2) of a file starting with ``prefix``; ``FormatError`` otherwise."""
    if not is_pf(prefix):
        raise FormatError("not a Gramine protected file (no GRAFS_PF file id)", "is it an EML file? try `inspect`")
    if len(prefix) < 10:
        raise FormatError("the Gramine protected file header is truncated")
    major, minor = prefix[8], prefix[9]
    if major not in PF_VERSIONS:
        raise FormatError(
            f"unsupported Gramine protected file version {major}.{minor}",
            "this reader knows versions 1 (Gramine ≤ 1.8) and 2 (Gramine ≥ 1.9)",
        )
    if minor != 0:
        raise FormatError(f"unsupported Gramine protected file minor version {major}.{minor}", "expected minor 0")
    return major


@dataclass(frozen=True)
class PfInfo:
    """What the plaintext header and the length tell without a key (unauthenticated)."""

    version: int
    header_size: int
    pending_write: bool
    nodes: int
    plaintext_size_min: int
    plaintext_size_max: int


def describe_pf(prefix: bytes, file_size: int) -> PfInfo:
    """Version, flags and the plaintext size range implied by ``file_size`` (the exact size is encrypted)."""
    version = pf_version(prefix)
    header_size = _HEADER_SIZE[version]
    if len(prefix) < header_size:
        raise FormatError("the Gramine protected file header is truncated")
    flags = prefix[58] if version == 2 else 0
    if flags & ~HAS_PENDING_WRITE:
        raise FormatError(f"unknown Gramine protected file feature flags 0x{flags:02x}", "only 0x01 is defined")
    if file_size < PF_NODE_SIZE or file_size % PF_NODE_SIZE:
        raise FormatError(
            f"a Gramine protected file is a whole number of 4096-byte nodes; this one is {file_size} bytes",
            "the file is truncated or was appended to",
        )
    nodes = file_size // PF_NODE_SIZE
    if nodes == 1:
        return PfInfo(version, header_size, bool(flags), 1, 0, MD_USER_DATA_SIZE)
    rest = nodes - 1  # MHT and data nodes: each MHT is followed by up to 96 data nodes
    mht = -(-rest // (1 + DATA_SLOTS))
    data = rest - mht
    if data < 1 or -(-data // DATA_SLOTS) != mht:
        raise FormatError(f"{nodes} nodes is not the length of any Gramine protected file", "the file is truncated")
    low = MD_USER_DATA_SIZE + (data - 1) * PF_NODE_SIZE + 1
    return PfInfo(version, header_size, bool(flags), nodes, low, MD_USER_DATA_SIZE + data * PF_NODE_SIZE)


# -- reader -------------------------------------------------------------------------------


def decrypt_pf(data: bytes, key: bytes, path: str) -> bytes:
    """Verify and decrypt the protected file ``data`` bound to ``path`` with the 16-byte KDK ``key``.

    ``path`` must equal the stored path byte for byte (Gramine passes the manifest ``uri``
    without ``file:``). Malformed headers raise ``FormatError``; a wrong key, a wrong path,
    and any modified, swapped, missing or extra node raise ``IntegrityError``.
    """
    kdk = _check_key(key)
    expected_path = _path_bytes(path)
    view = memoryview(data)
    info = describe_pf(bytes(view[:PF_NODE_SIZE]), len(view))
    if info.pending_write:
        raise IntegrityError(
            "the Gramine protected file has a pending write (Gramine stopped while writing it)",
            "recover it with Gramine's recovery file (fs.mounts enable_recovery), or restore a trusted copy",
        )
    if any(view[info.header_size + _ENCRYPTED_SIZE : PF_NODE_SIZE]):
        raise FormatError("the metadata node's padding is not zero")
    metadata = _open_metadata(view, kdk, info.header_size)
    stored_path = bytes(metadata[:PATH_MAX_SIZE]).split(b"\0", 1)
    if len(stored_path) != 2:
        raise FormatError("the stored path is not NUL-terminated")
    if stored_path[0] != expected_path:
        raise IntegrityError(
            f"the Gramine protected file is bound to a different path than {path!r}",
            "pass the path it was encrypted for: the manifest uri without file:, e.g. models/m/1/model.pb",
        )
    (file_size,) = _SIZE_FIELD.unpack_from(metadata, PATH_MAX_SIZE)
    layout = _layout(file_size)
    if layout.nodes != info.nodes:
        what = "truncated" if info.nodes < layout.nodes else "longer than its metadata says"
        raise IntegrityError(f"the Gramine protected file is {what}: {info.nodes} nodes, expected {layout.nodes}")
    head_at = PATH_MAX_SIZE + 8 + 2 * KEY_SIZE
    out = bytearray(layout.data_nodes * PF_NODE_SIZE + MD_USER_DATA_SIZE)
    out[:MD_USER_DATA_SIZE] = metadata[head_at : head_at + MD_USER_DATA_SIZE]
    if layout.data_nodes:
        root_key_at = PATH_MAX_SIZE + 8
        root_slot = bytes(metadata[root_key_at : root_key_at + _SLOT])
        _open_tree(view, layout, root_slot, memoryview(out)[MD_USER_DATA_SIZE:])
    return bytes(memoryview(out)[:file_size])


def _open_metadata(view: memoryview, kdk: bytes, header_size: int) -> bytearray:
    nonce, tag = bytes(view[10:42]), bytes(view[42:58])
    sealed = bytes(view[header_size : header_size + _ENCRYPTED_SIZE]) + tag
    plain = bytearray(_ENCRYPTED_SIZE)
    try:
        AESGCM(derive_metadata_key(kdk, nonce)).decrypt_into(_ZERO_IV, sealed, None, plain)
    except InvalidTag:
        raise IntegrityError(
            "the Gramine protected file's metadata failed authentication: wrong wrap key, or the file was modified"
        ) from None
    return plain


def _open_node(view: memoryview, physical: int, slot: bytes, out: memoryview, scratch: bytearray) -> None:
    """Decrypt physical node ``physical`` with ``slot`` (key ‖ tag) into ``out`` (4096 bytes)."""
    start = physical * PF_NODE_SIZE
    scratch[:PF_NODE_SIZE] = view[start : start + PF_NODE_SIZE]
    scratch[PF_NODE_SIZE:] = slot[KEY_SIZE:]
    try:
        AESGCM(slot[:KEY_SIZE]).decrypt_into(_ZERO_IV, scratch, None, out)
    except InvalidTag:
        raise IntegrityError(f"node {physical} of the Gramine protected file failed authentication") from None


def _open_tree(view: memoryview, layout: _Layout, root_slot: bytes, out: memoryview) -> None:
    """Open every MHT node (parents first: a parent's number is always lower), then every data node."""
    scratch = bytearray(PF_NODE_SIZE + KEY_SIZE)
    mhts: list[bytearray] = []
    for m in range(layout.mht_nodes):
        if m == 0:
            slot = root_slot
        else:
            parent, child = _parent_slot(m)
            slot = bytes(mhts[parent][_child_slot_offset(child) : _child_slot_offset(child) + _SLOT])
        node = bytearray(PF_NODE_SIZE)
        _open_node(view, _mht_physical(m), slot, memoryview(node), scratch)
        mhts.append(node)
    for d in range(layout.data_nodes):
        at = _data_slot_offset(d)
        slot = bytes(mhts[d // DATA_SLOTS][at : at + _SLOT])
        _open_node(view, _data_physical(d), slot, out[d * PF_NODE_SIZE : (d + 1) * PF_NODE_SIZE], scratch)


# -- writer -------------------------------------------------------------------------------


def _os_draw(what: str, index: int) -> bytes:
    return os.urandom(NONCE_SIZE if what == "nonce" else KEY_SIZE)


def encrypt_pf(plaintext: bytes, key: bytes, path: str, *, version: int = 2) -> bytes:
    """``plaintext`` as a Gramine protected file bound to ``path``, under the 16-byte KDK ``key``.

    ``version=2`` is read by Gramine ≥ 1.9; ``version=1`` by every Gramine (≤ 1.8 reads only
    v1, e.g. CCZoo's 1.3.1). The KDF nonce and every node key are fresh random bytes.
    """
    return _encrypt_pf_with(plaintext, key, path, version, _os_draw)


def _encrypt_pf_with(plaintext: bytes, key: bytes, path: str, version: int, draw: Draw) -> bytes:
    """``encrypt_pf`` with its randomness from ``draw``: for known-answer tests only."""
    kdk = _check_key(key)
    stored_path = _path_bytes(path)
    if version not in PF_VERSIONS:
        raise ConfigError(f"unknown Gramine protected file version {version}", "use 1 (Gramine ≤ 1.8) or 2")
    source = memoryview(plaintext)
    layout = _layout(len(source))
    out = bytearray(layout.nodes * PF_NODE_SIZE)
    view = memoryview(out)
    root_slot = bytes(_SLOT)
    if layout.data_nodes:
        root_slot = _seal_tree(source[MD_USER_DATA_SIZE:], layout, view, draw)
    metadata = bytearray(_ENCRYPTED_SIZE)
    metadata[: len(stored_path)] = stored_path
    _SIZE_FIELD.pack_into(metadata, PATH_MAX_SIZE, len(source))
    metadata[PATH_MAX_SIZE + 8 : PATH_MAX_SIZE + 8 + _SLOT] = root_slot
    head = source[:MD_USER_DATA_SIZE]
    metadata[PATH_MAX_SIZE + 8 + _SLOT : PATH_MAX_SIZE + 8 + _SLOT + len(head)] = head
    nonce = draw("nonce", 0)
    sealed = AESGCM(derive_metadata_key(kdk, nonce)).encrypt(_ZERO_IV, bytes(metadata), None)
    header_size = _HEADER_SIZE[version]
    out[0:8] = PF_FILE_ID
    out[8], out[9] = version, 0
    out[10:42] = nonce
    out[42:58] = sealed[_ENCRYPTED_SIZE:]
    out[header_size : header_size + _ENCRYPTED_SIZE] = sealed[:_ENCRYPTED_SIZE]
    return bytes(out)


def _seal_node(plain: memoryview, out: memoryview, node_key: bytes, scratch: bytearray) -> bytes:
    """Encrypt one 4096-byte node into ``out``; returns its slot, key ‖ tag."""
    AESGCM(node_key).encrypt_into(_ZERO_IV, plain, None, scratch)
    out[:] = memoryview(scratch)[:PF_NODE_SIZE]
    return node_key + scratch[PF_NODE_SIZE:]


def _seal_tree(body: memoryview, layout: _Layout, out: memoryview, draw: Draw) -> bytes:
    """Seal the data nodes, then the MHT nodes children first; returns the root MHT's slot."""
    scratch = bytearray(PF_NODE_SIZE + KEY_SIZE)
    last = bytearray(PF_NODE_SIZE)  # the final data node, zero past the end of the file
    mhts = [bytearray(PF_NODE_SIZE) for _ in range(layout.mht_nodes)]
    for d in range(layout.data_nodes):
        chunk = body[d * PF_NODE_SIZE : (d + 1) * PF_NODE_SIZE]
        if len(chunk) < PF_NODE_SIZE:
            last[: len(chunk)] = chunk
            chunk = memoryview(last)
        at, physical = _data_slot_offset(d), _data_physical(d)
        target = out[physical * PF_NODE_SIZE : (physical + 1) * PF_NODE_SIZE]
        mhts[d // DATA_SLOTS][at : at + _SLOT] = _seal_node(chunk, target, draw("data", d), scratch)
    for m in reversed(range(layout.mht_nodes)):
        physical = _mht_physical(m)
        target = out[physical * PF_NODE_SIZE : (physical + 1) * PF_NODE_SIZE]
        slot = _seal_node(memoryview(mhts[m]), target, draw("mht", m), scratch)
        if m == 0:
            return slot
        parent, child = _parent_slot(m)
        mhts[parent][_child_slot_offset(child) : _child_slot_offset(child) + _SLOT] = slot
    raise AssertionError("a file with data nodes has a root MHT")


# -- files --------------------------------------------------------------------------------


def encrypt_pf_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    key: bytes,
    path: str | None = None,
    version: int = 2,
) -> str:
    """Encrypt the file ``src`` into ``dst`` (0600, temporary file + rename); returns the bound path.

    ``path`` defaults to ``dst`` as given, normalised like Gramine's LibOS does
    (``gramine_path``): what ``gramine-sgx-pf-crypt encrypt -o dst`` binds, and what a
    manifest ``uri = "file:<dst>"`` makes Gramine check. An explicit ``path`` is stored as is.
    """
    bound = gramine_path(dst) if path is None else path
    sealed = encrypt_pf(Path(src).read_bytes(), key, bound, version=version)
    with atomic_output(dst, mode=0o600) as out:
        out.write(sealed)
    return bound


def read_pf_file(path_on_disk: str | os.PathLike[str], key: bytes, pf_path: str) -> bytes:
    """Read, verify and decrypt the protected file at ``path_on_disk``, bound to ``pf_path``; plaintext in memory."""
    data = Path(path_on_disk).read_bytes()
    try:
        return decrypt_pf(data, key, pf_path)
    except (FormatError, IntegrityError) as exc:
        raise exc.about(os.fspath(path_on_disk)) from None


WRAP_KEY_INFO = b"enclaveml/gramine-pf-key/v1\x00"


def derive_wrap_key(primary_key: bytes, key_id: str, version: int) -> bytes:
    """The 16-byte Gramine wrap key (KDK) derived from version ``version`` of primary key ``key_id``.

    ``HKDF-SHA256(ikm = primary_key, salt = none, info = "enclaveml/gramine-pf-key/v1" ‖ 0x00 ‖
    key_id ‖ 0x00 ‖ u32be(version), length = 16)``. One KMS key then serves both EML files and
    Gramine protected files: the owner derives the wrap key to encrypt a model
    (``enclaveml kms gramine-pf-key``), and the broker's secret provisioning sends the same 16
    bytes (``SECRET_PROVISION_SET_KEY``) to an attested enclave. HKDF is one-way, so the wrap
    key reveals nothing of the primary key; key id and version in ``info`` make every key
    version's wrap key distinct.
    """
    if len(primary_key) != 32:
        raise ValueError("a primary key version is 32 bytes")
    info = WRAP_KEY_INFO + key_id.encode() + b"\x00" + version.to_bytes(4, "big")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(primary_key)


def read_wrap_key_file(path: str | os.PathLike[str]) -> bytes:
    """A raw 16-byte wrap key file (as ``gramine-sgx-pf-crypt -w`` reads it); ``ConfigError`` otherwise."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the wrap key file {os.fspath(path)}: {exc.strerror or exc}") from None
    if len(raw) != KEY_SIZE:
        hint = "a Gramine wrap key file holds exactly 16 raw bytes"
        if len(raw.strip()) == 2 * KEY_SIZE and all(c in b"0123456789abcdefABCDEF" for c in raw.strip()):
            hint = "it looks like hex text: convert it with `xxd -r -p KEY.hex > KEY.bin`"
        raise ConfigError(f"{os.fspath(path)}: holds {len(raw)} bytes, not a 16-byte wrap key", hint)
    return raw


def new_wrap_key_file(path: str | os.PathLike[str]) -> None:
    """Write 16 fresh random bytes to ``path`` (mode 0600); never replaces an existing file."""
    write_wrap_key_file(path, os.urandom(KEY_SIZE))


def write_wrap_key_file(path: str | os.PathLike[str], key: bytes) -> None:
    """Write the 16-byte wrap key ``key`` to ``path`` (mode 0600, atomic); never replaces an existing file."""
    if len(key) != KEY_SIZE:
        raise ValueError("a wrap key is 16 bytes")
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp_name, target)  # atomic, and fails if the target exists
        except FileExistsError:
            raise ConfigError(
                f"{target} already exists", "a wrap key is never overwritten: choose another name"
            ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
