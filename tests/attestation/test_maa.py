"""Azure Attestation tokens in MAA's exact shape, verified at a fixed ``now``: the good one and every forgery."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.attestation.maa import verify_maa_token
from enclaveml.errors import AttestationError

Jwks = dict[str, Any] | str
PROVIDER = "https://sharedeus2.eus2.attest.azure.net"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
ISSUED = int((NOW - timedelta(hours=1)).timestamp())
EXPIRES = ISSUED + 8 * 3600  # MAA tokens live eight hours
MR_ENCLAVE = bytes(range(32))
MR_SIGNER = bytes(range(32, 64))
REPORT_DATA = hashlib.sha256(b"ephemeral public key").digest() + bytes(32)
POLICY_HASH = "wm9mHlvTU82e8UqoOy1Yj1FBRSNkfe99-69IYDq9eWs"
COLLATERAL = {
    "qeidcertshash": "a" * 64,
    "qeidcrlhash": "b" * 64,
    "qeidhash": "c" * 64,
    "quotehash": "d" * 64,
    "tcbinfocertshash": "e" * 64,
    "tcbinfocrlhash": "f" * 64,
    "tcbinfohash": "0" * 64,
}


class Signer:
    """An MAA signing identity: RSA-2048 key, self-signed certificate, kid = base64(SHA-256(cert))."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PROVIDER)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=30))
            .not_valid_after(NOW + timedelta(days=365))
            .sign(self.key, hashes.SHA256())
        )
        der = self.cert.public_bytes(serialization.Encoding.DER)
        self.x5c = base64.b64encode(der).decode()
        self.kid = base64.b64encode(hashlib.sha256(der).digest()).decode()

    def jwk(self) -> dict[str, Any]:
        return {"x5c": [self.x5c], "kid": self.kid, "kty": "RSA"}

    def sign(self, payload: dict[str, Any], kid: str | None = None) -> str:
        headers = {"jku": f"{PROVIDER}/certs", "kid": kid or self.kid}
        return jwt.encode(payload, self.key, algorithm="RS256", headers=headers)


@pytest.fixture(scope="module")
def maa() -> Signer:
    return Signer()


@pytest.fixture(scope="module")
def impostor() -> Signer:
    return Signer()


def jwks_of(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def sgx_payload(**changes: Any) -> dict[str, Any]:
    """The body MAA issues for an SGX quote (current x-ms-* claims next to the legacy names)."""
    payload: dict[str, Any] = {
        "exp": EXPIRES,
        "iat": ISSUED,
        "nbf": ISSUED,
        "iss": PROVIDER,
        "jti": "5a2c7d4f0f9b4a1e8f3c9a2b1d0e4f6a",
        "is-debuggable": False,
        "product-id": 7,
        "sgx-mrenclave": MR_ENCLAVE.hex(),
        "sgx-mrsigner": MR_SIGNER.hex(),
        "svn": 3,
        "tee": "sgx",
        "x-ms-attestation-type": "sgx",
        "x-ms-policy-hash": POLICY_HASH,
        "x-ms-sgx-collateral": COLLATERAL,
        "x-ms-sgx-ehd": b64url(b"ephemeral public key"),
        "x-ms-sgx-is-debuggable": False,
        "x-ms-sgx-mrenclave": MR_ENCLAVE.hex(),
        "x-ms-sgx-mrsigner": MR_SIGNER.hex(),
        "x-ms-sgx-product-id": 7,
        "x-ms-sgx-report-data": REPORT_DATA.hex(),
        "x-ms-sgx-svn": 3,
        "x-ms-ver": "1.0",
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def verify(token: str, jwks: Jwks, **kwargs: Any) -> Claims:
    kwargs.setdefault("issuer", PROVIDER)
    kwargs.setdefault("now", NOW)
    return verify_maa_token(token, jwks, **kwargs)


def refused(reason: str, token: str, jwks: Jwks, match: str | None = None, **kw: Any) -> AttestationError:
    with pytest.raises(AttestationError, match=match) as caught:
        verify(token, jwks, **kw)
    assert caught.value.reason == reason
    return caught.value


def test_valid_sgx_token_maps_to_exact_claims(maa: Signer) -> None:
    claims = verify(maa.sign(sgx_payload()), jwks_of(maa.jwk()))

    assert claims == Claims(
        tee=TeeType.SGX,
        source="maa",
        report_data=REPORT_DATA,
        debug=False,
        tcb_status=TcbStatus.UP_TO_DATE,
        mr_enclave=MR_ENCLAVE,
        mr_signer=MR_SIGNER,
        isv_prod_id=7,
        isv_svn=3,
        extra={
            "issuer": PROVIDER,
            "attestation_type": "sgx",
            "policy_hash": POLICY_HASH,
            "version": "1.0",
            "sgx_collateral": json.dumps(COLLATERAL, sort_keys=True, separators=(",", ":")),
            "report_data_source": "x-ms-sgx-report-data",
        },
    )


def test_jwks_as_json_text_with_matching_n_and_e(maa: Signer, impostor: Signer) -> None:
    numbers = maa.key.public_key().public_numbers()
    jwk = maa.jwk() | {"n": b64url(numbers.n.to_bytes(256, "big")), "e": b64url(numbers.e.to_bytes(3, "big"))}
    text = json.dumps(jwks_of(impostor.jwk(), jwk))

    assert verify(maa.sign(sgx_payload()), text).mr_enclave == MR_ENCLAVE


def test_debuggable_enclave_maps_to_debug_true(maa: Signer) -> None:
    token = maa.sign(sgx_payload(**{"x-ms-sgx-is-debuggable": True}))
    assert verify(token, jwks_of(maa.jwk())).debug is True


def test_report_data_from_enclave_held_data_when_report_data_claim_absent(maa: Signer) -> None:
    token = maa.sign(sgx_payload(**{"x-ms-sgx-report-data": None}))
    claims = verify(token, jwks_of(maa.jwk()))
    assert claims.report_data == hashlib.sha256(b"ephemeral public key").digest() + bytes(32)
    assert claims.extra["report_data_source"] == "sha256(x-ms-sgx-ehd)"


def test_token_without_any_report_data_is_refused(maa: Signer) -> None:
    token = maa.sign(sgx_payload(**{"x-ms-sgx-report-data": None, "x-ms-sgx-ehd": None}))
    refused("missing_claim", token, jwks_of(maa.jwk()))


@pytest.mark.parametrize(
    ("now", "leeway_s", "reason"),
    [
        (datetime.fromtimestamp(EXPIRES, UTC), 0, "token_expired"),
        (datetime.fromtimestamp(EXPIRES + 61, UTC), 60, "token_expired"),
        (datetime.fromtimestamp(ISSUED - 1, UTC), 0, "token_not_yet_valid"),
        (datetime.fromtimestamp(ISSUED - 61, UTC), 60, "token_not_yet_valid"),
    ],
)
def test_outside_validity_window_at_now(maa: Signer, now: datetime, leeway_s: int, reason: str) -> None:
    refused(reason, maa.sign(sgx_payload()), jwks_of(maa.jwk()), now=now, leeway_s=leeway_s)


@pytest.mark.parametrize("now", [datetime.fromtimestamp(EXPIRES + 59, UTC), datetime.fromtimestamp(ISSUED - 59, UTC)])
def test_leeway_accepts_small_clock_skew(maa: Signer, now: datetime) -> None:
    assert verify(maa.sign(sgx_payload()), jwks_of(maa.jwk()), now=now, leeway_s=60).isv_svn == 3


def test_token_without_exp_is_refused(maa: Signer) -> None:
    refused("missing_claim", maa.sign(sgx_payload(exp=None)), jwks_of(maa.jwk()), match="exp")


def test_wrong_issuer_names_expected_and_actual(maa: Signer) -> None:
    token = maa.sign(sgx_payload(iss="https://evil.eus2.attest.azure.net"))
    refused("issuer_mismatch", token, jwks_of(maa.jwk()), match=r"evil\.eus2.*expected 'https://sharedeus2")


def test_signature_by_another_key_under_the_same_kid(maa: Signer, impostor: Signer) -> None:
    token = impostor.sign(sgx_payload(), kid=maa.kid)
    refused("token_signature_invalid", token, jwks_of(maa.jwk()))


def test_kid_missing_from_jwks(maa: Signer, impostor: Signer) -> None:
    refused("key_not_in_jwks", maa.sign(sgx_payload()), jwks_of(impostor.jwk()), match=re.escape(maa.kid))


def test_jwk_n_e_not_matching_its_certificate(maa: Signer, impostor: Signer) -> None:
    other = impostor.key.public_key().public_numbers()
    jwk = maa.jwk() | {"n": b64url(other.n.to_bytes(256, "big")), "e": "AQAB"}
    refused("jwks_key_mismatch", maa.sign(sgx_payload()), jwks_of(jwk))


def test_alg_none_is_refused(maa: Signer) -> None:
    header = {"alg": "none", "jku": f"{PROVIDER}/certs", "kid": maa.kid, "typ": "JWT"}
    token = compact(header, sgx_payload(), lambda _: b"")
    refused("token_algorithm_not_allowed", token, jwks_of(maa.jwk()), match="'none'")


def test_hs256_with_public_key_as_hmac_secret_is_refused(maa: Signer) -> None:
    """The key-confusion attack: HMAC keyed with the provider's public key, which anyone can fetch."""
    pem = maa.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "jku": f"{PROVIDER}/certs", "kid": maa.kid, "typ": "JWT"}
    token = compact(header, sgx_payload(**{"x-ms-sgx-is-debuggable": True}), lambda m: hmac.digest(pem, m, "sha256"))
    refused("token_algorithm_not_allowed", token, jwks_of(maa.jwk()), match="HS256")


def test_tampered_payload_keeps_old_signature(maa: Signer) -> None:
    header, _, signature = maa.sign(sgx_payload()).split(".")
    forged = b64url(json.dumps(sgx_payload(**{"x-ms-sgx-mrenclave": "ff" * 32})).encode())
    refused("token_signature_invalid", f"{header}.{forged}.{signature}", jwks_of(maa.jwk()))


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (lambda t: t[: t.rindex(".")], "malformed_token"),  # signature part gone
        (lambda t: t[:20], "malformed_token"),  # inside the header
        (lambda t: t[:-1], "malformed_token"),  # 342 - 1 = 4k + 1 base64url characters: never a byte string
        (lambda t: t[:-2], "token_signature_invalid"),  # decodes, to a signature one byte short
        (lambda t: "", "malformed_token"),
    ],
)
def test_truncated_token(maa: Signer, cut: Callable[[str], str], reason: str) -> None:
    refused(reason, cut(maa.sign(sgx_payload())), jwks_of(maa.jwk()))


@pytest.mark.parametrize("kind", ["sevsnpvm", "tdxvm"])
def test_confidential_vm_tokens_are_not_mapped(maa: Signer, kind: str) -> None:
    token = maa.sign(sgx_payload(**{"x-ms-attestation-type": kind}))
    refused("unsupported_attestation_type", token, jwks_of(maa.jwk()), match=kind)


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("x-ms-sgx-mrenclave", "00" * 31),
        ("x-ms-sgx-mrsigner", "zz" * 32),
        ("x-ms-sgx-report-data", "00" * 32),
        ("x-ms-sgx-svn", 70000),
        ("x-ms-sgx-product-id", "7"),
        ("x-ms-sgx-is-debuggable", "false"),
    ],
)
def test_malformed_sgx_claim_is_refused(maa: Signer, claim: str, value: object) -> None:
    refused("malformed_claim", maa.sign(sgx_payload(**{claim: value})), jwks_of(maa.jwk()), match=claim)


@pytest.mark.parametrize("jwks", ["not json", {"keys": "x"}, {"nokeys": []}])
def test_malformed_jwks_is_refused(maa: Signer, jwks: Jwks) -> None:
    refused("malformed_jwks", maa.sign(sgx_payload()), jwks)


def test_naive_now_is_misuse(maa: Signer) -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify(maa.sign(sgx_payload()), jwks_of(maa.jwk()), now=NOW.replace(tzinfo=None))
