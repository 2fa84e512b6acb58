"""Signed requests to the key broker: HMAC-SHA256 over method, path, time, nonce and body.

Every request carries four headers::

    X-Enclaveml-App        the app id
    X-Enclaveml-Timestamp  seconds since the epoch (integer, UTC)
    X-Enclaveml-Nonce      32 hex characters, fresh per request
    X-Enclaveml-Signature  hex HMAC-SHA256(signing_key, canonical_request)

``canonical_request`` is the UTF-8 of these lines joined by ``\\n``::

    ENCLAVEML-HMAC-SHA256
    <METHOD, upper case>
    <path, with the query string if any>
    <timestamp>
    <nonce>
    <hex SHA-256 of the body bytes>

``signing_key = HMAC-SHA256(api_key, "enclaveml request signing v1")``: the broker stores
this derived key (wrapped by its root key), never the api key itself.

The verifier refuses a timestamp more than ``window`` seconds (default 300) from ``now``,
and a nonce it has seen before for that app (the caller's ``remember_nonce`` returns
False). An unknown app and a wrong signature fail the same way, after the same HMAC
computation, so the response time does not tell which one it was. Written by hand
because it is our wire format; the primitives are the standard library's ``hmac``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from enclaveml.errors import AuthError

__all__ = [
    "HEADER_APP",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SIGNATURE_WINDOW_S",
    "canonical_request",
    "derive_signing_key",
    "sign_request",
    "verify_request",
]

HEADER_APP = "X-Enclaveml-App"
HEADER_TIMESTAMP = "X-Enclaveml-Timestamp"
HEADER_NONCE = "X-Enclaveml-Nonce"
HEADER_SIGNATURE = "X-Enclaveml-Signature"
SIGNATURE_WINDOW_S = 300
_SCHEME = "ENCLAVEML-HMAC-SHA256"
_DERIVATION_LABEL = b"enclaveml request signing v1"
# Verifying against this key for an unknown app keeps both failure paths equally long.
_DUMMY_KEY = hashlib.sha256(b"enclaveml unknown app").digest()


def derive_signing_key(api_key: bytes) -> bytes:
    """The per-app key that signs requests, derived from the api key shown at enrollment."""
    return hmac.new(api_key, _DERIVATION_LABEL, hashlib.sha256).digest()


def canonical_request(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    return "\n".join([_SCHEME, method.upper(), path, timestamp, nonce, hashlib.sha256(body).hexdigest()]).encode()


def _mac(key: bytes, message: bytes) -> str:
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_request(
    app_id: str, signing_key: bytes, method: str, path: str, body: bytes, *, now: datetime, nonce: str | None = None
) -> dict[str, str]:
    """Headers that authenticate one request (``nonce`` is random unless given, for tests)."""
    timestamp = str(int(now.timestamp()))
    nonce = nonce if nonce is not None else secrets.token_hex(16)
    signature = _mac(signing_key, canonical_request(method, path, timestamp, nonce, body))
    return {HEADER_APP: app_id, HEADER_TIMESTAMP: timestamp, HEADER_NONCE: nonce, HEADER_SIGNATURE: signature}


@dataclass(frozen=True)
class SignedRequest:
    app_id: str
    nonce: str
    timestamp: int
    expires: int  # seconds since the epoch: remember the nonce until then


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    *,
    now: datetime,
    lookup_key: Callable[[str], bytes | None],
    remember_nonce: Callable[[str, str, int], bool] | None,
    window_s: int = SIGNATURE_WINDOW_S,
) -> SignedRequest:
    """Check a request's signature headers; returns who sent it or raises ``AuthError``.

    ``lookup_key(app_id)`` returns the app's signing key or None; ``remember_nonce(app_id,
    nonce, expires_at_epoch)`` records the nonce and returns False if it was already known.
    With ``remember_nonce=None`` the caller must record ``SignedRequest.nonce`` (until
    ``SignedRequest.expires``) before acting on the request.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    fields = [lowered.get(h.lower(), "") for h in (HEADER_APP, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)]
    app_id, timestamp, nonce, signature = fields
    if not all(fields):
        raise AuthError("request is not signed", "send the X-Enclaveml-App/-Timestamp/-Nonce/-Signature headers")
    if not timestamp.isdigit() or not (16 <= len(nonce) <= 64) or not all(c in "0123456789abcdef" for c in nonce):
        raise AuthError("request signature headers are malformed", "use an enclaveml client or follow docs/broker.md")
    key = lookup_key(app_id)
    expected = _mac(key if key is not None else _DUMMY_KEY, canonical_request(method, path, timestamp, nonce, body))
    if not hmac.compare_digest(expected, signature.lower()) or key is None:
        raise AuthError("invalid app id or request signature", "check the app id and api key")
    sent = int(timestamp)
    skew = sent - int(now.timestamp())
    if abs(skew) > window_s:
        raise AuthError(
            f"request timestamp is {abs(skew)} s {'ahead of' if skew > 0 else 'behind'} the broker's clock "
            f"(allowed: {window_s} s)",
            "synchronise the client's clock (NTP)",
        )
    if remember_nonce is not None and not remember_nonce(app_id, nonce, sent + window_s):
        raise AuthError("request was replayed (nonce already used)", "sign every request with a fresh nonce")
    return SignedRequest(app_id, nonce, sent, sent + window_s)
