"""KServe v2 / Open Inference Protocol over gRPC: the ``inference.GRPCInferenceService`` methods it defines.

The protos are the ones ``tritonclient`` ships (``tritonclient.grpc.service_pb2``): Triton's
``GRPCInferenceService`` is the Open Inference Protocol's service plus Triton extensions.
Served here are exactly the protocol's methods:

=================  ========================================================================
method             answer
=================  ========================================================================
ServerLive         ``live: true`` while the process serves
ServerReady        ``ready``: keys and every model loaded (``Inference.not_ready_reason``)
ModelReady         ``ready`` of one model (version); ``NOT_FOUND`` for an unknown model
ServerMetadata     name ``enclaveml``, its version, no extensions
ModelMetadata      versions available, platform ``onnxruntime_onnx``, inputs and outputs
                   with KServe datatypes and shapes (``-1`` = any size)
ModelInfer         inputs from ``raw_input_contents`` (when present, one entry per input, in
                   order) or each input's ``contents``; outputs in ``raw_output_contents``
                   (what Triton answers and ``tritonclient`` reads), the requested ones or all
=================  ========================================================================

Triton's extensions (ModelStreamInfer, repository, shared memory, statistics, trace, log
settings) get ``UNIMPLEMENTED`` from gRPC itself: no handler is registered for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from tritonclient.grpc import service_pb2

from enclaveml._version import __version__
from enclaveml.errors import ConfigError
from enclaveml.serving.errors import InvalidRequest, ModelNotFound, ModelNotReady, RequestTooLarge
from enclaveml.serving.tensor_codec import (
    from_kserve_contents,
    from_kserve_raw,
    kserve_datatype,
    to_kserve_raw,
)
from enclaveml.serving.tfserving_grpc import unary_handler

if TYPE_CHECKING:
    from enclaveml.serving.inference import Inference
    from enclaveml.serving.runtime import Array, TensorInfo

__all__ = ["KSERVE_SERVICE", "PLATFORM", "SERVER_NAME", "KServeServicer", "parse_version"]

KSERVE_SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "enclaveml"
PLATFORM = "onnxruntime_onnx"


def parse_version(name: str, version: str) -> int | None:
    """A KServe version string ("" = the newest) → our integer version; anything else is ``NOT_FOUND``."""
    if not version:
        return None
    if not version.isdigit():
        raise ModelNotFound(f"model {name!r} has no version {version!r}", "versions are numbers")
    return int(version)


class KServeServicer:
    """The KServe v2 gRPC methods over one ``Inference`` (see the module docstring)."""

    def __init__(self, inference: Inference) -> None:
        self._inference = inference

    def handlers(self) -> list[Any]:
        methods = {
            "ServerLive": (self.server_live, service_pb2.ServerLiveRequest, service_pb2.ServerLiveResponse),
            "ServerReady": (self.server_ready, service_pb2.ServerReadyRequest, service_pb2.ServerReadyResponse),
            "ModelReady": (self.model_ready, service_pb2.ModelReadyRequest, service_pb2.ModelReadyResponse),
            "ServerMetadata": (
                self.server_metadata,
                service_pb2.ServerMetadataRequest,
                service_pb2.ServerMetadataResponse,
            ),
            "ModelMetadata": (
                self.model_metadata,
                service_pb2.ModelMetadataRequest,
                service_pb2.ModelMetadataResponse,
            ),
            "ModelInfer": (self.model_infer, service_pb2.ModelInferRequest, service_pb2.ModelInferResponse),
        }
        handlers = {name: unary_handler(*parts) for name, parts in methods.items()}
        return [grpc.method_handlers_generic_handler(KSERVE_SERVICE, handlers)]

    def server_live(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def server_ready(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self._inference.not_ready_reason() is None)

    def model_ready(self, request: Any, context: Any) -> Any:
        try:
            self._inference.model(request.name, parse_version(request.name, request.version))
        except ModelNotReady:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    def server_metadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=__version__)

    def model_metadata(self, request: Any, context: Any) -> Any:
        served = self._inference.model(request.name, parse_version(request.name, request.version))
        response = service_pb2.ModelMetadataResponse(
            name=served.name, versions=self._inference.available_versions(served.name), platform=PLATFORM
        )
        response.inputs.extend(_tensor_metadata(t) for t in served.runtime.inputs)
        response.outputs.extend(_tensor_metadata(t) for t in served.runtime.outputs)
        return response

    def model_infer(self, request: Any, context: Any) -> Any:
        with self._inference.measure(request.model_name, "kserve-grpc"):
            served = self._inference.model(request.model_name, parse_version(request.model_name, request.model_version))
            feeds = _feeds(request, self._inference.max_request_bytes)
            wanted = [o.name for o in request.outputs] or None
            outputs = self._inference.run_blocking(served, feeds, wanted)
        response = service_pb2.ModelInferResponse(
            model_name=served.name, model_version=str(served.version), id=request.id
        )
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype=kserve_datatype(array.dtype), shape=list(array.shape))
            response.raw_output_contents.append(to_kserve_raw(array))
        return response


def _feeds(request: Any, limit: int) -> dict[str, Array]:
    """The inputs of a ``ModelInferRequest``: all from ``raw_input_contents``, or all from ``contents``."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs",
            "give raw contents for every input, or for none",
        )
    feeds: dict[str, Array] = {}
    total = 0
    for index, tensor in enumerate(request.inputs):
        if tensor.name in feeds:
            raise InvalidRequest(f"input {tensor.name!r} is given twice")
        shape = list(tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input {tensor.name!r} has both contents and raw_input_contents")
            array = from_kserve_raw(tensor.name, tensor.datatype, shape, raw[index], max_bytes=limit)
        else:
            array = from_kserve_contents(tensor.name, tensor.datatype, shape, tensor.contents, max_bytes=limit)
        feeds[tensor.name] = array
        total += array.nbytes
        if total > limit:
            raise RequestTooLarge(f"the inputs decode to more than {limit} bytes")
    return feeds


def _tensor_metadata(info: TensorInfo) -> Any:
    try:
        datatype = kserve_datatype(info.dtype)
    except InvalidRequest as exc:  # the model loaded, so its dtypes are ones the runtime accepts
        raise ConfigError(str(exc)) from None
    return service_pb2.ModelMetadataResponse.TensorMetadata(name=info.name, datatype=datatype, shape=list(info.shape))
