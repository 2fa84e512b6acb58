"""Admin and owner routes: enrollment, primary keys, data-key wraps, policies (docs/broker-api.md)."""

from __future__ import annotations

import base64
from typing import Any

from starlette.routing import Route

from enclaveml.broker._http import ApiError, BrokerContext, Call, b64_field, endpoint, str_field
from enclaveml.broker.models import PolicyRecord, Role
from enclaveml.crypto import WrappedKey
from enclaveml.kms._protocol import KeyInfo

__all__ = ["key_info_json", "kms_routes", "policy_json"]

_OWNER = (Role.OWNER,)
_ADMIN = (Role.ADMIN,)


def key_info_json(info: KeyInfo) -> dict[str, Any]:
    return {
        "kms": info.kms,
        "key_id": info.key_id,
        "name": info.name,
        "created": info.created.isoformat(),
        "primary_version": info.primary_version,
        "versions": [{"version": v.version, "created": v.created.isoformat(), "state": v.state} for v in info.versions],
    }


def policy_json(ctx: BrokerContext, record: PolicyRecord) -> dict[str, Any]:
    names = {k.key_id: k.name for k in ctx.store.list_keys()}
    return {
        "policy_id": record.policy_id,
        "name": record.name,
        "keys": [names.get(key_id, key_id) for key_id in record.key_ids],
        "key_ids": list(record.key_ids),
        "revoked": record.revoked,
        "created": record.created.isoformat(),
    }


def enroll(ctx: BrokerContext, call: Call) -> tuple[int, dict[str, Any]]:
    body = call.json()
    enrolled = ctx.store.enroll_app(
        str_field(body, "name"), str_field(body, "role"), actor=call.caller.app_id, now=call.now
    )
    app = enrolled.app
    api_key = base64.b64encode(enrolled.api_key).decode()
    return 200, {"app_id": app.app_id, "api_key": api_key, "name": app.name, "role": str(app.role)}


def create_key(ctx: BrokerContext, call: Call) -> tuple[int, dict[str, Any]]:
    name = str_field(call.json(), "name")
    return 200, key_info_json(ctx.store.create_key(name, actor=call.caller.app_id, now=call.now))


def list_keys(ctx: BrokerContext, call: Call) -> list[Any]:
    return [key_info_json(info) for info in ctx.store.list_keys()]


def describe_key(ctx: BrokerContext, call: Call) -> dict[str, Any]:
    return key_info_json(ctx.store.describe_key(call.param("name")))


def rotate_key(ctx: BrokerContext, call: Call) -> dict[str, Any]:
    return key_info_json(ctx.store.rotate_key(call.param("name"), actor=call.caller.app_id, now=call.now))


def gramine_pf_key(ctx: BrokerContext, call: Call) -> dict[str, Any]:
    body = call.json()
    version = body.get("key_version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise ApiError(400, "malformed_request", "field 'key_version' must be a positive integer")
    key = ctx.store.gramine_pf_key(call.param("name"), version, actor=call.caller.app_id, now=call.now)
    return {"wrap_key": base64.b64encode(key).decode()}


def wrap(ctx: BrokerContext, call: Call) -> dict[str, Any]:
    body = call.json()
    data_key = b64_field(body, "data_key")
    associated_data = b64_field(body, "associated_data", required=False)
    wrapped = ctx.store.wrap_data_key(call.param("name"), data_key, associated_data)
    return {
        "kms": wrapped.kms,
        "key_id": wrapped.key_id,
        "key_version": wrapped.key_version,
        "ciphertext": base64.b64encode(wrapped.ciphertext).decode(),
    }


def unwrap(ctx: BrokerContext, call: Call) -> dict[str, Any]:
    body = call.json()
    version = body.get("key_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ApiError(400, "malformed_request", "field 'key_version' must be a positive integer")
    wrapped = WrappedKey(str_field(body, "kms"), str_field(body, "key_id"), version, b64_field(body, "ciphertext"))
    data_key = ctx.store.unwrap_data_key(wrapped, b64_field(body, "associated_data", required=False))
    return {"data_key": base64.b64encode(data_key).decode()}


def register_policy(ctx: BrokerContext, call: Call) -> tuple[int, dict[str, Any]]:
    body = call.json()
    keys = body.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise ApiError(400, "malformed_request", "field 'keys' must be a non-empty list of key names")
    record = ctx.store.register_policy(
        str_field(body, "name"), str_field(body, "document"), keys, actor=call.caller.app_id, now=call.now
    )
    return 200, policy_json(ctx, record)


def list_policies(ctx: BrokerContext, call: Call) -> list[Any]:
    return [policy_json(ctx, record) for record in ctx.store.list_policies()]


def revoke_policy(ctx: BrokerContext, call: Call) -> dict[str, Any]:
    record = ctx.store.revoke_policy(call.param("policy_id"), actor=call.caller.app_id, now=call.now)
    return policy_json(ctx, record)


def kms_routes(ctx: BrokerContext) -> list[Route]:
    def route(path: str, method: str, roles: tuple[Role, ...], handler: Any) -> Route:
        return Route(path, endpoint(ctx, path, roles, handler), methods=[method])

    return [
        route("/v1/apps", "POST", _ADMIN, enroll),
        route("/v1/keys", "POST", _OWNER, create_key),
        route("/v1/keys", "GET", _OWNER, list_keys),
        route("/v1/keys/unwrap", "POST", _OWNER, unwrap),
        route("/v1/keys/{name}", "GET", _OWNER, describe_key),
        route("/v1/keys/{name}/rotate", "POST", _OWNER, rotate_key),
        route("/v1/keys/{name}/wrap", "POST", _OWNER, wrap),
        route("/v1/keys/{name}/gramine-pf-key", "POST", _OWNER, gramine_pf_key),
        route("/v1/policies", "POST", _OWNER, register_policy),
        route("/v1/policies", "GET", _OWNER, list_policies),
        route("/v1/policies/{policy_id}/revoke", "POST", _OWNER, revoke_policy),
    ]
