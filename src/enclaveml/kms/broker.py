"""The ``broker`` KMS backend: the :class:`KeyManagementService` protocol over the key broker's API.

Primary keys live in the broker and never leave it: wraps and unwraps are owner-role API
calls (``POST /v1/keys/{name}/wrap``, ``POST /v1/keys/unwrap``), each a signed request
(``broker/client.py``). Errors: 401 → ``AuthError``, 403 → ``PolicyError``, 404 →
``KeyNotFound``, 422 → ``AttestationError``, no answer → ``ConfigError`` naming the URL.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import httpx

from enclaveml.broker.client import BrokerClient
from enclaveml.errors import ConfigError, KeyServiceError
from enclaveml.kms._protocol import KeyInfo, KeyVersionInfo, WrappedKey

__all__ = ["BrokerKms"]

_KMS = "broker"


def _key_info(doc: dict[str, Any]) -> KeyInfo:
    try:
        versions = tuple(
            KeyVersionInfo(int(v["version"]), datetime.fromisoformat(v["created"]), str(v["state"]))
            for v in doc["versions"]
        )
        return KeyInfo(
            str(doc["kms"]),
            str(doc["key_id"]),
            str(doc["name"]),
            datetime.fromisoformat(doc["created"]),
            int(doc["primary_version"]),
            versions,
        )
    except (KeyError, TypeError, ValueError):
        raise KeyServiceError("the key broker answered a malformed key description") from None


class BrokerKms:
    """Keys held by the key broker at ``url``, used with an owner app's credentials."""

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
    ) -> None:
        self.client = BrokerClient(
            url, app_id, api_key, ca=ca, client_cert=client_cert, transport=transport, http_client=http_client
        )

    @property
    def kms_name(self) -> str:
        return _KMS

    def close(self) -> None:
        self.client.close()

    def create_key(self, name: str) -> KeyInfo:
        return _key_info(self.client.create_key(name))

    def list_keys(self) -> list[KeyInfo]:
        return [_key_info(doc) for doc in self.client.list_keys()]

    def describe_key(self, name_or_id: str) -> KeyInfo:
        return _key_info(self.client.describe_key(name_or_id))

    def rotate_key(self, name_or_id: str) -> KeyInfo:
        return _key_info(self.client.rotate_key(name_or_id))

    def gramine_pf_key(self, name_or_id: str, version: int | None = None) -> bytes:
        """The 16-byte Gramine protected-files wrap key derived from the key (owner apps; audited)."""
        return self.client.gramine_pf_key(name_or_id, version)

    def destroy_key_version(self, name_or_id: str, version: int) -> KeyInfo:
        raise ConfigError(
            "the key broker API does not destroy key versions",
            "destroying key material is an operator action on the broker's store",
        )

    def wrap_data_key(self, name_or_id: str, data_key: bytes, associated_data: bytes) -> WrappedKey:
        body = {
            "data_key": base64.b64encode(data_key).decode(),
            "associated_data": base64.b64encode(associated_data).decode(),
        }
        answer = self.client.request("POST", f"/v1/keys/{name_or_id}/wrap", body)
        try:
            return WrappedKey(
                str(answer["kms"]),
                str(answer["key_id"]),
                int(answer["key_version"]),
                base64.b64decode(answer["ciphertext"]),
            )
        except (KeyError, TypeError, ValueError):
            raise KeyServiceError("the key broker answered a malformed wrapped key") from None

    def unwrap_data_key(self, wrapped: WrappedKey, associated_data: bytes) -> bytes:
        body = {
            "kms": wrapped.kms,
            "key_id": wrapped.key_id,
            "key_version": wrapped.key_version,
            "ciphertext": base64.b64encode(wrapped.ciphertext).decode(),
            "associated_data": base64.b64encode(associated_data).decode(),
        }
        answer = self.client.request("POST", "/v1/keys/unwrap", body)
        try:
            return base64.b64decode(answer["data_key"])
        except (KeyError, TypeError, ValueError):
            raise KeyServiceError("the key broker answered a malformed data key") from None
