"""A signed-request client of the key broker's HTTP API (docs/broker-api.md).

``BrokerClient(url, app_id, api_key, ca=...)`` signs every request
(``auth.sign_request`` with ``derive_signing_key(api_key)``; the path signed includes the
query string) and turns error answers into enclaveml errors:

=======  =============================================================
401      ``BrokerAuthError`` (an ``AuthError``, exit 5)
403      ``BrokerRefused`` (a ``PolicyError``, exit 3)
404      ``KeyNotFound`` (exit 5)
409/400  ``ConfigError`` (exit 2); ``integrity_failed`` → ``IntegrityError`` (exit 4)
422      ``AttestationError`` (exit 3) with the broker's ``reason``
5xx      ``KeyServiceError`` (exit 5)
no answer ``ConfigError`` naming the URL
=======  =============================================================

Every broker error also keeps ``reason`` (the answer's ``error`` code) and ``status``
through :func:`error_reason`. ``request(method, path, json)`` is the generic signed call;
the named methods are thin wrappers over it.
"""

from __future__ import annotations

import base64
import binascii
import json as jsonlib
import ssl
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from enclaveml.attestation.collateral_source import CollateralSource
from enclaveml.attestation.evidence import VerifiedEvidence
from enclaveml.attestation.policy import Policy
from enclaveml.broker.auth import derive_signing_key, sign_request
from enclaveml.broker.self_attestation import verify_broker
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

__all__ = ["BrokerAuthError", "BrokerClient", "BrokerRefused", "decode_api_key", "error_reason"]


class BrokerAuthError(AuthError):
    """401 from the broker: missing, wrong, expired or replayed request signature."""

    def __init__(self, reason: str, what: str, hint: str | None = None) -> None:
        super().__init__(what, hint)
        self.reason = reason


class BrokerRefused(PolicyError):
    """403 from the broker: the caller's role, or no policy allows the release."""

    def __init__(self, reason: str, what: str, hint: str | None = None) -> None:
        super().__init__(what, hint)
        self.reason = reason


def error_reason(exc: EnclaveMLError) -> str | None:
    """The broker's ``error`` code carried by an exception this module raised, if any."""
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else None


def decode_api_key(api_key: bytes | str) -> bytes:
    """The api key as shown at enrollment (standard base64) or its 32 raw bytes."""
    if isinstance(api_key, bytes):
        return api_key
    try:
        raw = base64.b64decode(api_key.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not raw:
        raise ConfigError("the api key is not base64", "use the api key printed at enrollment")
    return raw


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _error(status: int, body: Any, url: str) -> EnclaveMLError:
    if isinstance(body, dict):
        reason, message = str(body.get("error", "error")), str(body.get("message", ""))
        hint = str(body.get("hint", "")) or None
    else:
        reason, message, hint = "error", f"HTTP {status}", None
    what = f"key broker: {message or reason}"
    if status == 401:
        return BrokerAuthError(reason, what, hint or "check ENCLAVEML_APP_ID / ENCLAVEML_API_KEY and the clock")
    if status == 403:
        return BrokerRefused(reason, what, hint)
    if status == 404:
        error: EnclaveMLError = KeyNotFound(what, hint)
    elif status == 422:
        return AttestationError(reason, what, hint)
    elif reason == "integrity_failed":
        error = IntegrityError(what, hint)
    elif 400 <= status < 500:
        error = ConfigError(what, hint)
    else:
        error = KeyServiceError(f"{what} (HTTP {status} from {url})", hint or "check the broker's log")
    error.reason = reason  # type: ignore[attr-defined]
    return error


def _tls_context(ca: str | None, client_cert: tuple[str, str] | None) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the broker CA {ca}: {exc}", "check ENCLAVEML_BROKER_CA") from None
    if client_cert is not None:
        try:
            context.load_cert_chain(client_cert[0], client_cert[1])
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the client certificate {client_cert[0]}: {exc}",
                "check ENCLAVEML_CLIENT_CERT / ENCLAVEML_CLIENT_KEY (PEM certificate and its private key)",
            ) from None
    return context


class BrokerClient:
    """Signed calls to the broker at ``url`` as app ``app_id``.

    ``ca``: a PEM file that verifies the broker's TLS certificate (default: the system's
    trust store). ``client_cert``: ``(cert PEM, key PEM)`` for a broker that requires mutual
    TLS (``broker serve --client-ca``). ``transport`` / ``http_client``: for tests (e.g. a Starlette
    ``TestClient``, whose base URL is ``http://testserver``).
    """

    def __init__(
        self,
        url: str,
        app_id: str,
        api_key: bytes | str,
        *,
        ca: str | None = None,
        client_cert: tuple[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        timeout: float = 30.0,
        now_fn: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not app_id:
            raise ConfigError("no broker app id", "set ENCLAVEML_APP_ID (printed at enrollment)")
        self.url = url.rstrip("/")
        self.app_id = app_id
        self._signing_key = derive_signing_key(decode_api_key(api_key))
        self._now_fn = now_fn
        if http_client is not None:
            self._http = http_client
        else:
            verify = _tls_context(ca, client_cert)
            self._http = httpx.Client(base_url=self.url, verify=verify, transport=transport, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def verify_broker(
        self,
        policy: Policy,
        *,
        now: datetime,
        sim_trusted_keys: Sequence[Ed25519PublicKey] | None = None,
        collateral: CollateralSource = None,
    ) -> VerifiedEvidence:
        """Bi-attestation over this client's connection: the broker's own evidence, bound to the
        TLS certificate it presents, must satisfy ``policy`` (``self_attestation.verify_broker``)."""
        return verify_broker(self._http, policy, now=now, sim_trusted_keys=sim_trusted_keys, collateral=collateral)

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the generic call ---------------------------------------------------------------

    def call(self, method: str, path: str, json: Mapping[str, Any] | None = None) -> Any:
        """A signed request; answers the decoded JSON (object or list) or raises (module docstring)."""
        body = b"" if json is None else jsonlib.dumps(json).encode()
        headers = sign_request(self.app_id, self._signing_key, method, path, body, now=self._now_fn())
        if json is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(method, path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ConfigError(
                f"cannot reach the key broker at {self.url}: {exc}",
                "check ENCLAVEML_BROKER_URL, that the broker runs, and ENCLAVEML_BROKER_CA for its TLS certificate",
            ) from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code >= 400:
            raise _error(response.status_code, answer, self.url)
        if answer is None:
            raise KeyServiceError(f"the key broker at {self.url} answered {method} {path} with no JSON")
        return answer

    def request(self, method: str, path: str, json: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A signed request whose answer is a JSON object."""
        answer = self.call(method, path, json)
        if not isinstance(answer, dict):
            raise KeyServiceError(
                f"the key broker answered {method} {path} with {type(answer).__name__}, not an object"
            )
        return answer

    def _list(self, path: str) -> list[dict[str, Any]]:
        answer = self.call("GET", path)
        if not isinstance(answer, list):
            raise KeyServiceError(f"the key broker answered GET {path} with {type(answer).__name__}, not a list")
        return answer

    # -- unauthenticated ----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        try:
            response = self._http.get("/v1/health")
        except httpx.HTTPError as exc:
            raise ConfigError(f"cannot reach the key broker at {self.url}: {exc}") from None
        answer: dict[str, Any] = response.json()
        return answer

    # -- admin and owner ----------------------------------------------------------------

    def enroll(self, name: str, role: str) -> dict[str, Any]:
        """``{"app_id", "api_key", "name", "role"}``; the api key is shown only here."""
        return self.request("POST", "/v1/apps", {"name": name, "role": role})

    def create_key(self, name: str) -> dict[str, Any]:
        return self.request("POST", "/v1/keys", {"name": name})

    def list_keys(self) -> list[dict[str, Any]]:
        return self._list("/v1/keys")

    def describe_key(self, name_or_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/keys/{name_or_id}")

    def rotate_key(self, name_or_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/keys/{name_or_id}/rotate")

    def gramine_pf_key(self, name_or_id: str, version: int | None = None) -> bytes:
        """The key's 16-byte Gramine wrap key (owner apps; audited by the broker)."""
        body = {} if version is None else {"key_version": version}
        answer = self.request("POST", f"/v1/keys/{name_or_id}/gramine-pf-key", body)
        return base64.b64decode(answer["wrap_key"], validate=True)

    def register_policy(self, name: str, document: str, keys: Sequence[str]) -> dict[str, Any]:
        return self.request("POST", "/v1/policies", {"name": name, "document": document, "keys": list(keys)})

    def list_policies(self) -> list[dict[str, Any]]:
        return self._list("/v1/policies")

    def revoke_policy(self, policy_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/policies/{policy_id}/revoke")

    # -- workload -----------------------------------------------------------------------

    def nonce(self) -> dict[str, Any]:
        """``{"nonce": hex, "expires_at": iso8601}``; use ``bytes.fromhex(...)`` for the binding."""
        return self.request("GET", "/v1/nonce")

    def attest(self, evidence: bytes, nonce_hex: str) -> dict[str, Any]:
        return self.request("POST", "/v1/attest", {"evidence": base64.b64encode(evidence).decode(), "nonce": nonce_hex})

    def release(self, name: str, evidence: bytes, nonce_hex: str, public_key: bytes) -> dict[str, Any]:
        """``{"key", "policy_id", "sealed" (base64), "claims", "insecure"}``."""
        body = {
            "evidence": base64.b64encode(evidence).decode(),
            "nonce": nonce_hex,
            "public_key": base64.b64encode(public_key).decode(),
        }
        return self.request("POST", f"/v1/keys/{name}/release", body)
