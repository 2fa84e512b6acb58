"""Workload routes: nonces, attestation results and key release (docs/broker-api.md).

Release, in this order: check the nonce (issued by us, unexpired:
``store.check_nonce_unaudited``) → verify the evidence (``verify_evidence``; simulated
evidence from any signer when no simulation key is pinned) → check ``report_data ==
release_binding(public_key, nonce)`` → evaluate every unrevoked policy bound to the key (a
list cached ``POLICY_CACHE_S``, documents parsed once), release under the first that allows
→ ``store.release_job`` → HPKE-seal the bundle to the presented public key. The nonce is
marked used in the one transaction that records the outcome — the release with its audit
entry, or the refusal's audit entry — so every attempt uses up its nonce, and a nonce used
before is refused ``reused_nonce`` with nothing released. Every refusal is audited with its
reason and answers with no key bytes.

``GET /v1/nonce`` and the release are coroutines (``_http.py``): they run on the event loop
and await the group commit, which holds the request's nonce, the outcome and its audit
entry in one job. Evidence that needs collateral from a PCCS is verified in a worker thread
(the fetch may block), as is a policy lookup the cache cannot answer.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
from datetime import timedelta
from typing import Any

import jwt
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from enclaveml.attestation.collateral import Collateral
from enclaveml.attestation.collateral_source import resolve_collateral
from enclaveml.attestation.evidence import VerifiedEvidence, verify_evidence
from enclaveml.attestation.policy import Decision, Policy
from enclaveml.broker._http import ApiError, BrokerContext, Call, Refusal, b64_field, endpoint, str_field
from enclaveml.broker._nonces import nonce_error
from enclaveml.broker.models import IssuedNonce, PolicyRecord, Role
from enclaveml.crypto.key_release import release_binding, seal_for_recipient
from enclaveml.errors import AttestationError, ConfigError, KeyNotFound, PolicyError

__all__ = ["NONCE_PURPOSE", "NONCE_TTL", "RESULT_ISSUER", "nonce_bytes", "release_routes"]

NONCE_PURPOSE = "attest"
NONCE_TTL = timedelta(minutes=5)
RESULT_ISSUER = "enclaveml-broker"
_RESULT_TTL_S = 300
POLICY_CACHE_S = 5.0  # how long another broker process's new policy may go unseen (store.policies_for_key)
_WORKLOAD = (Role.WORKLOAD,)


def nonce_bytes(value: str) -> bytes:
    """The 32 bytes behind a stored nonce (``secrets.token_urlsafe(32)``)."""
    return base64.urlsafe_b64decode(value + "=")


def _stored_nonce(hex_text: str) -> tuple[str, bytes]:
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ApiError(400, "malformed_request", "field 'nonce' must be 64 hex digits (from GET /v1/nonce)")
    return base64.urlsafe_b64encode(raw).decode().rstrip("="), raw


async def issue_nonce(ctx: BrokerContext, call: Call) -> dict[str, Any]:
    issued = ctx.store.issue_nonce(NONCE_PURPOSE, NONCE_TTL, now=call.now)
    return {"nonce": nonce_bytes(issued.value).hex(), "expires_at": issued.expires_at.isoformat()}


def _verify(
    ctx: BrokerContext, call: Call, action: str, subject: str, evidence: bytes, nonce: IssuedNonce | None = None
) -> VerifiedEvidence:
    """Verify ``evidence`` or raise an audited 422 (which marks ``nonce`` used)."""
    caller, now = call.caller.app_id, call.now
    try:
        collateral = resolve_collateral(ctx.collateral, evidence, now)
        return verify_evidence(evidence, now=now, collateral=collateral, sim_trusted_keys=ctx.sim_trusted_keys or None)
    except AttestationError as exc:
        raise ctx.refuse(action, caller, subject, 422, exc.reason, exc.what, exc.hint, now=now, nonce=nonce) from None
    except ConfigError as exc:
        reason = "collateral_unavailable"
        raise ctx.refuse(action, caller, subject, 422, reason, exc.what, exc.hint, now=now, nonce=nonce) from None


def _consume(ctx: BrokerContext, call: Call, nonce_hex: str) -> bytes:
    stored, raw = _stored_nonce(nonce_hex)
    ctx.store.consume_nonce(stored, NONCE_PURPOSE, call.now, actor=call.caller.app_id)  # audits its refusals
    return raw


def _check(ctx: BrokerContext, call: Call, nonce_hex: str) -> tuple[IssuedNonce, bytes]:
    """An issued, unexpired nonce, to be marked used with the attempt's outcome; else an audited 422."""
    stored, raw = _stored_nonce(nonce_hex)
    nonce, reason = ctx.store.check_nonce_unaudited(stored, NONCE_PURPOSE, call.now)
    if nonce is None:
        error = nonce_error(reason or "unknown_nonce", NONCE_PURPOSE)
        audit = Refusal("nonce", call.caller.app_id, NONCE_PURPOSE, error.reason, call.now)  # check_nonce's entry
        raise ApiError(422, error.reason, error.what, error.hint or "", audit=audit)
    return nonce, raw


@functools.lru_cache(maxsize=256)
def _policy(document: str) -> Policy:
    """A registered policy's document, parsed once (``PolicyError`` is not cached)."""
    return Policy.from_text(document)


def _insecure(verified: VerifiedEvidence, decision: Decision | None = None) -> bool:
    return verified.claims.insecure or bool(verified.warnings) or (decision is not None and decision.insecure)


def attest(ctx: BrokerContext, call: Call) -> dict[str, Any]:
    body = call.json()
    evidence, nonce_hex = b64_field(body, "evidence"), str_field(body, "nonce")
    _consume(ctx, call, nonce_hex)
    verified = _verify(ctx, call, "attest", "evidence", evidence)
    claims = verified.claims.to_json()
    insecure = _insecure(verified)
    issued = int(call.now.timestamp())
    payload = {
        "iss": RESULT_ISSUER,
        "sub": call.caller.app_id,
        "iat": issued,
        "exp": issued + _RESULT_TTL_S,
        "nonce": nonce_hex,
        "evidence": verified.description,
        "tcb_status": str(verified.status),
        "insecure": insecure,
        "claims": claims,
    }
    token = jwt.encode(payload, ctx.result_key, algorithm="ES256", headers={"kid": ctx.key_id})
    return {"claims": claims, "insecure": insecure, "token": token}


def _bound_policies(ctx: BrokerContext, call: Call, name: str, nonce: IssuedNonce) -> list[PolicyRecord]:
    """Every policy bound to the key, revoked ones too (cached ``POLICY_CACHE_S``); unknown key: a 404."""
    try:
        return ctx.store.policies_for_key(name, include_revoked=True, max_age_s=POLICY_CACHE_S)
    except KeyNotFound as exc:
        raise ctx.refuse(
            "release", call.caller.app_id, name, 404, "unknown_key", exc.what, exc.hint, now=call.now, nonce=nonce
        ) from None


def _evaluate(
    ctx: BrokerContext, call: Call, name: str, bound: list[PolicyRecord], verified: VerifiedEvidence, nonce: IssuedNonce
) -> tuple[PolicyRecord, Decision]:
    caller, now = call.caller.app_id, call.now
    live = [record for record in bound if not record.revoked]
    if not live:
        reason = "policy_revoked" if bound else "key_not_bound"
        what = f"every policy bound to key {name} was revoked" if bound else f"no policy may receive key {name}"
        hint = "an owner registers a policy for this key (`enclaveml policy register POLICY.toml --key NAME`)"
        raise ctx.refuse("release", caller, name, 403, reason, what, hint, now=now, nonce=nonce)
    refusals: list[str] = []
    checks: set[str] = set()
    for record in live:
        try:
            decision = _policy(record.document).evaluate(verified.claims, now=now)
        except PolicyError as exc:
            refusals.append(f"policy {record.name} ({record.policy_id}) does not load: {exc.what}")
            continue
        if decision.allowed:
            return record, decision
        checks.update(f.check for f in decision.failures)
        first = decision.failures[0]
        refusals.append(f"policy {record.name} ({record.policy_id}): {first.check}: {first.what}")
    failed = sorted(checks)
    raise ctx.refuse(
        "release",
        caller,
        name,
        403,
        "policy_refused",
        f"no policy bound to key {name} accepts this workload (failed checks: {', '.join(failed)}): "
        + "; ".join(refusals),
        "compare the workload's claims with the policy (`enclaveml attest verify --policy`)",
        now=now,
        detail={"policies": [r.policy_id for r in live], "failed_checks": failed},
        nonce=nonce,
    )


async def release(ctx: BrokerContext, call: Call) -> dict[str, Any]:
    name, body = call.param("name"), call.json()
    evidence, nonce_hex = b64_field(body, "evidence"), str_field(body, "nonce")
    public_key = b64_field(body, "public_key", size=32)
    claim, nonce = _check(ctx, call, nonce_hex)
    if ctx.collateral is None or isinstance(ctx.collateral, Collateral):  # nothing to fetch: CPU only
        verified = _verify(ctx, call, "release", name, evidence, claim)
    else:
        verified = await run_in_threadpool(_verify, ctx, call, "release", name, evidence, claim)
    if not hmac.compare_digest(verified.claims.report_data, release_binding(public_key, nonce)):
        raise ctx.refuse(
            "release",
            call.caller.app_id,
            name,
            422,
            "binding_mismatch",
            "the evidence's report data does not bind the presented public key and nonce "
            "(expected SHA-256(label ‖ public_key ‖ nonce))",
            "obtain evidence whose report data is release_binding(public_key, nonce)",
            now=call.now,
            nonce=claim,
        )
    if ctx.store.policies_cached(name, include_revoked=True):
        bound = _bound_policies(ctx, call, name, claim)
    else:
        bound = await run_in_threadpool(_bound_policies, ctx, call, name, claim)
    record, decision = _evaluate(ctx, call, name, bound, verified, claim)
    job = ctx.store.release_job(record.policy_id, name, actor=call.caller.app_id, now=call.now, nonce=claim)
    released, error = await ctx.store.commit_async(job, call.request_nonce)
    if error is not None:  # audited in the job (reused nonce, revoked policy, ...)
        raise error
    bundle = {"keys": [k.to_json() for k in released]}
    sealed = seal_for_recipient(json.dumps(bundle).encode(), public_key, nonce)
    return {
        "key": name,
        "policy_id": record.policy_id,
        "sealed": base64.b64encode(sealed).decode(),
        "claims": verified.claims.to_json(),
        "insecure": _insecure(verified, decision),
    }


def release_routes(ctx: BrokerContext) -> list[Route]:
    return [
        Route("/v1/nonce", endpoint(ctx, "/v1/nonce", _WORKLOAD, issue_nonce), methods=["GET"]),
        Route("/v1/attest", endpoint(ctx, "/v1/attest", _WORKLOAD, attest), methods=["POST"]),
        Route(
            "/v1/keys/{name}/release",
            endpoint(ctx, "/v1/keys/{name}/release", _WORKLOAD, release),
            methods=["POST"],
        ),
    ]
