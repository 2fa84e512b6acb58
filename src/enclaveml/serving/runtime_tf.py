"""TensorFlow SavedModels as served models: a SavedModel directory sealed as one archive, loaded from memory.

The second ``ModelRuntime``, optional: TensorFlow is imported here only, when a SavedModel
is loaded, never by the rest of the server (an ONNX-only server never pays TF's import time
nor carries its attack surface). Where TensorFlow is not installed, ``TfSavedModel`` raises
``ConfigError`` (``TF_MISSING``) and the repository reports the version not ready with that
reason.

**The archive** (the plaintext of a ``tf-savedmodel`` model file, ``pack_savedmodel``): a
SavedModel is a directory (``saved_model.pb``, ``variables/``, ``assets/``...), and a model
file seals one byte string, so the directory is packed as an uncompressed POSIX tar
(pax) archive, in memory. Members are named relative to the directory
(``saved_model.pb``, ``variables/variables.index``), in sorted order, each directory before
its contents, with mtime 0, uid/gid 0, no owner names, mode 0644 for files and 0755 for
directories: the same directory always gives the same bytes. Uncompressed on purpose: the
variables are float arrays that barely compress, and a member can never be larger than the
archive (no decompression bomb).

**Reading an archive** (``savedmodel_members``) refuses with ``FormatError``, naming the member:

1. bytes that are not an uncompressed tar archive;
2. a member that is not a regular file or a directory: symbolic or hard link, character or
   block device, FIFO, sparse or contiguous file;
3. an absolute name, a ``..`` component, an empty name, or the same name twice;
4. more than ``MAX_MEMBERS`` members;
5. no ``saved_model.pb`` (or ``saved_model.pbtxt``) at the top.

The tar format is read with the standard library's ``tarfile``; these checks are ours
because nothing is extracted to a disk, so ``tarfile``'s extraction filters do not apply.

**Loading from memory** (``TfSavedModel``): the members are written into TensorFlow's
in-memory file system (``ram://enclaveml-savedmodel-<random>/`` through ``tf.io.gfile``; a
map in the process's memory, TF's ``RamFileSystem``) and ``tf.saved_model.load`` reads them
from there. With TensorFlow 2.21 the load opens no file for writing (checked with
``strace``), so the plaintext model never reaches a disk. Once loaded, the graph and the
variables are in TF's memory and their ``ram://`` copies are deleted; ``assets/`` stays until
the runtime is dropped, for models that read their asset files while serving.

**The signature** (``savedmodel_signature``) is read from ``saved_model.pb`` with TensorFlow's
protos (``tensorflow.core.protobuf.saved_model_pb2``), which the serving extra's
``tensorflow-protobuf`` provides without TensorFlow, so ``enclaveml model encrypt DIR``
records inputs and outputs in the header in either environment; without the protos (or
with only ``saved_model.pbtxt``) they are recorded as unknown.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import re
import secrets
import stat
import tarfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from enclaveml._atomic import atomic_output
from enclaveml.errors import ConfigError, FormatError
from enclaveml.serving.errors import InvalidRequest
from enclaveml.serving.runtime import TensorInfo, check_request, requested_outputs

if TYPE_CHECKING:
    import os

    from enclaveml.analytics.ml import ModelMetadata, TensorSpec
    from enclaveml.crypto import KeyWrapper

__all__ = [
    "DEFAULT_SIGNATURE",
    "MAX_MEMBERS",
    "TF_MISSING",
    "TfSavedModel",
    "is_savedmodel_archive",
    "pack_savedmodel",
    "save_encrypted_savedmodel",
    "savedmodel_members",
    "savedmodel_signature",
    "seal_savedmodel",
    "tensorflow_available",
]

logger = logging.getLogger("enclaveml.serving")

DEFAULT_SIGNATURE = "serving_default"
"""The signature TF Serving serves when a request names none."""
MAX_MEMBERS = 65_536
"""Files and directories in one archive; a SavedModel has a handful (variables shards, assets)."""
TF_MISSING = "TensorFlow is not installed in this environment; serve SavedModels from an environment with TensorFlow"
_TF_MISSING_HINT = "install tensorflow beside enclaveml (docs/serving-models.md, TensorFlow SavedModels)"
_GRAPH_FILES = ("saved_model.pb", "saved_model.pbtxt")
_ARCHIVE_HINT = "seal the SavedModel directory itself: enclaveml model encrypt DIR (or publish_savedmodel)"
_KEPT_AFTER_LOAD = ("assets", "assets.extra")
_TAR_MAGIC_OFFSET = 257  # POSIX: "ustar" at byte 257 of every header block

# TensorFlow dtype names → numpy dtypes the server carries (strings are object arrays).
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name)
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    )
}
_NUMPY_DTYPES["string"] = np.dtype(np.object_)
# TensorFlow DataType enum names → ONNX TensorProto names, the header's vocabulary (analytics.ml.TensorSpec).
_HEADER_TYPES = {"DT_HALF": "FLOAT16", "DT_BFLOAT16": "BFLOAT16", "DT_COMPLEX64": "COMPLEX64"}

Array = npt.NDArray[Any]


# -- the archive ------------------------------------------------------------------------------


def _tar_info(name: str, *, directory: bool, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_savedmodel(directory: str | os.PathLike[str]) -> bytes:
    """The SavedModel ``directory`` as the deterministic archive of the module docstring, built in memory.

    ``ConfigError`` if it is not a SavedModel directory, or holds a link or a special file.
    """
    root = Path(directory)
    if not root.is_dir() or not any((root / name).is_file() for name in _GRAPH_FILES):
        raise ConfigError(f"{root} is not a SavedModel directory", "it must hold saved_model.pb (tf.saved_model.save)")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        pending = [root]
        while pending:
            parent = pending.pop()
            children = sorted(parent.iterdir(), key=lambda p: p.name)
            for path in children:
                name = path.relative_to(root).as_posix()
                mode = path.lstat().st_mode
                if stat.S_ISDIR(mode):
                    archive.addfile(_tar_info(name, directory=True))
                elif stat.S_ISREG(mode):
                    data = path.read_bytes()
                    archive.addfile(_tar_info(name, directory=False, size=len(data)), io.BytesIO(data))
                else:
                    raise ConfigError(
                        f"{path}: a link or special file in the SavedModel directory",
                        "a sealed SavedModel holds regular files and directories only; copy the target in",
                    )
            # Depth first, in name order: each directory is listed before its contents.
            pending.extend(reversed([p for p in children if stat.S_ISDIR(p.lstat().st_mode)]))
    return buffer.getvalue()


def is_savedmodel_archive(data: bytes) -> bool:
    """Whether ``data`` looks like a tar archive (what a SavedModel model file holds); not a validation."""
    return data[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar"


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    if member.issparse():
        return "a sparse file"
    return f"of tar type {member.type!r}"


def _member_name(member: tarfile.TarInfo) -> str:
    raw = member.name
    if raw.startswith("/"):
        raise FormatError(
            f"archive member {raw!r} has an absolute name", "a SavedModel archive names members relatively"
        )
    parts = [part for part in PurePosixPath(raw).parts if part != "."]
    if ".." in parts:
        raise FormatError(f"archive member {raw!r} leaves the SavedModel directory ('..')", _ARCHIVE_HINT)
    return "/".join(parts)


def savedmodel_members(archive: bytes) -> dict[str, bytes | None]:
    """The archive's members, relative name → file bytes (``None`` for a directory), checked as the docstring says."""
    members: dict[str, bytes | None] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise FormatError(f"the SavedModel archive has over {MAX_MEMBERS} members", _ARCHIVE_HINT)
                regular = member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not member.issparse()
                if not (regular or member.isdir()):
                    raise FormatError(
                        f"archive member {member.name!r} is {_member_kind(member)}",
                        "a SavedModel archive holds regular files and directories only",
                    )
                name = _member_name(member)
                if not name:
                    if member.isdir():
                        continue  # "." itself, as `tar -C dir -cf - .` writes it
                    raise FormatError("an archive member has an empty name", _ARCHIVE_HINT)
                if name in members:
                    raise FormatError(f"archive member {name!r} appears twice", _ARCHIVE_HINT)
                if member.isdir():
                    members[name] = None
                else:
                    extracted = tar.extractfile(member)
                    assert extracted is not None  # a regular file
                    members[name] = extracted.read()
    except tarfile.TarError as exc:
        raise FormatError(f"not a SavedModel archive (an uncompressed tar): {exc}", _ARCHIVE_HINT) from None
    if not any(isinstance(members.get(name), bytes) for name in _GRAPH_FILES):
        raise FormatError("the archive holds no saved_model.pb at its top", _ARCHIVE_HINT)
    return members


# -- the signature, from the protos ------------------------------------------------------------


def _header_type(dtype_enum_name: str) -> str:
    return _HEADER_TYPES.get(dtype_enum_name, dtype_enum_name.removeprefix("DT_"))


def savedmodel_signature(
    archive: bytes, signature: str = DEFAULT_SIGNATURE
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None:
    """The inputs and outputs of ``signature``, read from ``saved_model.pb``; ``None`` if it cannot be read here.

    ``None``: neither TensorFlow nor ``tensorflow-protobuf`` is installed, or the graph is a
    ``saved_model.pbtxt``. ``ConfigError`` if the SavedModel has no such signature.
    Tensors are sorted by name; types are ONNX ``TensorProto`` names (``DT_FLOAT`` → ``FLOAT``).
    """
    from enclaveml.analytics.ml import TensorSpec

    graph = savedmodel_members(archive).get("saved_model.pb")
    if graph is None:
        return None
    try:
        from tensorflow.core.framework import types_pb2
        from tensorflow.core.protobuf import saved_model_pb2
    except ImportError:
        return None
    try:
        saved_model = saved_model_pb2.SavedModel.FromString(graph)
    except Exception:  # protobuf's DecodeError has no base of ours
        raise FormatError("saved_model.pb is not a SavedModel protobuf", "export it with tf.saved_model.save") from None
    graphs = list(saved_model.meta_graphs)
    served = [g for g in graphs if "serve" in g.meta_info_def.tags] or graphs[:1]
    available = sorted({key for g in served for key in g.signature_def})
    if not served or signature not in served[0].signature_def:
        raise ConfigError(
            f"the SavedModel has no signature {signature!r} (signatures: {', '.join(available) or 'none'})",
            "export it with signatures={'serving_default': fn} in tf.saved_model.save",
        )
    found = served[0].signature_def[signature]

    def specs(tensors: Any) -> tuple[TensorSpec, ...]:
        out = []
        for key in sorted(tensors):
            info = tensors[key]
            shape = () if info.tensor_shape.unknown_rank else tuple(max(d.size, -1) for d in info.tensor_shape.dim)
            out.append(TensorSpec(key, _header_type(types_pb2.DataType.Name(info.dtype)), shape))
        return tuple(out)

    return specs(found.inputs), specs(found.outputs)


def seal_savedmodel(
    directory: str | os.PathLike[str], kms: KeyWrapper, key: str, *, name: str, version: int
) -> tuple[bytes, ModelMetadata]:
    """Pack the SavedModel ``directory`` and seal it under KMS key ``key``: the EML model file's bytes and header.

    The header says ``format=tf-savedmodel``, the name and version, and the ``serving_default``
    signature's inputs and outputs when ``savedmodel_signature`` can read them and they fit
    the header (else none: unknown). Everything happens in memory; bad metadata is a ``ConfigError`` before the KMS
    is asked.
    """
    from enclaveml.analytics.ml import SAVEDMODEL_FORMAT, ModelMetadata
    from enclaveml.crypto import encrypt_bytes

    archive = pack_savedmodel(directory)
    signature = savedmodel_signature(archive)
    inputs, outputs = signature if signature is not None else ((), ())
    metadata = ModelMetadata(name, version, inputs, outputs, SAVEDMODEL_FORMAT)
    try:
        context = metadata.to_context()
    except ConfigError:
        if not metadata.signature_known:
            raise
        # Tensor lists over the header's 1024-byte limit: leave them out (the server reads the model's).
        metadata = ModelMetadata(name, version, (), (), SAVEDMODEL_FORMAT)
        context = metadata.to_context()  # a bad name or version still fails here
    return bytes(encrypt_bytes(archive, kms, key, context=context)), metadata


def save_encrypted_savedmodel(
    directory: str | os.PathLike[str],
    output: str | os.PathLike[str],
    kms: KeyWrapper,
    key: str,
    *,
    name: str,
    version: int,
) -> ModelMetadata:
    """``seal_savedmodel`` written to ``output`` atomically (0600); returns the header's metadata."""
    target = Path(output)
    if not target.parent.is_dir():
        raise ConfigError(f"{target.parent}: no such directory", "create the output directory first")
    sealed, metadata = seal_savedmodel(directory, kms, key, name=name, version=version)
    with atomic_output(target, mode=0o600) as out:
        out.write(sealed)
    return metadata


# -- the runtime -------------------------------------------------------------------------------


def tensorflow_available() -> bool:
    """Whether the real TensorFlow is importable (``tensorflow-protobuf`` alone provides a bare ``tensorflow``)."""
    try:
        return importlib.util.find_spec("tensorflow.python") is not None
    except (ImportError, ValueError):
        return False


def _tensorflow() -> Any:
    if not tensorflow_available():
        raise ConfigError(TF_MISSING, _TF_MISSING_HINT)
    import tensorflow as tf

    return tf


def _tensor_info(name: str, spec: Any) -> TensorInfo:
    dtype = _NUMPY_DTYPES.get(spec.dtype.name)
    if dtype is None:
        raise ConfigError(
            f"tensor {name!r} has type {spec.dtype.name}, which this server cannot carry",
            "export the signature with numeric, bool or string tensors",
        )
    shape = () if spec.shape.rank is None else tuple(-1 if d is None else int(d) for d in spec.shape)
    return TensorInfo(name, dtype, shape)


def _remove_tree(tf: Any, path: str) -> None:
    try:
        if tf.io.gfile.exists(path):
            tf.io.gfile.rmtree(path)
    except Exception:  # at interpreter exit TF may be gone already; the memory goes with the process
        logger.debug("could not remove %s", path)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


_NODE = re.compile(r"\{\{node ([^}]+)\}\}")


def _refusal(tf: Any, exc: Exception) -> str:
    """What TF's error says, without its message: TF messages may print tensor values (assertions, indices)."""
    if isinstance(exc, tf.errors.OpError):
        node = _NODE.search(str(exc.message))
        return f"TensorFlow {type(exc).__name__}" + (f" at node {node.group(1)!r}" if node else "")
    return f"TensorFlow {type(exc).__name__}"


class TfSavedModel:
    """A ``ModelRuntime`` over a SavedModel archive (``pack_savedmodel``), loaded from memory.

    ``signature``: the signature served (default ``serving_default``). ``inputs`` and
    ``outputs`` are its tensors, sorted by name. ``run`` is thread-safe (a loaded signature is
    a concrete function; TensorFlow runs concurrent calls). Errors: ``ConfigError``
    (``TF_MISSING``; TF cannot load it; no such signature; a tensor type the server cannot
    carry), ``FormatError`` (the archive, see the module docstring).
    """

    def __init__(self, archive: bytes, *, signature: str = DEFAULT_SIGNATURE) -> None:
        tf = _tensorflow()
        members = savedmodel_members(archive)
        root = f"ram://enclaveml-savedmodel-{secrets.token_hex(16)}"
        loaded = False
        try:
            tf.io.gfile.makedirs(root)
            for name, data in members.items():
                parent = PurePosixPath(name).parent
                if data is None:
                    tf.io.gfile.makedirs(f"{root}/{name}")
                else:
                    if parent.name:  # archives may list a file before (or without) its directory
                        tf.io.gfile.makedirs(f"{root}/{parent}")
                    with tf.io.gfile.GFile(f"{root}/{name}", "wb") as out:
                        out.write(data)
            del members
            try:
                self._model = tf.saved_model.load(root)
            except Exception as exc:  # TF's errors share no base below Exception
                raise ConfigError(
                    f"TensorFlow cannot load the SavedModel: {_one_line(str(exc))}",
                    "check it with `saved_model_cli show --dir DIR --all`",
                ) from None
            signatures = self._model.signatures
            if signature not in signatures:
                raise ConfigError(
                    f"the SavedModel has no signature {signature!r} (signatures: {', '.join(signatures) or 'none'})",
                    "export it with signatures={'serving_default': fn} in tf.saved_model.save",
                )
            self._function = signatures[signature]
            _, kwargs = self._function.structured_input_signature
            self._inputs = tuple(_tensor_info(n, kwargs[n]) for n in sorted(kwargs))
            outputs = self._function.structured_outputs
            self._outputs = tuple(_tensor_info(n, outputs[n]) for n in sorted(outputs))
            loaded = True
        finally:
            if loaded:  # the graph and variables now live in TF's memory; assets may be read while serving
                for child in tf.io.gfile.listdir(root):
                    if child.rstrip("/") not in _KEPT_AFTER_LOAD:
                        path = f"{root}/{child.rstrip('/')}"
                        (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)
            else:
                _remove_tree(tf, root)
        self._finalizer = weakref.finalize(self, _remove_tree, tf, root)
        self._tf = tf
        self._signature = signature

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> dict[str, Array]:
        names = requested_outputs(self._outputs, output_names)
        # Checked here too, not only by the frontends: TF's own refusals print the tensors they got.
        check_request(self, feeds, names)
        try:
            results = self._function(**{name: self._tf.constant(array) for name, array in feeds.items()})
            return {name: np.asarray(results[name].numpy()) for name in names}
        except Exception as exc:  # OpError, TypeError, ValueError: the request did not fit the graph
            raise InvalidRequest(f"the model refused the request: {_refusal(self._tf, exc)}") from None

    def close(self) -> None:
        """Delete the model's remaining ``ram://`` files now (they also go when the runtime is dropped)."""
        self._finalizer()

    def __repr__(self) -> str:
        inputs, outputs = [t.name for t in self._inputs], [t.name for t in self._outputs]
        return f"TfSavedModel(signature={self._signature!r}, inputs={inputs}, outputs={outputs})"
