"""Verify a Microsoft Azure Attestation (MAA) token into ``Claims`` (pure core).

MAA checks an SGX quote against Intel's collateral and its attestation policy, then
issues an RS256 JWT. ``verify_maa_token`` checks that JWT against the provider's signing
keys (the JWKS served at ``<provider>/certs``, fetched by the caller over TLS) in a fixed
order, each step failing with an ``AttestationError`` whose ``reason`` names it:

1. header: compact JWS, ``alg`` exactly ``RS256`` (``malformed_token``,
   ``token_algorithm_not_allowed``); ``jku`` is never followed.
2. key: the single JWK whose ``kid`` equals the header's (``key_not_in_jwks``); the RSA
   key in its ``x5c[0]`` certificate, equal to its ``n``/``e`` when present
   (``malformed_jwks``, ``jwks_key_mismatch``).
3. signature, via PyJWT (``token_signature_invalid``).
4. validity window at the given ``now``: ``exp`` required, ``nbf`` and ``iat`` if present
   (``token_expired``, ``token_not_yet_valid``).
5. issuer: ``iss`` equals the provider URL (``issuer_mismatch``).
6. claims: only ``x-ms-attestation-type: sgx`` is mapped (``unsupported_attestation_type``
   otherwise: ``Claims`` has no SEV-SNP measurement and MAA's TDX claims are not mapped yet);
   bad or absent SGX claims give ``malformed_claim`` / ``missing_claim``.

``report_data`` is ``x-ms-sgx-report-data`` (hex, 64 bytes) when present. Otherwise it is
derived from ``x-ms-sgx-ehd`` (the runtime data, base64url): MAA accepts a quote only when
``report_data[0:32] == SHA-256(runtime data)``, so that digest followed by 32 zero bytes is
used, and ``extra["report_data_source"]`` says so (bytes 32..64 are then not attested).
``tcb_status`` is ``UpToDate`` because MAA issues no token for a platform its policy rejects;
it is MAA's verdict, not ours. See ``docs/attestation/maa.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import datetime
from typing import Any, TypeVar

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.errors import AttestationError

__all__ = ["ALLOWED_ALGORITHMS", "verify_maa_token"]

ALLOWED_ALGORITHMS = ("RS256",)  # MAA's openid-configuration lists only RS256
_SGX = "sgx"
_T = TypeVar("_T")
_HEX = re.compile(r"[0-9a-fA-F]*")
_B64URL = re.compile(r"[A-Za-z0-9_-]*=*")


def verify_maa_token(
    token: str, jwks: dict[str, Any] | str, *, issuer: str, now: datetime, leeway_s: int = 0
) -> Claims:
    """Verify an MAA token signed by a key of ``jwks`` and issued by ``issuer``, valid at ``now``."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if leeway_s < 0:
        raise ValueError("leeway_s must not be negative")
    header = _unverified_header(token)
    key = _public_key_from_jwk(_select_jwk(jwks, header["kid"]))
    payload = _verify_signature(token, key)
    _check_validity_window(payload, now.timestamp(), leeway_s)
    _check_issuer(payload, issuer)
    return _claims_from_sgx_payload(payload)


def _unverified_header(token: str) -> dict[str, Any]:
    """Step 1. Read the header before anything is trusted; only its alg and kid are used."""
    if not isinstance(token, str) or token.count(".") != 2:
        raise AttestationError("malformed_token", "the MAA token is not a compact JWS (three dot-separated parts)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AttestationError("malformed_token", f"the MAA token is malformed: {exc}") from None
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise AttestationError("token_algorithm_not_allowed", f"token alg {alg!r} is not allowed, only RS256")
    if not isinstance(header.get("kid"), str):
        raise AttestationError("malformed_token", "the MAA token header has no kid")
    return header


def _select_jwk(jwks: dict[str, Any] | str, kid: str) -> dict[str, Any]:
    """Step 2a. The one JWK named by ``kid``; the JWKS is trusted as the provider's own."""
    if isinstance(jwks, str):
        try:
            jwks = json.loads(jwks)
        except ValueError:
            raise AttestationError("malformed_jwks", "the JWKS is not valid JSON") from None
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise AttestationError("malformed_jwks", "the JWKS has no 'keys' list of objects")
    matches: list[dict[str, Any]] = [k for k in keys if k.get("kid") == kid]
    if not matches:
        raise AttestationError(
            "key_not_in_jwks", f"token key id {kid!r} is not in the JWKS", "refresh the JWKS from <provider>/certs"
        )
    if len(matches) > 1:
        raise AttestationError("malformed_jwks", f"the JWKS holds {len(matches)} keys with id {kid!r}")
    return matches[0]


def _public_key_from_jwk(jwk: dict[str, Any]) -> RSAPublicKey:
    """Step 2b. The RSA key of ``x5c[0]`` (DER, standard base64), cross-checked with n/e."""
    if jwk.get("kty", "RSA") != "RSA":
        raise AttestationError("jwks_key_mismatch", f"JWK kty is {jwk.get('kty')!r}, RS256 needs 'RSA'")
    x5c = jwk.get("x5c")
    if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
        raise AttestationError("malformed_jwks", "the JWK has no x5c certificate")
    try:
        key = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True)).public_key()
    except (ValueError, binascii.Error):
        raise AttestationError("malformed_jwks", "the JWK's x5c[0] is not a base64 DER certificate") from None
    if not isinstance(key, RSAPublicKey):
        raise AttestationError("jwks_key_mismatch", "the JWK's x5c[0] certificate does not hold an RSA key")
    numbers = key.public_numbers()
    for name, actual in (("n", numbers.n), ("e", numbers.e)):
        if name in jwk and _b64url_uint(jwk[name], name) != actual:
            raise AttestationError("jwks_key_mismatch", f"the JWK's {name} differs from the key in its x5c certificate")
    return key


def _verify_signature(token: str, key: RSAPublicKey) -> dict[str, Any]:
    """Step 3. RS256 signature only; time, issuer and audience are checked by us, at ``now``."""
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=list(ALLOWED_ALGORITHMS),
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
        )
    except jwt.InvalidSignatureError:
        raise AttestationError("token_signature_invalid", "the MAA token signature does not verify") from None
    except jwt.PyJWTError as exc:
        raise AttestationError("malformed_token", f"the MAA token is malformed: {exc}") from None
    return payload


def _check_validity_window(payload: dict[str, Any], now: float, leeway_s: int) -> None:
    """Step 4. RFC 7519 4.1.4/4.1.5: reject on or after ``exp``, before ``nbf`` (and a future ``iat``)."""
    exp = _numeric_date(payload, "exp")
    if exp is None:
        raise AttestationError("missing_claim", "the MAA token has no exp claim")
    if now >= exp + leeway_s:
        raise AttestationError("token_expired", f"the MAA token expired at {exp:.0f} (now {now:.0f})")
    for name in ("nbf", "iat"):
        start = _numeric_date(payload, name)
        if start is not None and now < start - leeway_s:
            raise AttestationError("token_not_yet_valid", f"the MAA token {name} is {start:.0f}, after now ({now:.0f})")


def _check_issuer(payload: dict[str, Any], expected: str) -> None:
    """Step 5. ``iss`` is the provider URL, e.g. ``https://<name>.<region>.attest.azure.net``."""
    actual = payload.get("iss")
    if not isinstance(actual, str) or actual.rstrip("/") != expected.rstrip("/"):
        raise AttestationError("issuer_mismatch", f"token issuer is {actual!r}, expected {expected!r}")


def _claims_from_sgx_payload(payload: dict[str, Any]) -> Claims:
    """Step 6. Map MAA's ``x-ms-sgx-*`` claims (see the table in docs/attestation/maa.md)."""
    kind = _claim(payload, "x-ms-attestation-type", str)
    if kind != _SGX:
        raise AttestationError("unsupported_attestation_type", f"MAA attestation type {kind!r} is not supported")
    extra = {"issuer": payload["iss"], "attestation_type": kind}
    for name, key in (("x-ms-policy-hash", "policy_hash"), ("x-ms-ver", "version")):
        if isinstance(payload.get(name), str):
            extra[key] = payload[name]
    if "x-ms-sgx-collateral" in payload:
        extra["sgx_collateral"] = json.dumps(payload["x-ms-sgx-collateral"], sort_keys=True, separators=(",", ":"))
    if "x-ms-sgx-report-data" in payload:
        report_data = _hex_claim(payload, "x-ms-sgx-report-data", 64)
        extra["report_data_source"] = "x-ms-sgx-report-data"
    elif "x-ms-sgx-ehd" in payload:
        report_data = hashlib.sha256(_b64url_claim(payload, "x-ms-sgx-ehd")).digest() + bytes(32)
        extra["report_data_source"] = "sha256(x-ms-sgx-ehd)"
    else:
        raise AttestationError("missing_claim", "the MAA token binds no report data (x-ms-sgx-report-data or -ehd)")
    return Claims(
        tee=TeeType.SGX,
        source="maa",
        report_data=report_data,
        debug=_claim(payload, "x-ms-sgx-is-debuggable", bool),
        tcb_status=TcbStatus.UP_TO_DATE,
        mr_enclave=_hex_claim(payload, "x-ms-sgx-mrenclave", 32),
        mr_signer=_hex_claim(payload, "x-ms-sgx-mrsigner", 32),
        isv_prod_id=_u16_claim(payload, "x-ms-sgx-product-id"),
        isv_svn=_u16_claim(payload, "x-ms-sgx-svn"),
        extra=extra,
    )


def _claim(payload: dict[str, Any], name: str, kind: type[_T]) -> _T:
    if name not in payload:
        raise AttestationError("missing_claim", f"the MAA token has no {name} claim")
    value = payload[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AttestationError("malformed_claim", f"claim {name} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _hex_claim(payload: dict[str, Any], name: str, size: int) -> bytes:
    value = _claim(payload, name, str)
    if len(value) != 2 * size or not _HEX.fullmatch(value):
        raise AttestationError("malformed_claim", f"claim {name} is not {size} bytes of hex")
    return bytes.fromhex(value)


def _u16_claim(payload: dict[str, Any], name: str) -> int:
    value = _claim(payload, name, int)
    if not 0 <= value <= 0xFFFF:
        raise AttestationError("malformed_claim", f"claim {name} = {value} is not a 16-bit value")
    return value


def _b64url_claim(payload: dict[str, Any], name: str) -> bytes:
    return _b64url_decode(_claim(payload, name, str), "malformed_claim", f"claim {name}")


def _b64url_uint(value: object, name: str) -> int:
    if not isinstance(value, str):
        raise AttestationError("malformed_jwks", f"the JWK's {name} is not a string")
    return int.from_bytes(_b64url_decode(value, "malformed_jwks", f"the JWK's {name}"), "big")


def _b64url_decode(value: str, reason: str, what: str) -> bytes:
    if not _B64URL.fullmatch(value):
        raise AttestationError(reason, f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (ValueError, binascii.Error):
        raise AttestationError(reason, f"{what} is not base64url") from None


def _numeric_date(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AttestationError("malformed_claim", f"claim {name} is not a NumericDate")
    return float(value)
