"""The model runtime: ONNX Runtime over model bytes held in memory, and the request checks before it runs.

A served model is anything with named, typed inputs and outputs and a ``run`` (the
``ModelRuntime`` protocol); ``OnnxModel`` is the one we ship. It builds an
``onnxruntime.InferenceSession`` from the decrypted model **bytes**: the plaintext model never
gets a path, so it never reaches a disk or a page cache outside the TEE.

``check_request(model, feeds)`` is what TF Serving does before it runs a model, and refuses
what it refuses, with ``InvalidRequest`` naming the input, what the model expects and what
came:

1. every feed names a model input, and every model input is fed;
2. each feed is a numpy array of exactly the input's dtype (no silent casts: a float64 array
   for a float32 input is refused, as TF Serving refuses a ``DT_DOUBLE`` tensor for a
   ``DT_FLOAT`` input); strings may come as ``str`` or UTF-8 ``bytes`` elements;
3. its rank equals the input's, and every fixed dimension matches (``-1`` takes any size);
4. the inputs whose first dimension is the batch (``-1``) all carry the same number of rows.

An input whose shape the model does not declare (ONNX Runtime reports ``[]``) is checked by
dtype only; ONNX Runtime checks the rest. Errors ONNX Runtime raises while running become
``InvalidRequest`` with its first line (names and shapes, never tensor values).

``check_request_size(size, max_request_bytes)`` is the frontends' request size limit
(``RequestTooLarge``, HTTP 413 / RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from enclaveml.errors import ConfigError
from enclaveml.serving.errors import InvalidRequest, RequestTooLarge

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "ORT_DTYPES",
    "ModelRuntime",
    "OnnxModel",
    "TensorInfo",
    "batch_rows",
    "check_request",
    "check_request_size",
    "request_bytes",
]

#: 64 MiB: a batch of 64 ResNet-50 images (NHWC float32) is 38.5 MB.
DEFAULT_MAX_REQUEST_BYTES = 64 << 20

#: ONNX Runtime's type strings → numpy dtypes (strings are object arrays of ``str``).
ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(np.object_),
}
_STRING = np.dtype(np.object_)

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a served model.

    ``shape``: ``-1`` is a dimension of any size; when the first one is ``-1`` it is the batch
    dimension. ``()`` is a scalar or a shape the model does not declare (checked by dtype only).
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def batched(self) -> bool:
        """Whether the first dimension is a free batch dimension (rows can be concatenated)."""
        return bool(self.shape) and self.shape[0] == -1


class ModelRuntime(Protocol):
    """A loaded model: its tensors and a thread-safe ``run``."""

    @property
    def inputs(self) -> tuple[TensorInfo, ...]: ...

    @property
    def outputs(self) -> tuple[TensorInfo, ...]: ...

    def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> dict[str, Array]:
        """The named outputs (all when ``None``) for ``feeds``; ``InvalidRequest`` when the model refuses them."""
        ...


def _dtype_of(ort_type: str, name: str) -> np.dtype[Any]:
    try:
        return ORT_DTYPES[ort_type]
    except KeyError:
        raise InvalidRequest(
            f"tensor {name!r} has type {ort_type}, which this server cannot carry",
            "export the model with tensor inputs and outputs of a numeric, bool or string type",
        ) from None


def _tensor_info(arg: Any) -> TensorInfo:
    # ONNX Runtime reports symbolic dimensions as strings and unknown ones as None: both are -1.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorInfo(str(arg.name), _dtype_of(str(arg.type), str(arg.name)), shape)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class OnnxModel:
    """A ``ModelRuntime`` over ``onnxruntime.InferenceSession(model_bytes)`` on the CPU.

    ``intra_op_threads``: threads one ``run`` may use (default: ONNX Runtime's, one per core).
    ``run`` is thread-safe (ONNX Runtime allows concurrent runs of one session).
    """

    def __init__(self, model_bytes: bytes, *, intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        options = ort.SessionOptions()
        if intra_op_threads is not None:
            if intra_op_threads < 1:
                raise ValueError("intra_op_threads must be at least 1")
            options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3  # errors only: warnings would name graph nodes on every load
        try:
            self._session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's pybind errors share no base below Exception
            raise ConfigError(
                f"ONNX Runtime cannot load the model: {_one_line(str(exc))}", "check the model with onnx.checker"
            ) from None
        self._inputs = tuple(_tensor_info(arg) for arg in self._session.get_inputs())
        self._outputs = tuple(_tensor_info(arg) for arg in self._session.get_outputs())

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> dict[str, Array]:
        names = requested_outputs(self._outputs, output_names)
        prepared = {name: _ort_ready(name, array) for name, array in feeds.items()}
        try:
            results = self._session.run(names, prepared)
        except Exception as exc:  # InvalidArgument, Fail, RuntimeException...: the request did not fit the model
            raise InvalidRequest(f"the model refused the request: {_one_line(str(exc))}") from None
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}

    def __repr__(self) -> str:
        return f"OnnxModel(inputs={[t.name for t in self._inputs]}, outputs={[t.name for t in self._outputs]})"


def _ort_ready(name: str, array: Array) -> Array:
    """String tensors as ONNX Runtime needs them: an object array of ``str`` (it would ``str()`` bytes)."""
    if array.dtype.kind == "U":
        return array.astype(object)
    if array.dtype.kind not in "SO":
        return array
    flat = array.ravel()
    if array.dtype.kind == "O" and all(isinstance(v, str) for v in flat):
        return array
    out = np.empty(array.shape, dtype=object)
    out_flat = out.reshape(-1)
    for i, value in enumerate(flat):
        if isinstance(value, bytes | np.bytes_):
            try:
                out_flat[i] = bytes(value).decode()
            except UnicodeDecodeError:
                raise InvalidRequest(f"input {name!r}: element {i} is not UTF-8 text") from None
        elif isinstance(value, str):
            out_flat[i] = value
        else:
            raise InvalidRequest(f"input {name!r}: element {i} is {type(value).__name__}, not a string")
    return out


def _dtype_matches(expected: np.dtype[Any], array: Array) -> bool:
    if expected == _STRING:
        return array.dtype.kind in "OUS"
    return array.dtype == expected


def _dtype_name(dtype: np.dtype[Any]) -> str:
    return "string" if dtype == _STRING or dtype.kind in "US" else str(dtype)


def requested_outputs(outputs: Sequence[TensorInfo], output_names: Sequence[str] | None) -> list[str]:
    """The outputs a request asked for (all when ``None``); ``InvalidRequest`` names the first unknown one."""
    if output_names is None:
        return [t.name for t in outputs]
    known = {t.name for t in outputs}
    unknown = [n for n in output_names if n not in known]
    if unknown:
        raise InvalidRequest(
            f"the model has no output {unknown[0]!r}", f"outputs: {', '.join(t.name for t in outputs)}"
        )
    return list(output_names)


def check_request(model: ModelRuntime, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> None:
    """Refuse ``feeds`` that ``model`` cannot run, with ``InvalidRequest`` (see the module docstring)."""
    expected = {t.name: t for t in model.inputs}
    for name in feeds:
        if name not in expected:
            raise InvalidRequest(f"the model has no input {name!r}", f"inputs: {', '.join(expected) or 'none'}")
    missing = [name for name in expected if name not in feeds]
    if missing:
        raise InvalidRequest(f"input {missing[0]!r} is missing", f"the model needs {', '.join(expected)}")
    if output_names is not None:
        outputs = {t.name for t in model.outputs}
        for name in output_names:
            if name not in outputs:
                raise InvalidRequest(f"the model has no output {name!r}", f"outputs: {', '.join(sorted(outputs))}")
    rows: dict[str, int] = {}
    for name, info in expected.items():
        array = feeds[name]
        if not isinstance(array, np.ndarray):
            raise InvalidRequest(f"input {name!r} is a {type(array).__name__}, not a tensor")
        if not _dtype_matches(info.dtype, array):
            raise InvalidRequest(
                f"input {name!r} expects dtype {_dtype_name(info.dtype)}, got {_dtype_name(array.dtype)}",
                "send the tensor in the model's dtype (the model's metadata lists it)",
            )
        if not info.shape:
            continue
        if array.ndim != len(info.shape):
            raise InvalidRequest(
                f"input {name!r} expects rank {len(info.shape)} {_shape_text(info.shape)}, "
                f"got rank {array.ndim} {list(array.shape)}"
            )
        for axis, (want, got) in enumerate(zip(info.shape, array.shape, strict=True)):
            if want != -1 and want != got:
                raise InvalidRequest(
                    f"input {name!r} expects shape {_shape_text(info.shape)}, got {list(array.shape)} "
                    f"(dimension {axis} must be {want})"
                )
        if info.batched:
            rows[name] = int(array.shape[0])
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"{n}: {r}" for n, r in rows.items())
        raise InvalidRequest(f"the inputs' batch dimensions differ ({listed})", "send the same number of rows for each")


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("?" if d == -1 else str(d) for d in shape) + "]"


def batch_rows(model: ModelRuntime, feeds: Mapping[str, Array]) -> int | None:
    """Rows in a checked request when every input and output has a batch dimension, else ``None``."""
    if not model.inputs or not all(t.batched for t in (*model.inputs, *model.outputs)):
        return None
    return int(feeds[model.inputs[0].name].shape[0])


def request_bytes(feeds: Mapping[str, Array]) -> int:
    """The tensor bytes of a request (strings: their encoded lengths)."""
    total = 0
    for array in feeds.values():
        if array.dtype.kind == "O":
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in array.ravel())
        else:
            total += int(array.nbytes)
    return total


def check_request_size(size: int, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """``RequestTooLarge`` when ``size`` bytes exceed ``max_request_bytes`` (check before decoding)."""
    if size > max_request_bytes:
        raise RequestTooLarge(f"the request is {size} bytes, over the server's limit of {max_request_bytes}")
