"""Plumbing shared by the broker's routes: signed requests, roles, JSON errors, metrics.

Every ``/v1`` route but health is an :func:`endpoint`: it reads the raw body, checks the
request signature (``auth.verify_request`` with the store's cached signing keys) and the
caller's role, runs the handler, and turns any error into the contract's JSON error
``{"error", "message", "hint"}``. Refusals are audited before they are answered: a handler
raises :meth:`BrokerContext.refuse`'s ``ApiError``, which carries the audit entry
(``Refusal``), and the endpoint records it (``store.record_refusal``), as it does every
authentication or role refusal.

Two kinds of handler:

- plain functions (the owner and admin API) run in a worker thread, since the store's
  methods block, inside ``store.request_scope``, which records the request's nonce in the
  handler's first write transaction and refuses a replay;
- coroutines (the workload's hot routes, ``routes_release.py``) run on the event loop: they
  do their checks, then await one group commit (``store.commit_async``) holding the
  request's nonce, the outcome and its audit entry. No thread hand-over per request and no
  contention for the GIL between worker threads: that was a third of the broker's CPU per
  key release (docs/performance.md). Database reads on their path are cached
  (``store.py``); a cache miss is read in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias, cast

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from enclaveml.attestation.collateral_source import CollateralSource
from enclaveml.broker._dbapi import WriteBatch
from enclaveml.broker._nonces import RequestNonce
from enclaveml.broker.auth import HEADER_APP, SignedRequest, verify_request
from enclaveml.broker.models import App, IssuedNonce, Role
from enclaveml.broker.store import BrokerStore, ReleaseRefused, ReplayedRequest
from enclaveml.errors import (
    AttestationError,
    AuthError,
    ConfigError,
    EnclaveMLError,
    IntegrityError,
    KeyNotFound,
    KeyServiceError,
    PolicyError,
)

__all__ = [
    "ApiError",
    "AsyncHandler",
    "BrokerContext",
    "Call",
    "Handler",
    "Metrics",
    "Refusal",
    "b64_field",
    "endpoint",
    "error_response",
    "str_field",
]

logger = logging.getLogger("enclaveml.broker")

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class Refusal:
    """The audit entry of a refusal (``store.record_refusal``'s arguments), recorded before the answer."""

    action: str
    actor: str
    subject: str
    reason: str
    now: datetime
    detail: Mapping[str, Any] | None = None
    nonce: IssuedNonce | None = None

    def record(self, store: BrokerStore) -> None:
        store.record_refusal(**self._arguments())

    def job(self, store: BrokerStore) -> Callable[[WriteBatch], None]:
        return store.refusal_job(**self._arguments())

    def _arguments(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "actor": self.actor,
            "subject": self.subject,
            "reason": self.reason,
            "detail": self.detail,
            "now": self.now,
            "nonce": self.nonce,
        }


class ApiError(Exception):
    """An answer other than 2xx: ``status`` and the contract's ``error``/``message``/``hint``.

    ``audit``: the refusal to record before answering (``BrokerContext.refuse``).
    """

    def __init__(self, status: int, error: str, message: str, hint: str = "", *, audit: Refusal | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.hint = status, error, message, hint
        self.audit = audit

    def response(self) -> JSONResponse:
        return error_response(self.status, self.error, self.message, self.hint)


def error_response(status: int, error: str, message: str, hint: str = "") -> JSONResponse:
    return JSONResponse({"error": error, "message": message, "hint": hint}, status_code=status)


class Metrics:
    """Counters and a latency histogram, rendered in the Prometheus text format (0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._refusals: dict[tuple[str, str], int] = {}
        self._releases = 0
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def observe(self, route: str, method: str, status: int, seconds: float, error: str | None = None) -> None:
        with self._lock:
            key = (route, method, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            if error is not None and status in (401, 403, 404, 422):
                refusal = (route, error)
                self._refusals[refusal] = self._refusals.get(refusal, 0) + 1
            if route == "/v1/keys/{name}/release" and status == 200:
                self._releases += 1
            buckets = self._buckets.setdefault(route, [0] * len(_BUCKETS))
            for i, bound in enumerate(_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self._sums[route] = self._sums.get(route, 0.0) + seconds
            self._counts[route] = self._counts.get(route, 0) + 1

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP enclaveml_broker_requests_total HTTP requests answered, by route, method and status.",
                "# TYPE enclaveml_broker_requests_total counter",
            ]
            for (route, method, status), n in sorted(self._requests.items()):
                lines.append(
                    f'enclaveml_broker_requests_total{{route="{route}",method="{method}",status="{status}"}} {n}'
                )
            lines += [
                "# HELP enclaveml_broker_releases_total Keys released to attested workloads.",
                "# TYPE enclaveml_broker_releases_total counter",
                f"enclaveml_broker_releases_total {self._releases}",
                "# HELP enclaveml_broker_refusals_total Requests refused, by route and reason.",
                "# TYPE enclaveml_broker_refusals_total counter",
            ]
            for (route, reason), n in sorted(self._refusals.items()):
                lines.append(f'enclaveml_broker_refusals_total{{route="{route}",reason="{reason}"}} {n}')
            lines += [
                "# HELP enclaveml_broker_request_duration_seconds Time to answer a request.",
                "# TYPE enclaveml_broker_request_duration_seconds histogram",
            ]
            for route in sorted(self._buckets):
                label = f'route="{route}"'
                for bound, n in zip(_BUCKETS, self._buckets[route], strict=True):
                    lines.append(f'enclaveml_broker_request_duration_seconds_bucket{{{label},le="{bound}"}} {n}')
                count = self._counts[route]
                lines.append(f'enclaveml_broker_request_duration_seconds_bucket{{{label},le="+Inf"}} {count}')
                lines.append(f"enclaveml_broker_request_duration_seconds_sum{{{label}}} {self._sums[route]:.6f}")
                lines.append(f"enclaveml_broker_request_duration_seconds_count{{{label}}} {count}")
        return "\n".join(lines) + "\n"


@dataclass
class BrokerContext:
    """What every route needs: the store, the clock, the verifier's settings and the result key."""

    store: BrokerStore
    now_fn: Callable[[], datetime]
    result_key: ec.EllipticCurvePrivateKey
    key_id: str
    sim_trusted_keys: tuple[Ed25519PublicKey, ...] = ()
    collateral: CollateralSource = None
    metrics: Metrics = field(default_factory=Metrics)

    def refuse(
        self,
        action: str,
        caller: str,
        subject: str,
        status: int,
        reason: str,
        message: str,
        hint: str = "",
        *,
        now: datetime,
        detail: Mapping[str, Any] | None = None,
        nonce: IssuedNonce | None = None,
    ) -> ApiError:
        """The error to raise; the endpoint audits ``<action>.refused`` (marking ``nonce`` used with it)
        before it answers."""
        audit = Refusal(action, caller, subject, reason, now, detail, nonce)
        return ApiError(status, reason, message, hint, audit=audit)


@dataclass
class Call:
    """One authenticated request, as a handler sees it."""

    request: Request
    body: bytes
    caller: App
    now: datetime
    request_nonce: RequestNonce | None = None  # coroutine handlers: give it to store.commit_async

    def param(self, name: str) -> str:
        return str(self.request.path_params[name])

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "malformed_request", "the request body is not JSON", "send a JSON object") from None
        if not isinstance(value, dict):
            raise ApiError(400, "malformed_request", "the request body is not a JSON object", "send a JSON object")
        return value


def str_field(body: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    value = body.get(name, "" if not required else None)
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, "malformed_request", f"field {name!r} must be a non-empty string", "see docs/broker-api.md")
    return value


def b64_field(body: Mapping[str, Any], name: str, *, size: int | None = None, required: bool = True) -> bytes:
    text = str_field(body, name, required=required)
    try:
        value = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "malformed_request", f"field {name!r} is not standard base64", "encode it") from None
    if size is not None and len(value) != size:
        raise ApiError(400, "malformed_request", f"field {name!r} must hold {size} bytes, not {len(value)}")
    return value


def _auth_reason(exc: AuthError) -> str:
    what = exc.what
    if "not signed" in what:
        return "missing_signature"
    if "malformed" in what:
        return "malformed_signature"
    if "timestamp" in what:
        return "expired_timestamp"
    if "replayed" in what:
        return "replayed_request"
    return "invalid_signature"


def _signed_path(request: Request) -> str:
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else request.url.path
    path = path.split("?", 1)[0]
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def authenticate(
    ctx: BrokerContext, request: Request, body: bytes, now: datetime, roles: Collection[Role]
) -> tuple[App, SignedRequest]:
    """The caller, after its signature and role; its nonce is left to ``store.request_scope``."""
    path = _signed_path(request)
    claimed = request.headers.get(HEADER_APP, "") or "anonymous"
    try:
        signed = verify_request(
            request.headers,
            request.method,
            path,
            body,
            now=now,
            lookup_key=ctx.store.signing_key_for,
            remember_nonce=None,
        )
    except AuthError as exc:
        reason = _auth_reason(exc)
        detail = {"method": request.method, "path": path[:200]}
        raise ctx.refuse("auth", claimed, claimed, 401, reason, exc.what, exc.hint, now=now, detail=detail) from None
    app = ctx.store.find_app(signed.app_id)
    if app is None or app.disabled:  # removed between the two reads
        raise ctx.refuse("auth", claimed, claimed, 401, "invalid_signature", "unknown or disabled app", now=now)
    if app.role not in roles:
        wanted = " or ".join(sorted(str(r) for r in roles))
        raise ctx.refuse(
            "authz",
            app.app_id,
            path[:200],
            403,
            "forbidden_role",
            f"{request.method} {request.url.path} needs the {wanted} role; app {app.name} is {app.role}",
            "use credentials of an app enrolled with that role",
            now=now,
            detail={"role": str(app.role), "method": request.method},
        )
    return app, signed


def api_error_for(exc: EnclaveMLError) -> ApiError:
    """Store and verifier errors a handler did not catch, as contract errors."""
    if isinstance(exc, AuthError):
        return ApiError(401, "unauthorized", exc.what, exc.hint)
    if isinstance(exc, KeyNotFound):
        return ApiError(404, "unknown_key", exc.what, exc.hint)
    if isinstance(exc, ReleaseRefused):
        return ApiError(403, exc.reason, exc.what, exc.hint)
    if isinstance(exc, AttestationError):
        return ApiError(422, exc.reason, exc.what, exc.hint)
    if isinstance(exc, PolicyError):
        if exc.what.startswith("no policy"):
            return ApiError(404, "unknown_policy", exc.what, exc.hint)
        return ApiError(400, "invalid_policy", exc.what, exc.hint)
    if isinstance(exc, IntegrityError):
        return ApiError(400, "integrity_failed", exc.what, exc.hint)
    if isinstance(exc, ConfigError):
        if "already" in exc.what:
            return ApiError(409, "exists", exc.what, exc.hint)
        return ApiError(400, "bad_request", exc.what, exc.hint)
    if isinstance(exc, KeyServiceError):
        return ApiError(503, "store_unavailable", exc.what, exc.hint)
    return ApiError(500, "internal_error", exc.what, exc.hint)


Result: TypeAlias = "dict[str, Any] | list[Any] | tuple[int, dict[str, Any]]"
Handler = Callable[[BrokerContext, Call], Result]
AsyncHandler = Callable[[BrokerContext, Call], Awaitable[Result]]


def _answer(result: Any) -> Response:
    status, payload = result if isinstance(result, tuple) else (200, result)
    return JSONResponse(payload, status_code=status)


def _replayed(ctx: BrokerContext, request: Request, caller: App, exc: ReplayedRequest, now: datetime) -> ApiError:
    detail = {"method": request.method, "path": _signed_path(request)[:200]}
    actor = caller.app_id
    return ctx.refuse("auth", actor, actor, 401, "replayed_request", exc.what, exc.hint, now=now, detail=detail)


def _error_answer(exc: Exception, request: Request) -> Response:
    if isinstance(exc, ApiError):
        return exc.response()
    if isinstance(exc, EnclaveMLError):
        return api_error_for(exc).response()
    logger.error("broker: internal error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error", "see the broker's log")


def _run(ctx: BrokerContext, request: Request, body: bytes, roles: Collection[Role], handler: Handler) -> Response:
    """A plain handler, in a worker thread (module docstring)."""
    now = ctx.now_fn()
    caller: App | None = None
    try:
        caller, signed = authenticate(ctx, request, body, now, roles)
        with ctx.store.request_scope(signed.app_id, signed.nonce, signed.expires):
            try:
                result = handler(ctx, Call(request, body, caller, now))
            except ApiError as exc:
                audit, exc.audit = exc.audit, None
                if audit is not None:  # in the scope: the request's nonce goes in with it
                    audit.record(ctx.store)
                raise
    except ReplayedRequest as exc:
        assert caller is not None
        refusal = _replayed(ctx, request, caller, exc, now)
        return _recorded(ctx, refusal).response()
    except ApiError as exc:
        return _recorded(ctx, exc).response()
    except Exception as exc:
        return _error_answer(exc, request)
    return _answer(result)


def _recorded(ctx: BrokerContext, exc: ApiError) -> ApiError:
    """``exc`` once its refusal (if not recorded yet) is in the audit log."""
    if exc.audit is not None:
        audit, exc.audit = exc.audit, None
        audit.record(ctx.store)
    return exc


async def _run_async(
    ctx: BrokerContext, request: Request, body: bytes, roles: Collection[Role], handler: AsyncHandler
) -> Response:
    """A coroutine handler, on the event loop (module docstring)."""
    now = ctx.now_fn()
    caller: App | None = None
    try:
        claimed = request.headers.get(HEADER_APP, "")
        if claimed and not ctx.store.app_is_cached(claimed):  # read it in a thread, not on the loop
            await run_in_threadpool(ctx.store.find_app, claimed)
        caller, signed = authenticate(ctx, request, body, now, roles)
        nonce = ctx.store.request_nonce(signed.app_id, signed.nonce, signed.expires)
        try:
            result = await handler(ctx, Call(request, body, caller, now, nonce))
        except ApiError as exc:
            audit, exc.audit = exc.audit, None
            if audit is not None:  # with the request's nonce, if not recorded yet
                await ctx.store.commit_async(audit.job(ctx.store), nonce)
            elif not nonce.recorded:
                await ctx.store.commit_async(_nothing, nonce)
            raise
        except Exception:
            if not nonce.recorded and not nonce.replayed:
                await ctx.store.commit_async(_nothing, nonce)
            raise
        if not nonce.recorded:  # a handler that committed nothing
            await ctx.store.commit_async(_nothing, nonce)
    except ReplayedRequest as exc:
        assert caller is not None
        refusal = _replayed(ctx, request, caller, exc, now)
        return (await _recorded_async(ctx, refusal)).response()
    except ApiError as exc:
        return (await _recorded_async(ctx, exc)).response()
    except Exception as exc:
        return _error_answer(exc, request)
    return _answer(result)


def _nothing(batch: WriteBatch) -> None:
    """A job that only carries the request's nonce."""


async def _recorded_async(ctx: BrokerContext, exc: ApiError) -> ApiError:
    if exc.audit is not None:
        audit, exc.audit = exc.audit, None
        await ctx.store.commit_async(audit.job(ctx.store))
    return exc


def endpoint(
    ctx: BrokerContext, route: str, roles: Collection[Role], handler: Handler | AsyncHandler
) -> Callable[[Request], Awaitable[Response]]:
    """An ASGI endpoint: signed request, role check, the handler (module docstring), metrics."""
    if inspect.iscoroutinefunction(handler):
        on_loop = cast(AsyncHandler, handler)

        async def dispatch(request: Request, body: bytes) -> Response:
            return await _run_async(ctx, request, body, roles, on_loop)
    else:
        in_thread = cast(Handler, handler)

        async def dispatch(request: Request, body: bytes) -> Response:
            return await run_in_threadpool(_run, ctx, request, body, roles, in_thread)

    async def run(request: Request) -> Response:
        started = time.perf_counter()
        response = await dispatch(request, await request.body())
        error = None
        if response.status_code >= 400 and isinstance(response, JSONResponse):
            error = str(json.loads(bytes(response.body)).get("error", ""))
        ctx.metrics.observe(route, request.method, response.status_code, time.perf_counter() - started, error)
        return response

    return run
