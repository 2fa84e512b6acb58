"""Request errors of the model server, each carrying the status both frontends answer with.

::

    ConfigError (enclaveml.errors)
    └── RequestError                 grpc_code      http_status
        ├── InvalidRequest           INVALID_ARGUMENT   400   malformed tensor, wrong dtype / shape, unknown input
        ├── RequestTooLarge          RESOURCE_EXHAUSTED 413   the request exceeds the server's size limit
        ├── ModelNotFound            NOT_FOUND          404   no such model, or no such version loaded
        └── ModelNotReady            UNAVAILABLE        503   the model exists but no version is available (yet)

The gRPC frontend (TF Serving ``PredictionService``, KServe v2) and the REST frontend map an
exception to their status in one place, :func:`status_of`, instead of each keeping a table:
a ``RequestError`` answers its own codes; any other enclaveml error or exception is a server
fault (``INTERNAL`` / 500) whose details stay in the server's log.

Like every enclaveml error, messages name inputs, dtypes, shapes and sizes, never tensor
values or key material: a message may be returned to any client.
"""

from __future__ import annotations

from enclaveml.errors import ConfigError

__all__ = [
    "InvalidRequest",
    "ModelNotFound",
    "ModelNotReady",
    "RequestError",
    "RequestTooLarge",
    "status_of",
]


class RequestError(ConfigError):
    """A request the server refuses; ``grpc_code`` (a ``grpc.StatusCode`` name) and ``http_status`` say how."""

    grpc_code = "UNKNOWN"
    http_status = 500
    default_hint = "check the request against the model's metadata"


class InvalidRequest(RequestError):
    """Malformed tensor, wrong dtype or shape, unknown or missing input (TF Serving: INVALID_ARGUMENT)."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class RequestTooLarge(RequestError):
    """The request (or one tensor in it) exceeds the server's ``max_request_bytes``."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 413
    default_hint = "send fewer rows per request, or raise the server's --max-request-bytes"


class ModelNotFound(RequestError):
    """No model of that name is served, or the version asked for is not loaded."""

    grpc_code = "NOT_FOUND"
    http_status = 404
    default_hint = "the model's metadata endpoint lists the served models and versions"


class ModelNotReady(RequestError):
    """The model is configured but has no AVAILABLE version: still loading, or every load failed."""

    grpc_code = "UNAVAILABLE"
    http_status = 503
    default_hint = "the server's readiness endpoint and log say why the model did not load"


def status_of(exc: BaseException) -> tuple[str, int]:
    """``(grpc code name, HTTP status)`` for ``exc``: its own for a ``RequestError``, else ``INTERNAL`` / 500."""
    if isinstance(exc, RequestError):
        return exc.grpc_code, exc.http_status
    return "INTERNAL", 500
