"""The REST frontend: KServe v2 (Open Inference Protocol) and TF Serving's REST API, health and metrics.

A Starlette app over one ``Inference`` (the request path ``server.py`` shares with gRPC):

==============================================  =============================================
route                                           answer
==============================================  =============================================
``GET  /v2/health/live``                        200 ``{"live": true}``
``GET  /v2/health/ready``                       200 ``{"ready": true}``, or 503 with ``error``
                                                saying why (keys or a model not loaded yet)
``GET  /v2``                                    server metadata (name, version, extensions)
``GET  /v2/models/{m}[/versions/{v}]``          model metadata: versions, platform, tensors
``GET  /v2/models/{m}[/versions/{v}]/ready``    200 ready, 503 not ready, 404 unknown
``POST /v2/models/{m}[/versions/{v}]/infer``    KServe JSON tensors; the binary tensor
                                                extension (``Inference-Header-Content-Length``)
``GET  /v1/models/{m}[/versions/{v}]``          TF Serving model status
``GET  /v1/models/{m}[/versions/{v}]/metadata`` TF Serving signature_def metadata
``POST /v1/models/{m}[/versions/{v}]:predict``  ``{"instances": ...}`` or ``{"inputs": ...}``
``GET  /metrics``                               Prometheus text
==============================================  =============================================

Errors are ``{"error": "<message>"}`` with the HTTP status ``errors.status_of`` gives (as
KServe and TF Serving answer). A body longer than ``max_request_bytes`` is refused with 413
before it is read to the end. With several worker processes every answer carries an
``enclaveml-worker`` header naming the worker (its index, not its pid).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enclaveml._version import __version__
from enclaveml.serving.errors import InvalidRequest, ModelNotReady, RequestTooLarge, status_of
from enclaveml.serving.kserve_grpc import PLATFORM, SERVER_NAME, parse_version
from enclaveml.serving.tensor_codec import (
    from_json_data,
    from_kserve_raw,
    from_tf_rest,
    kserve_datatype,
    to_json_data,
    to_kserve_raw,
    to_tf_rest,
)
from enclaveml.serving.tfserving_grpc import (
    SERVING_DEFAULT,
    model_status_response,
    served_spec,
    signature_def_map,
)

if TYPE_CHECKING:
    from enclaveml.serving.inference import Inference

__all__ = ["BINARY_HEADER", "WORKER_HEADER", "create_app", "served_spec_json"]

logger = logging.getLogger("enclaveml.serving")

BINARY_HEADER = "Inference-Header-Content-Length"
WORKER_HEADER = b"enclaveml-worker"
EXTENSIONS = ["binary_tensor_data"]
Endpoint = Callable[[Request], Awaitable[Response]]


def _error(exc: BaseException) -> JSONResponse:
    _code, status = status_of(exc)
    if status == 500:
        logger.exception("request failed", exc_info=exc)
        return JSONResponse({"error": "internal error (the server log has the details)"}, status_code=500)
    return JSONResponse({"error": str(exc)}, status_code=status)


def _json(payload: Any, status_code: int = 200) -> Response:
    # A model output holding NaN or an infinity is written as NaN / Infinity (Python's json);
    # strict JSON parsers refuse those, which is better than a silently changed value.
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, status_code=status_code, media_type="application/json")


def _guarded(endpoint: Endpoint) -> Endpoint:
    """Every exception an endpoint raises becomes ``{"error": ...}`` with its status."""

    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:  # one mapping for all: errors.status_of
            return _error(exc)

    return run


def _version_of(request: Request) -> int | None:
    name = request.path_params["name"]
    return parse_version(name, request.path_params.get("version", ""))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"the request body is {declared} bytes, over the server's limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the request body is over the server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return parsed


class _Routes:
    def __init__(self, inference: Inference) -> None:
        self.inference = inference

    # -- health and metadata ----------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        reason = self.inference.not_ready_reason()
        if reason is None:
            return _json({"ready": True})
        return _json({"ready": False, "error": reason}, 503)

    async def server_metadata(self, request: Request) -> Response:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        served = self.inference.model(request.path_params["name"], _version_of(request))
        return _json(
            {
                "name": served.name,
                "versions": self.inference.available_versions(served.name),
                "platform": PLATFORM,
                "inputs": [_tensor_json(t) for t in served.runtime.inputs],
                "outputs": [_tensor_json(t) for t in served.runtime.outputs],
            }
        )

    async def model_ready(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            self.inference.model(name, _version_of(request))
        except ModelNotReady as exc:
            return _json({"name": name, "ready": False, "error": str(exc)}, 503)
        return _json({"name": name, "ready": True})

    # -- KServe v2 infer ----------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        with self.inference.measure(request.path_params["name"], "kserve-rest"):
            served = self.inference.model(request.path_params["name"], _version_of(request))
            limit = self.inference.max_request_bytes
            body = await _read_body(request, limit)
            header_length = request.headers.get(BINARY_HEADER)
            if header_length is not None:
                if not header_length.isdigit() or int(header_length) > len(body):
                    raise InvalidRequest(f"{BINARY_HEADER} {header_length!r} does not fit the {len(body)}-byte body")
                payload, binary = _parse_json(body[: int(header_length)]), memoryview(body)[int(header_length) :]
            else:
                payload, binary = _parse_json(body), memoryview(b"")
            feeds = _kserve_inputs(payload.get("inputs"), binary, limit)
            outputs_asked = payload.get("outputs") or []
            if not isinstance(outputs_asked, list) or not all(
                isinstance(o, dict) and "name" in o for o in outputs_asked
            ):
                raise InvalidRequest('"outputs" must be a list of objects with a "name"')
            wanted = [str(o["name"]) for o in outputs_asked] or None
            outputs = await self.inference.run(served, feeds, wanted)
        parameters = payload.get("parameters") or {}
        binary_default = bool(parameters.get("binary_data_output", False)) if isinstance(parameters, dict) else False
        as_binary = {str(o["name"]): bool((o.get("parameters") or {}).get("binary_data", False)) for o in outputs_asked}
        answer: dict[str, Any] = {"model_name": served.name, "model_version": str(served.version)}
        if "id" in payload:
            answer["id"] = payload["id"]
        answer["outputs"] = []
        blobs: list[bytes] = []
        for name, array in outputs.items():
            entry: dict[str, Any] = {"name": name, "datatype": kserve_datatype(array.dtype), "shape": list(array.shape)}
            if as_binary.get(name, binary_default):
                blob = to_kserve_raw(array)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = to_json_data(array)
            answer["outputs"].append(entry)
        header = json.dumps(answer, separators=(",", ":")).encode()
        if not blobs:
            return Response(header, media_type="application/json")
        return Response(
            b"".join([header, *blobs]),
            media_type="application/octet-stream",
            headers={BINARY_HEADER: str(len(header))},
        )

    # -- TF Serving REST ----------------------------------------------------------------------

    async def tf_status(self, request: Request) -> Response:
        response = model_status_response(self.inference, request.path_params["name"], _version_of(request))
        return _json(_proto_json(response))

    async def tf_metadata(self, request: Request) -> Response:
        served = self.inference.model(request.path_params["name"], _version_of(request))
        spec = served_spec_json(served.name, served.version)
        signatures = signature_def_map(served.runtime.inputs, served.runtime.outputs)
        return _json({"model_spec": spec, "metadata": {"signature_def": _proto_json(signatures)}})

    async def tf_predict(self, request: Request) -> Response:
        with self.inference.measure(request.path_params["name"], "tfserving-rest"):
            served = self.inference.model(request.path_params["name"], _version_of(request))
            limit = self.inference.max_request_bytes
            payload = _parse_json(await _read_body(request, limit))
            signature = payload.get("signature_name", "")
            if signature not in ("", SERVING_DEFAULT):
                raise InvalidRequest(
                    f"model {served.name!r} has no signature {signature!r}", f"use {SERVING_DEFAULT!r}"
                )
            dtypes = {t.name: t.dtype for t in served.runtime.inputs}
            feeds = from_tf_rest(payload, dtypes, max_bytes=limit)
            outputs = await self.inference.run(served, feeds, None)
        return _json(to_tf_rest(outputs, row_format="instances" in payload))

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.inference.metrics_exposition()
        return Response(body, media_type=content_type)


def served_spec_json(name: str, version: int) -> dict[str, Any]:
    from enclaveml.serving._tf_protos import model_pb2

    spec = model_pb2.ModelSpec()
    served_spec(spec, name, version)
    return _proto_json(spec)


def _proto_json(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def _tensor_json(info: Any) -> dict[str, Any]:
    return {"name": info.name, "datatype": kserve_datatype(info.dtype), "shape": list(info.shape)}


def _kserve_inputs(inputs: Any, binary: memoryview, limit: int) -> dict[str, np.ndarray[Any, Any]]:
    """KServe JSON inputs (with binary parts taken in order from ``binary``) → feeds."""
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest('"inputs" must be a non-empty list of tensors')
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    total = 0
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidRequest('every input must be an object with a "name"')
        name = tensor["name"]
        if name in feeds:
            raise InvalidRequest(f"input {name!r} is given twice")
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        if not isinstance(datatype, str) or not isinstance(shape, list):
            raise InvalidRequest(f'input {name!r} needs "datatype" and "shape"')
        parameters = tensor.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidRequest(f"input {name!r}: binary_data_size {size!r} runs past the binary data")
            if not all(isinstance(d, int) for d in shape):
                raise InvalidRequest(f"input {name!r}: shape must be a list of integers")
            feeds[name] = from_kserve_raw(name, datatype, shape, bytes(binary[offset : offset + size]), max_bytes=limit)
            offset += size
        elif "data" in tensor:
            feeds[name] = from_json_data(name, datatype, shape, tensor["data"], max_bytes=limit)
        else:
            raise InvalidRequest(f'input {name!r} has neither "data" nor binary_data_size')
        total += feeds[name].nbytes
        if total > limit:
            raise RequestTooLarge(f"the inputs decode to more than {limit} bytes")
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return feeds


class _WorkerHeader:
    """ASGI middleware: an ``enclaveml-worker`` header on every response (several workers only)."""

    def __init__(self, app: ASGIApp, worker: str) -> None:
        self.app, self.worker = app, worker.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (WORKER_HEADER, self.worker)]
            await send(message)

        await self.app(scope, receive, send_with_header)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return _json({"error": f"{request.method} {request.url.path}: {detail}"}, status)


def create_app(inference: Inference, *, worker: str | None = None) -> ASGIApp:
    """The REST app (routes in the module docstring); ``worker`` adds the ``enclaveml-worker`` header."""
    r = _Routes(inference)
    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    tf_model = "/v1/models/{name}"
    tf_version = "/v1/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", _guarded(r.live)),
        Route("/v2/health/ready", _guarded(r.ready)),
        Route("/v2", _guarded(r.server_metadata)),
        Route("/metrics", _guarded(r.metrics)),
    ]
    for prefix in (model, version):
        routes += [
            Route(prefix, _guarded(r.model_metadata)),
            Route(prefix + "/ready", _guarded(r.model_ready)),
            Route(prefix + "/infer", _guarded(r.infer), methods=["POST"]),
        ]
    for prefix in (tf_model, tf_version):
        routes += [
            Route(prefix, _guarded(r.tf_status)),
            Route(prefix + "/metadata", _guarded(r.tf_metadata)),
            Route(prefix + ":predict", _guarded(r.tf_predict), methods=["POST"]),
        ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    return app if worker is None else _WorkerHeader(app, worker)
