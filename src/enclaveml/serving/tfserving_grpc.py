"""TensorFlow Serving's gRPC API: ``PredictionService`` (Predict, GetModelMetadata) and ``ModelService.GetModelStatus``.

An unchanged ``tensorflow-serving-api`` client (``PredictionServiceStub``,
``tf.make_tensor_proto``, ``tf.make_ndarray``) talks to this server as to TF Serving:

- ``Predict``: ``model_spec.name``; optional ``version`` or ``version_label`` (no labels are
  defined, so any label is ``NOT_FOUND``); ``signature_name`` empty or ``serving_default``
  (``INVALID_ARGUMENT`` otherwise); ``inputs`` as TensorProtos (``tensor_codec``);
  ``output_filter`` picks outputs. The answer echoes ``model_spec`` with the version served.
- ``GetModelMetadata`` with ``metadata_field: "signature_def"``: one ``serving_default``
  ``SignatureDef`` (method ``tensorflow/serving/predict``) whose ``TensorInfo`` carry each
  input's and output's dtype and shape (``-1`` = any size), packed in ``google.protobuf.Any``.
- ``GetModelStatus``: every version with its state in TF Serving's numbering (AVAILABLE = 30)
  and, for a version that failed to load, ``status.error_message`` saying why.

Classify, Regress and MultiInference are not served: gRPC answers ``UNIMPLEMENTED`` for
any method no handler is registered for. Handlers are registered by full method name with
``grpc.method_handlers_generic_handler`` (``_tf_protos`` says why ``model_service_pb2_grpc``
cannot be imported). Errors become gRPC statuses through ``errors.status_of`` only.

The handlers are synchronous: they run in the thread pool of a ``grpc.server`` (``server.py``
says why not ``grpc.aio``) and call ``Inference.run_blocking``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import any_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from enclaveml.serving._tf_protos import error_codes_pb2, get_model_metadata_pb2, get_model_status_pb2, predict_pb2
from enclaveml.serving.errors import InvalidRequest, ModelNotFound, RequestTooLarge, status_of
from enclaveml.serving.tensor_codec import fill_tensor_proto, from_tensor_proto, tf_dtype

if TYPE_CHECKING:
    from enclaveml.serving.inference import Inference
    from enclaveml.serving.runtime import TensorInfo

__all__ = [
    "MODEL_SERVICE",
    "PREDICTION_SERVICE",
    "SERVING_DEFAULT",
    "TfServingServicer",
    "abort_with",
    "model_status_response",
    "served_spec",
    "signature_def_map",
    "unary_handler",
]

logger = logging.getLogger("enclaveml.serving")

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
SERVING_DEFAULT = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_DEF_FIELD = "signature_def"

Handler = Callable[[Any, Any], Any]


def abort_with(context: Any, exc: BaseException) -> NoReturn:
    """End the call with the status ``errors.status_of`` gives ``exc``; server faults keep their details in the log."""
    code_name, _http = status_of(exc)
    if code_name == "INTERNAL":
        logger.exception("request failed", exc_info=exc)
        message = "internal error (the server log has the details)"
    else:
        message = str(exc)
    context.abort(getattr(grpc.StatusCode, code_name), message)
    raise AssertionError("unreachable: grpc's abort raises")  # pragma: no cover


def unary_handler(method: Handler, request_type: Any, response_type: Any) -> Any:
    """A unary handler (``grpc.server``'s threads) that maps every exception ``method`` raises to a status."""

    def call(request: Any, context: Any) -> Any:
        try:
            return method(request, context)
        except Exception as exc:  # every failure becomes one status; abort raises to end the call
            abort_with(context, exc)

    return grpc.unary_unary_rpc_method_handler(
        call, request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString
    )


class TfServingServicer:
    """The TF Serving methods over one ``Inference`` (the request path ``server.py`` shares)."""

    def __init__(self, inference: Inference) -> None:
        self._inference = inference

    def handlers(self) -> list[Any]:
        """Generic handlers for ``grpc.Server.add_generic_rpc_handlers``."""
        prediction = {
            "Predict": unary_handler(self.predict, predict_pb2.PredictRequest, predict_pb2.PredictResponse),
            "GetModelMetadata": unary_handler(
                self.get_model_metadata,
                get_model_metadata_pb2.GetModelMetadataRequest,
                get_model_metadata_pb2.GetModelMetadataResponse,
            ),
        }
        status = {
            "GetModelStatus": unary_handler(
                self.get_model_status,
                get_model_status_pb2.GetModelStatusRequest,
                get_model_status_pb2.GetModelStatusResponse,
            )
        }
        return [
            grpc.method_handlers_generic_handler(PREDICTION_SERVICE, prediction),
            grpc.method_handlers_generic_handler(MODEL_SERVICE, status),
        ]

    # -- methods ---------------------------------------------------------------------------

    def predict(self, request: Any, context: Any) -> Any:
        spec = request.model_spec
        with self._inference.measure(spec.name, "tfserving-grpc"):
            served = self._inference.model(_model_name(spec), _version(spec))
            if spec.signature_name not in ("", SERVING_DEFAULT):
                raise InvalidRequest(
                    f"model {served.name!r} has no signature {spec.signature_name!r}", f"use {SERVING_DEFAULT!r}"
                )
            limit = self._inference.max_request_bytes
            feeds = {}
            total = 0
            for name, proto in request.inputs.items():
                feeds[name] = from_tensor_proto(name, proto, max_bytes=limit)
                total += feeds[name].nbytes
                if total > limit:
                    raise RequestTooLarge(f"the inputs decode to more than {limit} bytes")
            outputs = self._inference.run_blocking(served, feeds, list(request.output_filter) or None)
        response = predict_pb2.PredictResponse()
        served_spec(response.model_spec, served.name, served.version)
        for name, array in outputs.items():
            fill_tensor_proto(response.outputs[name], array)
        return response

    def get_model_metadata(self, request: Any, context: Any) -> Any:
        spec = request.model_spec
        served = self._inference.model(_model_name(spec), _version(spec))
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidRequest(
                "GetModelMetadataRequest must name at least one metadata_field", "ask for signature_def"
            )
        unsupported = [f for f in fields if f != SIGNATURE_DEF_FIELD]
        if unsupported:
            raise InvalidRequest(f"metadata field {unsupported[0]!r} is not supported", "ask for signature_def")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        served_spec(response.model_spec, served.name, served.version)
        packed = any_pb2.Any()
        packed.Pack(signature_def_map(served.runtime.inputs, served.runtime.outputs))
        response.metadata[SIGNATURE_DEF_FIELD].CopyFrom(packed)
        return response

    def get_model_status(self, request: Any, context: Any) -> Any:
        spec = request.model_spec
        return model_status_response(self._inference, _model_name(spec), _version(spec))


# -- messages ----------------------------------------------------------------------------------


def _model_name(spec: Any) -> str:
    if not spec.name:
        raise InvalidRequest("model_spec.name is empty", "name the model to call")
    return str(spec.name)


def _version(spec: Any) -> int | None:
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return int(spec.version.value)
    if which == "version_label":
        raise ModelNotFound(
            f"model {spec.name!r} has no version label {spec.version_label!r}",
            "ask by version number, or for the newest",
        )
    return None


def served_spec(spec: Any, name: str, version: int) -> None:
    spec.name = name
    spec.version.value = version
    spec.signature_name = SERVING_DEFAULT


def _tensor_info(info: TensorInfo) -> Any:
    tensor = meta_graph_pb2.TensorInfo(name=info.name, dtype=tf_dtype(info.dtype))
    for dim in info.shape:
        tensor.tensor_shape.dim.add(size=dim)
    return tensor


def signature_def_map(inputs: tuple[TensorInfo, ...], outputs: tuple[TensorInfo, ...]) -> Any:
    """The ``SignatureDefMap`` of a model: one ``serving_default`` predict signature."""
    signatures = get_model_metadata_pb2.SignatureDefMap()
    signature = signatures.signature_def[SERVING_DEFAULT]
    signature.method_name = PREDICT_METHOD
    for info in inputs:
        signature.inputs[info.name].CopyFrom(_tensor_info(info))
    for info in outputs:
        signature.outputs[info.name].CopyFrom(_tensor_info(info))
    return signatures


def model_status_response(inference: Inference, name: str, version: int | None) -> Any:
    """``GetModelStatusResponse`` for ``name`` (one ``version``, or all): state and why a load failed."""
    statuses = inference.status(name)
    if version is not None:
        statuses = [s for s in statuses if s.version == version]
        if not statuses:
            raise ModelNotFound(f"model {name!r} has no version {version}")
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in statuses:
        entry = response.model_version_status.add(version=status.version)
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(status.state.name)
        entry.status.error_code = error_codes_pb2.UNKNOWN if status.error else error_codes_pb2.OK
        entry.status.error_message = status.error or ""
    return response
