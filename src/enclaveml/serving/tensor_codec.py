"""Tensors on the wire ↔ numpy: TF Serving ``TensorProto``, KServe v2 (gRPC and JSON), TF Serving REST JSON.

Every decoder checks before it allocates: the element count a shape asks for times the
item size must fit ``max_bytes`` (``RequestTooLarge`` otherwise; a one-value
``float_val`` with shape ``[10**12]`` is refused, not broadcast), dimensions must not be
negative, and the values given must match the shape (``InvalidRequest`` naming the tensor,
what was expected and what came). Nothing here trusts a length field it did not check.

=======================  ======================================================================
wire form                rules (as the reference servers and clients do it)
=======================  ======================================================================
``TensorProto``          ``tensor_content`` (little-endian, exactly count × itemsize bytes), else
                         the typed field of the dtype (``float_val`` …); fewer values than
                         elements repeat the last one (TensorFlow's rule), more are an error
KServe gRPC              ``raw_input_contents[i]`` for input i when present (BYTES: each element
                         a 4-byte little-endian length then the bytes), else ``contents``
KServe JSON              ``data`` flat or nested row-major; BYTES elements are strings
TF Serving REST          ``instances`` (row format, batch dim first) or ``inputs`` (columnar);
                         binary strings as ``{"b64": "..."}``
=======================  ======================================================================

JSON values are coerced to the model's dtype only when no information is lost: integers
into an integer or float tensor, floats into a float tensor, booleans into BOOL, strings
into BYTES. ``1.5`` for an INT64 input is an ``InvalidRequest``, not a silent truncation.

Hand-written: the protos are generated, but the rules above (and TensorFlow's own
``make_ndarray``) are not available without TensorFlow, and the KServe BYTES framing has no
server-side library.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from enclaveml.serving._tf_protos import tensor_pb2, types_pb2
from enclaveml.serving.errors import InvalidRequest, RequestTooLarge

__all__ = [
    "KSERVE_DATATYPES",
    "check_size",
    "decode_bytes_elements",
    "encode_bytes_elements",
    "fill_tensor_proto",
    "from_json_data",
    "from_kserve_contents",
    "from_kserve_raw",
    "from_tensor_proto",
    "from_tf_rest",
    "kserve_datatype",
    "numpy_dtype_for_kserve",
    "numpy_dtype_for_tf",
    "tf_dtype",
    "to_json_data",
    "to_kserve_raw",
    "to_tensor_proto",
    "to_tf_rest",
]

Array = npt.NDArray[Any]

KSERVE_DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
"""KServe v2 / Open Inference Protocol datatype names → numpy dtypes."""

_KSERVE_NAMES = {dtype: name for name, dtype in KSERVE_DATATYPES.items()}

# TF DataType → (numpy dtype, the TensorProto field holding its values).
_TF_TYPES: dict[int, tuple[np.dtype[Any], str]] = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val"),
    types_pb2.DT_HALF: (np.dtype(np.float16), "half_val"),
    types_pb2.DT_INT8: (np.dtype(np.int8), "int_val"),
    types_pb2.DT_INT16: (np.dtype(np.int16), "int_val"),
    types_pb2.DT_INT32: (np.dtype(np.int32), "int_val"),
    types_pb2.DT_INT64: (np.dtype(np.int64), "int64_val"),
    types_pb2.DT_UINT8: (np.dtype(np.uint8), "int_val"),
    types_pb2.DT_UINT16: (np.dtype(np.uint16), "int_val"),
    types_pb2.DT_UINT32: (np.dtype(np.uint32), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype(np.uint64), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val"),
    types_pb2.DT_STRING: (np.dtype(np.object_), "string_val"),
}
_TF_BY_NUMPY = {dtype: code for code, (dtype, _field) in _TF_TYPES.items()}

# KServe InferTensorContents field per datatype (FP16 travels only as raw bytes).
_KSERVE_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_BYTES_LENGTH = struct.Struct("<I")


# -- dtypes and sizes ------------------------------------------------------------------------


def tf_dtype(dtype: np.dtype[Any]) -> int:
    """The TF ``DataType`` of a numpy dtype (strings are ``np.object_``)."""
    try:
        return _TF_BY_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise InvalidRequest(f"dtype {dtype} has no TensorFlow DataType") from None


def numpy_dtype_for_tf(code: int) -> np.dtype[Any]:
    try:
        return _TF_TYPES[code][0]
    except KeyError:
        raise InvalidRequest(f"unsupported TensorProto dtype {_tf_type_name(code)}") from None


def kserve_datatype(dtype: np.dtype[Any]) -> str:
    """The KServe datatype name of a numpy dtype (``np.object_`` → ``BYTES``)."""
    try:
        return _KSERVE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise InvalidRequest(f"dtype {dtype} has no KServe datatype") from None


def numpy_dtype_for_kserve(datatype: str) -> np.dtype[Any]:
    try:
        return KSERVE_DATATYPES[datatype]
    except KeyError:
        raise InvalidRequest(f"unknown datatype {datatype!r}", f"use one of {', '.join(KSERVE_DATATYPES)}") from None


def _tf_type_name(code: int) -> str:
    try:
        return str(types_pb2.DataType.Name(code))
    except ValueError:
        return str(code)


def check_size(name: str, shape: Sequence[int], dtype: np.dtype[Any], max_bytes: int) -> int:
    """The element count of ``shape``; ``InvalidRequest`` for a negative dim, ``RequestTooLarge`` past ``max_bytes``.

    BYTES elements count as one byte each here; their real size is bounded by the message.
    """
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidRequest(f"input {name!r}: shape {list(shape)} has a negative dimension")
        count *= dim
    itemsize = 1 if dtype == np.object_ else dtype.itemsize
    if count * itemsize > max_bytes:
        raise RequestTooLarge(f"input {name!r}: shape {list(shape)} needs {count * itemsize} bytes, limit {max_bytes}")
    return count


def _from_buffer(name: str, data: bytes, dtype: np.dtype[Any], shape: Sequence[int], count: int) -> Array:
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidRequest(
            f"input {name!r}: {len(data)} bytes of content, shape {list(shape)} of {dtype} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _little_endian_bytes(array: Array) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


# -- KServe BYTES framing ----------------------------------------------------------------------


def encode_bytes_elements(array: Array) -> bytes:
    """BYTES elements in row-major order, each as a 4-byte little-endian length then its bytes."""
    parts: list[bytes] = []
    for element in array.ravel():
        data = element.encode() if isinstance(element, str) else bytes(element)
        parts += [_BYTES_LENGTH.pack(len(data)), data]
    return b"".join(parts)


def decode_bytes_elements(name: str, data: bytes, count: int) -> list[bytes]:
    """The inverse of ``encode_bytes_elements``: exactly ``count`` elements, every length inside ``data``."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidRequest(f"input {name!r}: BYTES content ends inside a length prefix at offset {offset}")
        (length,) = _BYTES_LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidRequest(f"input {name!r}: BYTES element at offset {offset - 4} runs past the content")
        elements.append(data[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise InvalidRequest(f"input {name!r}: {len(elements)} BYTES elements, the shape needs {count}")
    return elements


def _object_array(values: Sequence[Any], shape: Sequence[int]) -> Array:
    array = np.empty(len(values), dtype=np.object_)
    array[:] = list(values)
    return array.reshape(shape)


# -- TF Serving TensorProto --------------------------------------------------------------------


def from_tensor_proto(name: str, proto: Any, *, max_bytes: int) -> Array:
    """A ``tensorflow.TensorProto`` → numpy array, by the rules in the module docstring."""
    dtype = numpy_dtype_for_tf(proto.dtype)
    if proto.tensor_shape.unknown_rank:
        raise InvalidRequest(f"input {name!r}: the tensor has an unknown rank")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    count = check_size(name, shape, dtype, max_bytes)
    content = proto.tensor_content  # a copy of the bytes each time it is read: read once
    if content:
        if dtype == np.object_:
            raise InvalidRequest(f"input {name!r}: DT_STRING cannot use tensor_content")
        return _from_buffer(name, content, dtype, shape, count)
    field = _TF_TYPES[proto.dtype][1]
    values = getattr(proto, field)
    if len(values) > count:
        raise InvalidRequest(f"input {name!r}: {len(values)} values in {field}, shape {shape} holds {count}")
    if count and not values:
        raise InvalidRequest(f"input {name!r}: no values in {field} or tensor_content for shape {shape}")
    if dtype == np.object_:
        listed = list(values) + [values[-1]] * (count - len(values)) if count else []
        return _object_array(listed, shape)
    if field == "half_val":  # float16 bit patterns carried in an int32 field
        flat = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        flat = np.asarray(values, dtype=dtype)
    if len(flat) < count:
        flat = np.concatenate([flat, np.full(count - len(flat), flat[-1], dtype=dtype)])
    return flat.reshape(shape)


def to_tensor_proto(array: Array) -> Any:
    """A numpy array → ``TensorProto``: numbers in ``tensor_content``, strings in ``string_val``."""
    proto = tensor_pb2.TensorProto()
    fill_tensor_proto(proto, array)
    return proto


def fill_tensor_proto(proto: Any, array: Array) -> None:
    """``to_tensor_proto`` into an empty ``TensorProto`` in place (a response's map entry: no copy)."""
    proto.dtype = tf_dtype(array.dtype)
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    if array.dtype == np.object_:
        proto.string_val.extend(e.encode() if isinstance(e, str) else bytes(e) for e in array.ravel())
    else:
        proto.tensor_content = _little_endian_bytes(array)


# -- KServe v2 gRPC ----------------------------------------------------------------------------


def from_kserve_raw(name: str, datatype: str, shape: Sequence[int], data: bytes, *, max_bytes: int) -> Array:
    """One ``raw_input_contents`` entry → numpy array."""
    dtype = numpy_dtype_for_kserve(datatype)
    count = check_size(name, shape, dtype, max_bytes)
    if dtype == np.object_:
        return _object_array(decode_bytes_elements(name, data, count), shape)
    return _from_buffer(name, data, dtype, shape, count)


def from_kserve_contents(name: str, datatype: str, shape: Sequence[int], contents: Any, *, max_bytes: int) -> Array:
    """An ``InferTensorContents`` → numpy array; only the field of ``datatype`` may hold values."""
    dtype = numpy_dtype_for_kserve(datatype)
    count = check_size(name, shape, dtype, max_bytes)
    field = _KSERVE_FIELDS.get(datatype)
    if field is None:
        raise InvalidRequest(f"input {name!r}: {datatype} travels only in raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidRequest(f"input {name!r}: {len(values)} values in {field}, shape {list(shape)} needs {count}")
    for other in set(_KSERVE_FIELDS.values()) - {field}:
        if len(getattr(contents, other)):
            raise InvalidRequest(f"input {name!r}: datatype {datatype} but values in {other}")
    if dtype == np.object_:
        return _object_array(list(values), shape)
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidRequest(f"input {name!r}: a value is out of range for {datatype}") from None


def to_kserve_raw(array: Array) -> bytes:
    """A numpy array → ``raw_output_contents`` bytes (BYTES framed, numbers little-endian)."""
    if array.dtype == np.object_:
        return encode_bytes_elements(array)
    return _little_endian_bytes(array)


# -- JSON (KServe v2 REST and TF Serving REST) -------------------------------------------------

# numpy kinds of JSON-parsed values each target kind accepts without losing information
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf", "O": "USO"}


def _coerce(name: str, data: Any, dtype: np.dtype[Any], *, max_bytes: int) -> Array:
    """JSON values (nested lists) → numpy array of ``dtype``, refusing lossy or ragged input."""
    try:
        if dtype == np.object_:
            parsed = np.asarray(_unwrap_b64(name, data), dtype=np.object_)
            kinds = {np.asarray(e).dtype.kind for e in parsed.ravel()} if parsed.size else {"S"}
        else:
            parsed = np.asarray(data)
            kinds = {parsed.dtype.kind}
    except (ValueError, TypeError):
        raise InvalidRequest(f"input {name!r}: the data is not a regular (non-ragged) array") from None
    if parsed.size and not kinds <= set(_ACCEPTED_KINDS[dtype.kind]):
        raise InvalidRequest(f"input {name!r}: values of kind {sorted(kinds)} do not fit dtype {dtype}")
    check_size(name, parsed.shape, dtype, max_bytes)
    if dtype == np.object_:
        flat = [e.encode() if isinstance(e, str) else e for e in parsed.ravel()]
        return _object_array(flat, parsed.shape)
    if dtype.kind in "iu" and parsed.size:
        limits = np.iinfo(dtype)
        if int(parsed.min()) < limits.min or int(parsed.max()) > limits.max:
            raise InvalidRequest(f"input {name!r}: a value is out of range for {dtype}")
    return parsed.astype(dtype)


def _unwrap_b64(name: str, data: Any) -> Any:
    if isinstance(data, list):
        return [_unwrap_b64(name, item) for item in data]
    if isinstance(data, dict):
        if set(data) != {"b64"} or not isinstance(data["b64"], str):
            raise InvalidRequest(f'input {name!r}: an object value must be {{"b64": "<base64>"}}')
        try:
            return base64.b64decode(data["b64"], validate=True)
        except ValueError:
            raise InvalidRequest(f"input {name!r}: a b64 value is not valid base64") from None
    return data


def from_json_data(name: str, datatype: str, shape: Sequence[int], data: Any, *, max_bytes: int) -> Array:
    """A KServe v2 JSON input (``data`` flat or nested, row-major) → numpy array of ``shape``."""
    dtype = numpy_dtype_for_kserve(datatype)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidRequest(f"input {name!r}: shape must be a list of integers")
    count = check_size(name, shape, dtype, max_bytes)
    array = _coerce(name, data, dtype, max_bytes=max_bytes)
    if array.size != count:
        raise InvalidRequest(f"input {name!r}: {array.size} values, shape {shape} needs {count}")
    return array.reshape(shape)


def to_json_data(array: Array) -> list[Any]:
    """A numpy array → the flat row-major ``data`` list of a KServe JSON output (BYTES as text)."""
    return [_json_value(v) for v in array.ravel()] if array.dtype == np.object_ else list(array.ravel().tolist())


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _nested(array: Array) -> Any:
    if array.dtype == np.object_:
        return np.vectorize(_json_value, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def from_tf_rest(body: Mapping[str, Any], inputs: Mapping[str, np.dtype[Any]], *, max_bytes: int) -> dict[str, Array]:
    """A TF Serving REST predict body (``instances`` or ``inputs``) → feeds, dtypes from the model's inputs."""
    if ("instances" in body) == ("inputs" in body):
        raise InvalidRequest('the request must have exactly one of "instances" or "inputs"')
    single = next(iter(inputs)) if len(inputs) == 1 else None
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise InvalidRequest('"instances" must be a list')
        if instances and all(isinstance(row, dict) and set(row) != {"b64"} for row in instances):
            names = set(instances[0])
            if any(set(row) != names for row in instances):
                raise InvalidRequest("every instance must name the same inputs")
            columns = {n: [row[n] for row in instances] for n in names}
        elif single is not None:
            columns = {single: instances}
        else:
            raise InvalidRequest(f"the model has inputs {sorted(inputs)}: give each instance as an object")
    else:
        given = body["inputs"]
        if isinstance(given, dict) and set(given) != {"b64"}:
            columns = dict(given)
        elif single is not None:
            columns = {single: given}
        else:
            raise InvalidRequest(f'the model has inputs {sorted(inputs)}: give "inputs" as an object')
    feeds: dict[str, Array] = {}
    for name, value in columns.items():
        if name not in inputs:
            raise InvalidRequest(f"unknown input {name!r}", f"the model's inputs are {sorted(inputs)}")
        feeds[name] = _coerce(name, value, inputs[name], max_bytes=max_bytes)
    return feeds


def to_tf_rest(outputs: Mapping[str, Array], *, row_format: bool) -> dict[str, Any]:
    """Outputs → ``{"predictions": ...}`` (row format) or ``{"outputs": ...}`` (columnar), as TF Serving answers."""
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": _nested(next(iter(outputs.values())))}
        return {"outputs": {name: _nested(a) for name, a in outputs.items()}}
    if len(outputs) == 1:
        return {"predictions": _nested(next(iter(outputs.values())))}
    rows = {len(a) if a.ndim else -1 for a in outputs.values()}
    if len(rows) != 1 or -1 in rows:
        raise InvalidRequest('the outputs do not share a batch size: ask with "inputs" (columnar) instead')
    columns = {name: _nested(a) for name, a in outputs.items()}
    return {"predictions": [{name: col[i] for name, col in columns.items()} for i in range(rows.pop())]}
