"""Bi-attestation: the broker proves what it runs before a workload sends it anything.

BigDL PPML's "bi-attestation" has the KMS attest itself to the workload too. Here a broker
started with a TEE of its own (``broker serve --attest-self``) answers (the route:
``app.self_attestation_route``)::

    GET /v1/broker/evidence?challenge=<64 hex>   (no credentials: it reveals nothing secret)
    -> {"evidence": base64, "tee": "sgx" | "tdx" | "snp" | "sim"}

with evidence from its TEE whose report data is :func:`broker_binding`::

    SHA-256("enclaveml broker attestation v1" ‖ 0x00 ‖ SHA-256(TLS certificate SubjectPublicKeyInfo DER)
            ‖ challenge) ‖ 32 zero bytes

The client (:func:`verify_broker`, ``enclaveml run --verify-broker POLICY``) sends a fresh
random challenge, verifies the evidence (``verify_evidence``) and the policy, and checks
the binding against the public key of the TLS certificate *it is connected to*: evidence
relayed from a genuine broker by a different TLS endpoint (a man in the middle) names
another key and is refused (``broker_binding_mismatch``). Only then does the runtime send
its credentials and evidence over that same connection.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Sequence
from datetime import datetime

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from enclaveml.attestation.collateral_source import CollateralSource, resolve_collateral
from enclaveml.attestation.evidence import VerifiedEvidence, verify_evidence
from enclaveml.attestation.policy import Policy, PolicyViolation
from enclaveml.errors import AttestationError, ConfigError

__all__ = ["BROKER_EVIDENCE_PATH", "CHALLENGE_SIZE", "SelfEvidence", "broker_binding", "verify_broker"]

BROKER_EVIDENCE_PATH = "/v1/broker/evidence"
BROKER_LABEL = b"enclaveml broker attestation v1"
CHALLENGE_SIZE = 32

SelfEvidence = Callable[[bytes], bytes]  # report data (64 bytes) -> evidence from the broker's TEE


def _spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def broker_binding(cert: x509.Certificate, challenge: bytes) -> bytes:
    """The 64-byte report data binding the broker's evidence to its TLS key and ``challenge``."""
    if len(challenge) != CHALLENGE_SIZE:
        raise ValueError("the broker attestation challenge is 32 bytes")
    return hashlib.sha256(BROKER_LABEL + b"\x00" + _spki_sha256(cert) + challenge).digest() + bytes(32)


def verify_broker(
    http: httpx.Client,
    policy: Policy,
    *,
    now: datetime,
    sim_trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    collateral: CollateralSource = None,
) -> VerifiedEvidence:
    """Challenge the broker behind ``http`` (an httpx client with its base URL) and verify it.

    Raises ``AttestationError`` (``broker_not_attesting``, ``broker_binding_mismatch``, or the
    verifier's reason) or ``PolicyViolation``; returns the verified evidence otherwise.
    """
    challenge = os.urandom(CHALLENGE_SIZE)
    try:
        with http.stream("GET", BROKER_EVIDENCE_PATH, params={"challenge": challenge.hex()}) as response:
            peer = _peer_certificate(response)  # while the connection is ours, before it returns to the pool
            response.read()
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the key broker: {exc}", "check --broker and --ca") from None
    if response.status_code == 404:
        raise AttestationError(
            "broker_not_attesting",
            "the key broker does not attest itself",
            "start it with `enclaveml broker serve --attest-self ...`, or drop --verify-broker",
        )
    try:
        evidence = base64.b64decode(response.json()["evidence"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise AttestationError(
            "broker_evidence_malformed", "the key broker's evidence answer is malformed", ""
        ) from None
    collateral_now = resolve_collateral(collateral, evidence, now)
    verified = verify_evidence(evidence, now=now, collateral=collateral_now, sim_trusted_keys=sim_trusted_keys)
    if verified.claims.report_data != broker_binding(peer, challenge):
        raise AttestationError(
            "broker_binding_mismatch",
            "the broker's evidence is not bound to the TLS certificate this connection reached "
            "(or to our challenge): a relay or a different server",
            "check --broker; the certificate must be the attested broker's own",
        )
    decision = policy.evaluate(verified.claims, now=now)
    if not decision.allowed:
        raise PolicyViolation(decision)
    return verified


def _peer_certificate(response: httpx.Response) -> x509.Certificate:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    # httpcore hands out ssl.SSLSocket / SSLObject, or the C-level _ssl._SSLSocket: all have
    # getpeercert(binary_form), positional.
    getpeercert = getattr(ssl_object, "getpeercert", None)
    der = getpeercert(True) if callable(getpeercert) else None
    if not der:
        raise AttestationError(
            "broker_not_tls",
            "the broker connection has no TLS certificate to bind its evidence to",
            "use an https:// broker URL",
        )
    return x509.load_der_x509_certificate(der)
