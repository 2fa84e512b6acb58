"""The load client's wire: model metadata and inference requests of the two gRPC protocols.

``TfServingWire`` speaks TF Serving's ``tensorflow.serving.PredictionService``
(``GetModelMetadata`` for the ``signature_def`` map, ``Predict``); ``KServeWire`` speaks the
KServe v2 / Open Inference Protocol's ``inference.GRPCInferenceService`` (``ModelMetadata``,
``ModelInfer``). Both turn the metadata into ``InputSpec`` rows, encode a batch of seeded
random data into request *bytes* once per channel (the load loop then sends the same bytes
with no per-request serialisation, as TF Serving's own benchmark clients reuse one request),
and check that each response parses and carries outputs.

Tensors are encoded by ``serving.tensor_codec`` (the server's own codec: ``tensor_content``
little-endian, KServe ``raw_input_contents`` with framed ``BYTES``), so client and server
agree on one encoding; the published helpers would need TensorFlow (``tf.make_tensor_proto``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from enclaveml.errors import ConfigError
from enclaveml.serving import tensor_codec

__all__ = ["InputSpec", "KServeWire", "TfServingWire", "Wire", "random_feeds", "wire_for"]

_STRING_CHOICES = (b"a", b"b", b"c")


@dataclass(frozen=True)
class InputSpec:
    """One model input as the server describes it: ``-1`` = any size (the batch dim first)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    def batch_shape(self, batch: int, sample_shape: Sequence[int] | None = None) -> tuple[int, ...]:
        """The shape of a request of ``batch`` samples: ``sample_shape`` if given, else the
        metadata's dims after the first, each unknown (-1) dim as 1."""
        if sample_shape is not None:
            return (batch, *sample_shape)
        if not self.shape:
            raise ConfigError(
                f"input {self.name!r} has no known shape",
                "give the per-sample shape with --input-shape, e.g. 224,224,3",
            )
        return (batch, *(d if d > 0 else 1 for d in self.shape[1:]))


def parse_dtype(name: str) -> np.dtype[Any]:
    """``float32``, ``int64``, ``string`` ... (numpy names) for ``--input-dtype``."""
    if name in ("string", "bytes", "object"):
        return np.dtype(np.object_)
    try:
        return np.dtype(name)
    except TypeError:
        raise ConfigError(f"unknown input dtype {name!r}", "use a numpy name: float32, int64, string ...") from None


def random_feeds(
    inputs: Sequence[InputSpec], batch: int, *, seed: int, sample_shape: Sequence[int] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """Seeded random data for every input: normal floats, small integers, a few short strings."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, npt.NDArray[Any]] = {}
    for spec in inputs:
        shape = spec.batch_shape(batch, sample_shape if len(inputs) == 1 else None)
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 10, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[spec.name] = rng.choice(np.array(_STRING_CHOICES, dtype=object), size=shape)
    return feeds


class Wire(Protocol):
    """One gRPC protocol: method paths, and requests / responses as serialised bytes."""

    metadata_method: str
    predict_method: str

    def metadata_request(self, model: str, version: int | None) -> bytes: ...
    def inputs_from_metadata(self, response: bytes, signature: str) -> list[InputSpec]: ...
    def predict_request(
        self, model: str, version: int | None, signature: str, feeds: Mapping[str, npt.NDArray[Any]]
    ) -> bytes: ...
    def check_response(self, response: bytes) -> None:
        """Raise ``ValueError`` when the bytes are not a response with at least one output."""


class TfServingWire:
    """TF Serving's ``PredictionService`` (protos via ``serving._tf_protos``)."""

    metadata_method = "/tensorflow.serving.PredictionService/GetModelMetadata"
    predict_method = "/tensorflow.serving.PredictionService/Predict"

    def __init__(self) -> None:
        from enclaveml.serving import _tf_protos

        self._protos = _tf_protos

    def _model_spec(self, spec: Any, model: str, version: int | None) -> None:
        spec.name = model
        if version is not None:
            spec.version.value = version

    def metadata_request(self, model: str, version: int | None) -> bytes:
        request = self._protos.get_model_metadata_pb2.GetModelMetadataRequest()
        self._model_spec(request.model_spec, model, version)
        request.metadata_field.append("signature_def")
        return bytes(request.SerializeToString())

    def inputs_from_metadata(self, response: bytes, signature: str) -> list[InputSpec]:
        pb = self._protos.get_model_metadata_pb2
        message = pb.GetModelMetadataResponse.FromString(response)
        signatures = pb.SignatureDefMap()
        if "signature_def" not in message.metadata or not message.metadata["signature_def"].Unpack(signatures):
            raise ConfigError("the server's model metadata has no signature_def", "give --input-name and --input-shape")
        if signature not in signatures.signature_def:
            known = ", ".join(sorted(signatures.signature_def)) or "none"
            raise ConfigError(f"the model has no signature {signature!r}", f"use --signature with one of: {known}")
        specs = []
        for alias, info in sorted(signatures.signature_def[signature].inputs.items()):
            dtype = tensor_codec.numpy_dtype_for_tf(info.dtype)
            dims = () if info.tensor_shape.unknown_rank else tuple(int(d.size) for d in info.tensor_shape.dim)
            specs.append(InputSpec(alias, dtype, dims))
        return specs

    def predict_request(
        self, model: str, version: int | None, signature: str, feeds: Mapping[str, npt.NDArray[Any]]
    ) -> bytes:
        request = self._protos.predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, model, version)
        request.model_spec.signature_name = signature
        for name, array in feeds.items():
            request.inputs[name].CopyFrom(tensor_codec.to_tensor_proto(array))
        return bytes(request.SerializeToString())

    def check_response(self, response: bytes) -> None:
        message = self._protos.predict_pb2.PredictResponse.FromString(response)
        if not message.outputs:
            raise ValueError("the Predict response has no outputs")


class KServeWire:
    """KServe v2's ``GRPCInferenceService`` (protos from ``tritonclient.grpc``)."""

    metadata_method = "/inference.GRPCInferenceService/ModelMetadata"
    predict_method = "/inference.GRPCInferenceService/ModelInfer"

    def __init__(self) -> None:
        from tritonclient.grpc import service_pb2

        self._pb = service_pb2

    def metadata_request(self, model: str, version: int | None) -> bytes:
        request = self._pb.ModelMetadataRequest(name=model, version="" if version is None else str(version))
        return bytes(request.SerializeToString())

    def inputs_from_metadata(self, response: bytes, signature: str) -> list[InputSpec]:
        message = self._pb.ModelMetadataResponse.FromString(response)
        specs = []
        for tensor in message.inputs:
            dtype = tensor_codec.numpy_dtype_for_kserve(tensor.datatype)
            specs.append(InputSpec(tensor.name, dtype, tuple(int(d) for d in tensor.shape)))
        return specs

    def predict_request(
        self, model: str, version: int | None, signature: str, feeds: Mapping[str, npt.NDArray[Any]]
    ) -> bytes:
        request = self._pb.ModelInferRequest(model_name=model, model_version="" if version is None else str(version))
        for name, array in feeds.items():
            datatype = tensor_codec.kserve_datatype(array.dtype)
            request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
            request.raw_input_contents.append(tensor_codec.to_kserve_raw(array))
        return bytes(request.SerializeToString())

    def check_response(self, response: bytes) -> None:
        message = self._pb.ModelInferResponse.FromString(response)
        if not message.outputs:
            raise ValueError("the ModelInfer response has no outputs")


def wire_for(protocol: str) -> Wire:
    if protocol == "tfserving":
        return TfServingWire()
    if protocol == "kserve":
        return KServeWire()
    raise ConfigError(f"unknown protocol {protocol!r}", "use tfserving or kserve")
