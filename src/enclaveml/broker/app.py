"""The key broker's HTTP API (v1) as a Starlette application; the contract is docs/broker-api.md.

``create_app(store, now_fn=...)`` wires the routes of ``routes_kms.py`` (admin and owner:
enrollment, keys, wraps, policies) and ``routes_release.py`` (workload: nonce, attest,
release) behind signed-request authentication (``_http.py``), plus the unauthenticated
``/v1/health``, ``/metrics`` (Prometheus text), ``/openapi.json`` and
``/.well-known/jwks.json`` (the ES256 key that signs attestation results).

``sim_trusted_keys``: simulation public keys whose evidence is accepted; empty or None
accepts simulated evidence from any signer (the measurement is what a policy checks; the
answer says ``insecure``). Simulated evidence is accepted only by a policy with
``allow_simulation = true`` in any case. ``collateral`` verifies DCAP quotes.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from enclaveml._version import __version__
from enclaveml.attestation.collateral_source import CollateralSource
from enclaveml.broker._http import BrokerContext, error_response
from enclaveml.broker.routes_kms import kms_routes
from enclaveml.broker.routes_release import release_routes
from enclaveml.broker.self_attestation import BROKER_EVIDENCE_PATH, CHALLENGE_SIZE, SelfEvidence, broker_binding
from enclaveml.broker.store import BrokerStore

__all__ = ["OPENAPI_ROUTES", "create_app", "jwks_for", "openapi_document", "self_attestation_route"]

# (method, path, role, summary): the OpenAPI document is written from this table.
OPENAPI_ROUTES: tuple[tuple[str, str, str | None, str], ...] = (
    ("GET", "/v1/health", None, "Liveness and version"),
    ("GET", "/metrics", None, "Prometheus metrics (text format)"),
    ("GET", "/.well-known/jwks.json", None, "ES256 keys that sign attestation results"),
    ("GET", "/v1/broker/evidence", None, "The broker's own evidence for ?challenge= (only with --attest-self)"),
    ("POST", "/v1/apps", "admin", "Enroll an app; answers its api key once"),
    ("POST", "/v1/keys", "owner", "Create a primary key"),
    ("GET", "/v1/keys", "owner", "List primary keys"),
    ("GET", "/v1/keys/{name}", "owner", "Describe a primary key"),
    ("POST", "/v1/keys/{name}/rotate", "owner", "Add a key version"),
    ("POST", "/v1/keys/{name}/wrap", "owner", "Wrap a data key with the primary version"),
    ("POST", "/v1/keys/unwrap", "owner", "Unwrap a data key"),
    ("POST", "/v1/policies", "owner", "Register a policy (TOML) and the keys it may receive"),
    ("GET", "/v1/policies", "owner", "List policies"),
    ("POST", "/v1/policies/{policy_id}/revoke", "owner", "Revoke a policy"),
    ("GET", "/v1/nonce", "workload", "A single-use attestation nonce (5 min)"),
    ("POST", "/v1/attest", "workload", "Verify evidence; answers claims and an ES256 attestation-result JWT"),
    ("POST", "/v1/keys/{name}/release", "workload", "Release a key, HPKE-sealed to an attested public key"),
)
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "message", "hint"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}, "hint": {"type": "string"}},
}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, role, summary in OPENAPI_ROUTES:
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "success"},
                "default": {
                    "description": "error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                },
            },
        }
        if role is not None:
            operation["security"] = [{"signedRequest": []}]
            operation["x-enclaveml-role"] = role
        params = [part[1:-1] for part in path.split("/") if part.startswith("{")]
        if params:
            operation["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
            ]
        if method == "POST":
            operation["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "enclaveml key broker",
            "version": __version__,
            "description": "KMS, attestation and key release. Contract: docs/broker-api.md",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR_SCHEMA},
            "securitySchemes": {
                "signedRequest": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Enclaveml-Signature",
                    "description": "HMAC-SHA256 request signature with X-Enclaveml-App/-Timestamp/-Nonce",
                }
            },
        },
    }


def _key_id(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:16]).decode().rstrip("=")


def jwks_for(key: ec.EllipticCurvePrivateKey, key_id: str) -> dict[str, Any]:
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": key_id, "alg": "ES256", "use": "sig"}]}


def self_attestation_route(tee_kind: str, evidence_for: SelfEvidence, tls_cert: x509.Certificate) -> Route:
    """``GET /v1/broker/evidence``: the broker's own evidence for the caller's challenge (bi-attestation)."""

    async def answer(request: Request) -> Response:
        try:
            challenge = bytes.fromhex(request.query_params.get("challenge", ""))
        except ValueError:
            challenge = b""
        if len(challenge) != CHALLENGE_SIZE:
            return error_response(400, "malformed_request", "challenge must be 64 hex digits")
        evidence = evidence_for(broker_binding(tls_cert, challenge))
        return JSONResponse({"evidence": base64.b64encode(evidence).decode(), "tee": tee_kind})

    return Route(BROKER_EVIDENCE_PATH, answer, methods=["GET"])


def create_app(
    store: BrokerStore,
    *,
    now_fn: Callable[[], datetime],
    sim_trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    result_signing_key: ec.EllipticCurvePrivateKey | None = None,
    collateral: CollateralSource = None,
    extra_routes: Sequence[Route] = (),
) -> Starlette:
    """The broker's ASGI application over ``store`` (module docstring); ``extra_routes``: e.g.
    ``self_attestation_route`` when the broker runs in a TEE."""
    key = result_signing_key if result_signing_key is not None else ec.generate_private_key(ec.SECP256R1())
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the attestation-result signing key must be an EC P-256 key (ES256)")
    ctx = BrokerContext(
        store=store,
        now_fn=now_fn,
        result_key=key,
        key_id=_key_id(key),
        sim_trusted_keys=tuple(sim_trusted_keys or ()),
        collateral=collateral,
    )
    jwks = jwks_for(key, ctx.key_id)
    document = openapi_document()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def keys(request: Request) -> Response:
        return JSONResponse(jwks)

    routes = [
        Route("/v1/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/.well-known/jwks.json", keys, methods=["GET"]),
        *release_routes(ctx),
        *kms_routes(ctx),
        *extra_routes,
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        error = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return error_response(status, error, f"{request.method} {request.url.path}: {detail}", "see /openapi.json")

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.broker = ctx
    return app
