"""Tensors on the wire ↔ numpy: every decoder checks sizes and shapes before it trusts them."""

from __future__ import annotations

import base64
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import service_pb2

from enclaveml.serving._tf_protos import predict_pb2, tensor_pb2, types_pb2
from enclaveml.serving.errors import InvalidRequest, RequestTooLarge
from enclaveml.serving.tensor_codec import (
    decode_bytes_elements,
    encode_bytes_elements,
    fill_tensor_proto,
    from_json_data,
    from_kserve_contents,
    from_kserve_raw,
    from_tensor_proto,
    from_tf_rest,
    kserve_datatype,
    to_json_data,
    to_kserve_raw,
    to_tensor_proto,
    to_tf_rest,
)

LIMIT = 1 << 20
NUMERIC = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.bool_]


def tensor(dtype: int, shape: list[int], **fields: Any) -> Any:
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def arrays() -> st.SearchStrategy[np.ndarray]:
    return st.sampled_from(NUMERIC).flatmap(
        lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
    )


# -- TF Serving TensorProto ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(arrays())
def test_tensor_content_round_trips_every_numeric_dtype(array: np.ndarray) -> None:
    back = from_tensor_proto("x", to_tensor_proto(array), max_bytes=LIMIT)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@settings(max_examples=30, deadline=None)
@given(arrays())
def test_kserve_raw_contents_round_trip(array: np.ndarray) -> None:
    datatype = kserve_datatype(array.dtype)
    back = from_kserve_raw("x", datatype, list(array.shape), to_kserve_raw(array), max_bytes=LIMIT)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype


def test_typed_value_fields_are_read_per_dtype() -> None:
    assert from_tensor_proto("f", tensor(types_pb2.DT_FLOAT, [2], float_val=[1.5, 2.5]), max_bytes=LIMIT).tolist() == [
        1.5,
        2.5,
    ]
    ints = from_tensor_proto("i", tensor(types_pb2.DT_INT8, [1, 2], int_val=[-3, 4]), max_bytes=LIMIT)
    assert ints.dtype == np.int8
    assert ints.tolist() == [[-3, 4]]
    half_bits = np.array([1.5, -2.0], np.float16).view(np.uint16).tolist()
    halves = from_tensor_proto("h", tensor(types_pb2.DT_HALF, [2], half_val=half_bits), max_bytes=LIMIT)
    assert halves.dtype == np.float16
    assert halves.tolist() == [1.5, -2.0]
    strings = from_tensor_proto("s", tensor(types_pb2.DT_STRING, [2], string_val=[b"a", b"\xff"]), max_bytes=LIMIT)
    assert strings.dtype == object
    assert strings.tolist() == [b"a", b"\xff"]


def test_fewer_values_than_elements_repeat_the_last_one_as_tensorflow_does() -> None:
    proto = tensor(types_pb2.DT_FLOAT, [2, 3], float_val=[1.0, 2.0])
    assert from_tensor_proto("x", proto, max_bytes=LIMIT).tolist() == [[1.0, 2.0, 2.0], [2.0, 2.0, 2.0]]


def test_a_broadcast_to_a_huge_shape_is_refused_before_anything_is_allocated() -> None:
    proto = tensor(types_pb2.DT_FLOAT, [1_000_000, 1_000_000], float_val=[1.0])
    with pytest.raises(RequestTooLarge, match=r"shape \[1000000, 1000000\] needs 4000000000000 bytes, limit 1048576"):
        from_tensor_proto("x", proto, max_bytes=LIMIT)


@pytest.mark.parametrize(
    ("proto", "message"),
    [
        (tensor(types_pb2.DT_FLOAT, [2, 2], tensor_content=b"\0" * 12), r"12 bytes of content, shape \[2, 2\]"),
        (tensor(types_pb2.DT_FLOAT, [1, 3], float_val=[1, 2, 3, 4]), r"4 values in float_val, shape \[1, 3\]"),
        (tensor(types_pb2.DT_FLOAT, [2]), "no values in float_val or tensor_content"),
        (tensor(types_pb2.DT_FLOAT, [-1, 2], float_val=[1]), "negative dimension"),
        (tensor(types_pb2.DT_COMPLEX64, [1]), "unsupported TensorProto dtype DT_COMPLEX64"),
        (tensor(types_pb2.DT_STRING, [1], tensor_content=b"abcd"), "DT_STRING cannot use tensor_content"),
    ],
    ids=["content_length", "too_many_values", "no_values", "negative_dim", "complex", "string_content"],
)
def test_malformed_tensor_protos_are_refused_naming_the_problem(proto: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        from_tensor_proto("x", proto, max_bytes=LIMIT)


def test_an_unknown_rank_is_refused() -> None:
    proto = tensor(types_pb2.DT_FLOAT, [], float_val=[1.0])
    proto.tensor_shape.unknown_rank = True
    with pytest.raises(InvalidRequest, match="unknown rank"):
        from_tensor_proto("x", proto, max_bytes=LIMIT)


def test_numbers_travel_in_tensor_content_and_strings_in_string_val() -> None:
    numbers = to_tensor_proto(np.arange(6, dtype=np.int64).reshape(2, 3))
    assert numbers.dtype == types_pb2.DT_INT64
    assert len(numbers.tensor_content) == 48
    assert not numbers.int64_val
    strings = to_tensor_proto(np.array(["ok", b"raw"], dtype=object))
    assert list(strings.string_val) == [b"ok", b"raw"]


def test_outputs_are_written_into_the_response_in_place_as_to_tensor_proto_writes_them() -> None:
    response = predict_pb2.PredictResponse()
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "label": np.array([2, 0], np.int64),
        "scores": np.eye(2, 3, dtype=np.float32),
        "names": np.array([b"a", b"bc"], object),
    }
    for name, array in arrays.items():
        fill_tensor_proto(response.outputs[name], array)
    parsed = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    for name, array in arrays.items():
        assert parsed.outputs[name] == to_tensor_proto(array)
        np.testing.assert_array_equal(from_tensor_proto(name, parsed.outputs[name], max_bytes=LIMIT), array)


# -- KServe gRPC ----------------------------------------------------------------------------------


def test_bytes_elements_are_length_prefixed_and_every_length_is_checked() -> None:
    framed = encode_bytes_elements(np.array(["ab", b"", b"\x00c"], dtype=object))
    assert framed == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 2) + b"\x00c"
    assert decode_bytes_elements("x", framed, 3) == [b"ab", b"", b"\x00c"]
    with pytest.raises(InvalidRequest, match="runs past the content"):
        decode_bytes_elements("x", struct.pack("<I", 1000) + b"ab", 1)
    with pytest.raises(InvalidRequest, match="ends inside a length prefix"):
        decode_bytes_elements("x", framed + b"\x01", 4)
    with pytest.raises(InvalidRequest, match="3 BYTES elements, the shape needs 2"):
        decode_bytes_elements("x", framed, 2)


def test_kserve_contents_use_the_field_of_the_datatype() -> None:
    contents = service_pb2.InferTensorContents(fp32_contents=[1, 2, 3, 4])
    array = from_kserve_contents("x", "FP32", [2, 2], contents, max_bytes=LIMIT)
    assert array.dtype == np.float32
    assert array.tolist() == [[1, 2], [3, 4]]
    texts = from_kserve_contents(
        "t", "BYTES", [2], service_pb2.InferTensorContents(bytes_contents=[b"a", b"b"]), max_bytes=LIMIT
    )
    assert texts.tolist() == [b"a", b"b"]


@pytest.mark.parametrize(
    ("datatype", "shape", "contents", "error", "message"),
    [
        ("FP32", [3], {"fp32_contents": [1, 2]}, InvalidRequest, r"2 values in fp32_contents, shape \[3\] needs 3"),
        ("FP32", [1], {"fp32_contents": [1], "int64_contents": [1]}, InvalidRequest, "values in int64_contents"),
        ("FP16", [1], {}, InvalidRequest, "only in raw_input_contents"),
        ("UINT8", [1], {"uint_contents": [300]}, InvalidRequest, "out of range for UINT8"),
        ("FP8", [1], {}, InvalidRequest, "unknown datatype 'FP8'"),
        ("FP64", [1 << 20, 1 << 20], {}, RequestTooLarge, "limit 1048576"),
    ],
    ids=["count", "two_fields", "fp16", "uint8_range", "unknown_datatype", "too_large"],
)
def test_bad_kserve_contents_are_refused(
    datatype: str, shape: list[int], contents: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        from_kserve_contents("x", datatype, shape, service_pb2.InferTensorContents(**contents), max_bytes=LIMIT)


def test_raw_contents_of_the_wrong_length_are_refused() -> None:
    with pytest.raises(InvalidRequest, match=r"7 bytes of content, shape \[2\] of int32 needs 8"):
        from_kserve_raw("x", "INT32", [2], b"\0" * 7, max_bytes=LIMIT)


# -- JSON -----------------------------------------------------------------------------------------


def test_kserve_json_data_may_be_flat_or_nested() -> None:
    flat = from_json_data("x", "FP32", [2, 2], [1, 2, 3, 4.5], max_bytes=LIMIT)
    nested = from_json_data("x", "FP32", [2, 2], [[1, 2], [3, 4.5]], max_bytes=LIMIT)
    np.testing.assert_array_equal(flat, nested)
    assert flat.dtype == np.float32
    assert from_json_data("s", "BYTES", [2], ["a", "é"], max_bytes=LIMIT).tolist() == [b"a", "é".encode()]
    assert to_json_data(np.array([[1, 2]], np.int64)) == [1, 2]
    assert to_json_data(np.array([b"ok", b"\xff"], dtype=object)) == ["ok", {"b64": "/w=="}]


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("INT64", [2], [1, 1.5], r"values of kind \['f'\] do not fit dtype int64"),
        ("FP32", [1], [True], r"kind \['b'\] do not fit dtype float32"),
        ("UINT8", [2], [1, 300], "out of range for uint8"),
        ("FP32", [2, 2], [[1, 2], [3]], "not a regular"),
        ("FP32", [2, 2], [1, 2, 3], r"3 values, shape \[2, 2\] needs 4"),
        ("BYTES", [1], [1], r"kind \['i'\] do not fit dtype object"),
        ("FP32", [1.5], [1], "shape must be a list of integers"),
    ],
    ids=["lossy_float_to_int", "bool_to_float", "range", "ragged", "count", "number_as_bytes", "float_shape"],
)
def test_json_values_are_never_coerced_lossily(datatype: str, shape: list[Any], data: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        from_json_data("x", datatype, shape, data, max_bytes=LIMIT)


# -- TF Serving REST --------------------------------------------------------------------------------

F32 = np.dtype(np.float32)


def test_instances_of_a_single_input_model_are_its_rows() -> None:
    feeds = from_tf_rest({"instances": [[1, 2], [3, 4]]}, {"input": F32}, max_bytes=LIMIT)
    assert feeds["input"].dtype == np.float32
    assert feeds["input"].tolist() == [[1, 2], [3, 4]]


def test_instances_as_objects_and_columnar_inputs_name_each_input() -> None:
    dtypes = {"a": F32, "b": np.dtype(object)}
    rows = from_tf_rest(
        {"instances": [{"a": [1], "b": "x"}, {"a": [2], "b": {"b64": base64.b64encode(b"\xff").decode()}}]},
        dtypes,
        max_bytes=LIMIT,
    )
    assert rows["a"].tolist() == [[1], [2]]
    assert rows["b"].tolist() == [b"x", b"\xff"]
    columns = from_tf_rest({"inputs": {"a": [[1], [2]], "b": ["x", "y"]}}, dtypes, max_bytes=LIMIT)
    assert columns["a"].tolist() == [[1], [2]]
    assert columns["b"].tolist() == [b"x", b"y"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instances": [[1]], "inputs": [[1]]}, 'exactly one of "instances" or "inputs"'),
        ({}, 'exactly one of "instances" or "inputs"'),
        ({"instances": {"input": [1]}}, '"instances" must be a list'),
        ({"inputs": {"other": [1]}}, "unknown input 'other'"),
        ({"instances": [{"input": [1]}, {"other": [1]}]}, "every instance must name the same inputs"),
        ({"instances": [{"b64": "!!"}]}, "not valid base64"),
    ],
    ids=["both", "neither", "instances_not_list", "unknown_input", "different_inputs", "bad_b64"],
)
def test_malformed_tf_rest_bodies_are_refused(body: dict[str, Any], message: str) -> None:
    dtypes = {"input": np.dtype(object) if "b64" in str(body) else F32}
    with pytest.raises(InvalidRequest, match=message):
        from_tf_rest(body, dtypes, max_bytes=LIMIT)


def test_tf_rest_answers_predictions_per_row_or_outputs_per_name() -> None:
    outputs = {"label": np.array([1, 0]), "p": np.array([[0.25, 0.75], [1.0, 0.0]], np.float32)}
    assert to_tf_rest(outputs, row_format=True) == {
        "predictions": [{"label": 1, "p": [0.25, 0.75]}, {"label": 0, "p": [1.0, 0.0]}]
    }
    assert to_tf_rest(outputs, row_format=False) == {"outputs": {"label": [1, 0], "p": [[0.25, 0.75], [1.0, 0.0]]}}
    assert to_tf_rest({"label": np.array([1, 0])}, row_format=True) == {"predictions": [1, 0]}
    with pytest.raises(InvalidRequest, match="do not share a batch size"):
        to_tf_rest({"a": np.zeros(2), "b": np.zeros(3)}, row_format=True)
