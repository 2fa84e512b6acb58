"""RA-TLS for the model server: the server's TLS key is attested; clients verify, then pin.

Server side (``ratls_server_tls``): inside the TEE, a fresh key and its self-signed RA-TLS
certificate carrying evidence bound to that key (``attestation.ratls``, Gramine compatible),
with SANs so that ordinary TLS clients can check the host name. It is a normal ``ServerTls``:
gRPC and REST serve it like any other certificate, optionally with mutual TLS.

Client side: gRPC Python has no certificate-verification callback, so evidence cannot be
checked inside gRPC's handshake. Instead the client *verifies, then pins*
(``docs/serving-tls.md`` argues why this is as strong as checking every handshake):

1. ``fetch_verified_server_certificate``: one TLS handshake that accepts any certificate
   (``ssl.CERT_NONE``; nothing is sent over it), then ``verify_ratls_certificate``: key
   binding, validity window, the evidence (``verify_evidence``: DCAP quote with collateral, or
   simulated evidence) and the policy (``Policy.verify``: measurements, debug, TCB, and
   simulation only with ``allow_simulation``). Returns the certificate's PEM.
2. The caller makes that exact certificate the *only* trust root of the real channel:
   ``channel_credentials(ca=None, crt=pem, key=None)`` with ``pinned_channel_options`` (gRPC),
   or ``client_ssl_context(ca=None, crt=pem, key=None, check_hostname=False)`` (REST). A
   handshake then succeeds only with a server holding the attested private key; a different
   certificate presented later (a restarted replica, an impostor) fails it, and the client
   must verify again.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from enclaveml.attestation.claims import Claims
from enclaveml.attestation.collateral_source import CollateralSource, resolve_collateral
from enclaveml.attestation.evidence import verify_evidence
from enclaveml.attestation.policy import Policy
from enclaveml.attestation.ratls import (
    DEFAULT_VALIDITY,
    Evidence,
    EvidenceKind,
    EvidenceVerifier,
    create_ratls_certificate,
    verify_ratls_certificate,
)
from enclaveml.attestation.tee import Tee
from enclaveml.errors import AttestationError, ConfigError
from enclaveml.serving.certs import parse_san
from enclaveml.serving.tls import ServerTls

__all__ = [
    "DEFAULT_NAMES",
    "SIM_EVIDENCE_MAX_AGE",
    "evidence_verifier",
    "fetch_verified_server_certificate",
    "pinned_channel_options",
    "ratls_server_tls",
    "verify_server_certificate",
]

logger = logging.getLogger("enclaveml.serving")

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
# Simulated evidence carries its issue time; a server's certificate lives as long as the server,
# so its evidence may be as old as the certificate's validity (the broker's 300 s is for fresh
# per-request evidence).
SIM_EVIDENCE_MAX_AGE = DEFAULT_VALIDITY
_KINDS: dict[str, EvidenceKind] = {"sgx": "sgx-quote", "tdx": "tdx-quote", "sim": "sim"}
_ALPN = ["h2", "http/1.1"]  # gRPC servers want h2; REST servers speak http/1.1


# -- server ----------------------------------------------------------------------------------


def ratls_server_tls(
    tee: Tee,
    *,
    now: datetime,
    names: Sequence[str] = (),
    client_ca_pem: bytes | None = None,
    validity: timedelta = DEFAULT_VALIDITY,
) -> ServerTls:
    """A fresh EC P-384 key and its RA-TLS certificate with evidence from ``tee``.

    Subject CN is the first of ``names`` (else ``localhost``); SANs are ``names`` plus
    localhost, 127.0.0.1 and ::1. ``client_ca_pem`` additionally requires client certificates
    from that CA (mutual TLS). The key lives only in the returned value (TEE memory).
    """
    kind = _KINDS.get(tee.kind)
    if kind is None:
        raise ConfigError(f"RA-TLS has no evidence format for a {tee.kind} TEE", "serve with --tee sgx, tdx or sim")
    sans: list[x509.GeneralName] = list(dict.fromkeys(parse_san(name) for name in [*names, *DEFAULT_NAMES]))
    common_name = str(sans[0].value)
    if len(common_name) > 64:  # X.520 ub-common-name
        raise ConfigError(f"the first name {common_name!r} is too long for a common name", "name a shorter one first")
    cert_pem, key_pem = create_ratls_certificate(
        tee.evidence, kind=kind, now=now, common_name=common_name, validity=validity
    )
    return ServerTls(_with_sans(cert_pem, key_pem, sans), key_pem, client_ca_pem)


def _with_sans(cert_pem: bytes, key_pem: bytes, sans: list[x509.GeneralName]) -> bytes:
    """The same key, subject, validity and extensions (evidence included), plus the SANs.

    The evidence binds the *key* (tee-formats.md §2.2), so re-signing keeps it valid.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("create_ratls_certificate makes EC keys")
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# -- client ----------------------------------------------------------------------------------


def evidence_verifier(
    *,
    sim_trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    collateral: CollateralSource = None,
    sim_max_age: timedelta = SIM_EVIDENCE_MAX_AGE,
) -> EvidenceVerifier:
    """Verify embedded evidence as ``attest verify`` and the broker do (``verify_evidence``).

    DCAP quotes need ``collateral`` (a ``Collateral`` or a source such as a PCCS); simulated
    evidence is checked against ``sim_trusted_keys`` (``None``: any signer, with a warning).
    """

    def verify(evidence: Evidence, at: datetime) -> Claims:
        found = resolve_collateral(collateral, evidence.raw, at)
        verified = verify_evidence(
            evidence.raw,
            now=at,
            collateral=found,
            sim_trusted_keys=sim_trusted_keys,
            sim_max_age_s=int(sim_max_age.total_seconds()),
        )
        for warning in verified.warnings:
            logger.warning("RA-TLS server evidence: %s", warning)
        return verified.claims

    return verify


def verify_server_certificate(
    cert: bytes, policy: Policy, *, now: datetime, verifier: EvidenceVerifier | None = None
) -> Claims:
    """Verify an RA-TLS server certificate (PEM or DER) against ``policy``; its claims.

    Raises ``AttestationError`` naming the failed step (``ratls_no_evidence``,
    ``ratls_key_binding_mismatch``, ``ratls_certificate_expired``, the evidence verifier's
    reason) or ``PolicyViolation`` naming the failed check (``MR_ENCLAVE``, debug mode,
    ``allow_simulation``, ...).
    """
    check = verifier if verifier is not None else evidence_verifier()
    return verify_ratls_certificate(cert, check, now=now, policy_check=lambda claims: policy.verify(claims, now=now))


def fetch_verified_server_certificate(
    host: str,
    port: int,
    policy: Policy,
    *,
    now: datetime,
    verifier: EvidenceVerifier | None = None,
    server_name: str | None = None,
    timeout: float = 10.0,
) -> bytes:
    """Step 1 of verify-then-pin (module docstring): the server's verified certificate, as PEM.

    ``verifier`` defaults to ``evidence_verifier()`` (simulated evidence from any signer, no
    collateral: DCAP quotes then fail until collateral is given). ``server_name`` is sent as
    SNI (default ``host``). Raises ``ConfigError`` when the server cannot be reached or does
    not speak TLS, else what ``verify_server_certificate`` raises.
    """
    der = _peer_certificate(host, port, server_name or host, timeout)
    verify_server_certificate(der, policy, now=now, verifier=verifier)
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def pinned_channel_options(cert_pem: bytes, host: str) -> list[tuple[str, str]]:
    """gRPC channel options for a pinned certificate reached as ``host``.

    gRPC still checks the host name against the certificate's SANs; when ``host`` is not among
    them (e.g. a pod IP), name one that is: the pin, not the name, identifies the server.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        dns: list[str] = []
        addresses: list[str] = []
    else:
        dns = names.get_values_for_type(x509.DNSName)
        addresses = [str(a) for a in names.get_values_for_type(x509.IPAddress)]
    try:
        wanted = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        wanted = host.lower()
    if wanted in addresses or wanted in (d.lower() for d in dns):
        return []
    common_names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    override = (dns or common_names or [""])[0]
    if not override:
        raise ConfigError("the pinned certificate names no host", "issue it with ratls_server_tls(names=...)")
    return [("grpc.ssl_target_name_override", override)]


def _peer_certificate(host: str, port: int, server_name: str, timeout: float) -> bytes:
    """The leaf certificate ``host:port`` presents; nothing is sent after the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # trust comes from the evidence, checked next
    context.set_alpn_protocols(_ALPN)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=_sni(server_name)) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError as exc:  # includes ssl.SSLError and TimeoutError
        reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else exc.strerror or type(exc).__name__
        raise ConfigError(
            f"cannot complete a TLS handshake with {host}:{port}: {reason}",
            "check the address and that the server serves TLS",
        ) from None
    if not der:
        raise AttestationError(
            "ratls_no_peer_certificate", f"{host}:{port} presented no certificate", "is it an RA-TLS server?"
        )
    return der


def _sni(name: str) -> str | None:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return name
    return None  # SNI carries host names only (RFC 6066 §3)
