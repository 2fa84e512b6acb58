"""RA-TLS certificates: creation, extraction under every OID, key binding, and real TLS peers."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclaveml.attestation.claims import Claims, TcbStatus, TeeType
from enclaveml.attestation.collateral import load_collateral
from enclaveml.attestation.dcap import verify_quote
from enclaveml.attestation.policy import Policy
from enclaveml.attestation.quote import parse_quote
from enclaveml.attestation.ratls import (
    GRAMINE_LEGACY_QUOTE_OID,
    LEGACY_QUOTE_OID,
    TCG_TAGGED_EVIDENCE_OID,
    Evidence,
    EvidenceVerifier,
    ExtractedEvidence,
    create_ratls_certificate,
    extract_evidence,
    verify_ratls_certificate,
)
from enclaveml.attestation.ratls_tls import (
    accept_verified,
    client_context,
    open_anchor_certificate,
    server_context,
    wrap_client,
)
from enclaveml.attestation.sim import SimulationKey, create_sim_evidence, verify_sim_evidence
from enclaveml.errors import AttestationError, EvidenceParseError, PolicyError

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"
NOW = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)
MEASUREMENT = hashlib.sha384(b"the attested workload").digest()
# What Gramine's certificates carry: the OID content is itself a DER OID (tee-formats.md §2.2).
GRAMINE_OID_DER = bytes.fromhex("060B06092A864886F84D8A3906")
TLS_TIMEOUT = 10.0
ANY_KEY = ec.generate_private_key(ec.SECP384R1())  # shared where the key does not matter


# -- arrange: a simulated TEE, its verifier, and certificates built by hand ---------------


@pytest.fixture(scope="module")
def tee_key() -> SimulationKey:
    return SimulationKey.generate()


def sim_evidence_for(key: SimulationKey, now: datetime) -> Callable[[bytes], bytes]:
    return lambda report_data: create_sim_evidence(key, MEASUREMENT, report_data, b"", now)


def sim_verifier(*trusted: SimulationKey, max_age: timedelta = timedelta(hours=1)) -> EvidenceVerifier:
    def verify(evidence: Evidence, now: datetime) -> Claims:
        assert evidence.kind == "sim"
        keys = [k.public_key for k in trusted]
        return verify_sim_evidence(
            evidence.raw, trusted_keys=keys, expected_nonce=None, now=now, max_age_s=int(max_age.total_seconds())
        )

    return verify


def never_called(evidence: Evidence, now: datetime) -> Claims:
    raise AssertionError("the evidence verifier must not run")


def spki_sha256(key: ec.EllipticCurvePrivateKey) -> bytes:
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def gramine_style_cert(
    key: ec.EllipticCurvePrivateKey, extensions: dict[x509.ObjectIdentifier, bytes], *, not_after: int = 2030
) -> bytes:
    """A certificate shaped like Gramine's ``ra_tls_attest.c`` output, with any extension values."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "RATLS"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GramineDevelopers"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2001, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(not_after, 12, 31, 23, 59, 59, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    )
    for oid, value in extensions.items():
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def extension_values(cert_pem: bytes) -> dict[x509.ObjectIdentifier, bytes]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return {e.oid: e.value.value for e in cert.extensions if isinstance(e.value, x509.UnrecognizedExtension)}


def tcg_value(quote: bytes, claims: bytes) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(60000, [quote, claims]))


def pubkey_hash_claims(alg_id: int, digest: bytes, **more: Any) -> bytes:
    return cbor2.dumps({"pubkey-hash": cbor2.dumps([alg_id, digest]), **more})


@pytest.fixture(scope="module")
def ratls_pair(tee_key: SimulationKey) -> tuple[bytes, bytes]:
    return create_ratls_certificate(sim_evidence_for(tee_key, NOW), kind="sim", now=NOW)


# -- creation and extraction -----------------------------------------------------------


def test_a_new_certificate_carries_both_extensions_and_extraction_prefers_tcg(
    ratls_pair: tuple[bytes, bytes],
) -> None:
    cert_pem, key_pem = ratls_pair
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp384r1"
    assert cert.issuer == cert.subject

    extracted = extract_evidence(cert_pem)

    assert extracted.oid == TCG_TAGGED_EVIDENCE_OID.dotted_string
    assert extracted.present_oids == (TCG_TAGGED_EVIDENCE_OID.dotted_string, GRAMINE_LEGACY_QUOTE_OID.dotted_string)
    assert extracted.evidence.kind == "sim"
    assert extracted.key_binding_ok
    # The claims bytes are exactly Gramine's: a1 6b "pubkey-hash" 58 24 82 01 58 20 <SHA-256(SPKI)>.
    assert extracted.tcg_claims == b"\xa1\x6bpubkey-hash\x58\x24\x82\x01\x58\x20" + spki_sha256(key)
    assert extracted.actual_binding == hashlib.sha256(extracted.tcg_claims).digest()


def test_verification_returns_the_claims_of_the_tee_holding_the_key(
    ratls_pair: tuple[bytes, bytes], tee_key: SimulationKey
) -> None:
    claims = verify_ratls_certificate(ratls_pair[0], sim_verifier(tee_key), now=NOW, policy_check=None)

    assert claims.tee is TeeType.SIM
    assert claims.mr_enclave == MEASUREMENT
    assert claims.report_data[:32] == extract_evidence(ratls_pair[0]).expected_binding
    assert claims.report_data[32:] == bytes(32)


@pytest.mark.parametrize("oid", [GRAMINE_LEGACY_QUOTE_OID, LEGACY_QUOTE_OID], ids=["gramine", "intended"])
def test_legacy_only_certificate_binds_the_hash_of_the_public_key(
    oid: x509.ObjectIdentifier, tee_key: SimulationKey
) -> None:
    cert_pem, key_pem = create_ratls_certificate(sim_evidence_for(tee_key, NOW), kind="sim", now=NOW, embed=[oid])
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    extracted = extract_evidence(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER))

    assert (extracted.oid, extracted.present_oids) == (oid.dotted_string, (oid.dotted_string,))
    assert extracted.key_binding_ok
    assert extracted.actual_binding == spki_sha256(key) == extracted.public_key_hash
    assert extracted.tcg_claims is None
    verify_ratls_certificate(cert_pem, sim_verifier(tee_key), now=NOW, policy_check=None)


def test_tcg_only_certificate_verifies(tee_key: SimulationKey) -> None:
    cert_pem, _ = create_ratls_certificate(
        sim_evidence_for(tee_key, NOW), kind="sim", now=NOW, embed=[TCG_TAGGED_EVIDENCE_OID]
    )

    extracted = extract_evidence(cert_pem)

    assert extracted.present_oids == (TCG_TAGGED_EVIDENCE_OID.dotted_string,)
    assert extracted.key_binding_ok
    verify_ratls_certificate(cert_pem, sim_verifier(tee_key), now=NOW, policy_check=None)


def test_gramine_built_certificate_with_the_misencoded_oid_verifies(tee_key: SimulationKey) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    quote = create_sim_evidence(tee_key, MEASUREMENT, spki_sha256(key) + bytes(32), b"", NOW)
    der = gramine_style_cert(key, {GRAMINE_LEGACY_QUOTE_OID: quote})
    assert GRAMINE_OID_DER in der  # 06 0B 06 09 2A 86 48 86 F8 4D 8A 39 06, as in real Gramine certificates

    claims = verify_ratls_certificate(der, sim_verifier(tee_key), now=NOW, policy_check=None)

    assert claims.mr_enclave == MEASUREMENT


@pytest.mark.parametrize(
    ("vector", "kind"),
    [
        ("dcapqvl_sgx_quote_v3.bin", "sgx-quote"),
        ("dcapqvl_tdx_quote_v4.bin", "tdx-quote"),
        ("dcapqvl_tdx_quote_v5_notcbmatch.bin", "tdx-quote"),
    ],
)
def test_a_real_dcap_quote_is_extracted_but_not_bound_to_the_key(vector: str, kind: str) -> None:
    quote = (VECTORS / "dcap" / vector).read_bytes()
    der = gramine_style_cert(ec.generate_private_key(ec.SECP384R1()), {GRAMINE_LEGACY_QUOTE_OID: quote})
    # Gramine's verifier finds the OID bytes, then 04 82 <u16be length>: our builder writes the same.
    assert GRAMINE_OID_DER + b"\x04\x82" + len(quote).to_bytes(2, "big") in der

    extracted = extract_evidence(der)

    assert extracted.evidence.raw == quote
    assert extracted.evidence.kind == kind
    assert not extracted.key_binding_ok
    if vector.startswith("dcapqvl_sgx"):
        assert extracted.actual_binding == b"Hello, world!" + bytes(19)
    with pytest.raises(AttestationError, match="not bound to the certificate key") as caught:
        verify_ratls_certificate(der, never_called, now=NOW, policy_check=None)
    assert caught.value.reason == "ratls_key_binding_mismatch"


def test_the_kind_and_report_data_agree_with_the_full_quote_parser() -> None:
    for vector in ("dcapqvl_sgx_quote_v3.bin", "dcapqvl_tdx_quote_v4.bin", "dcapqvl_tdx_quote_v5_notcbmatch.bin"):
        quote = (VECTORS / "dcap" / vector).read_bytes()
        der = gramine_style_cert(ec.generate_private_key(ec.SECP384R1()), {LEGACY_QUOTE_OID: quote})

        evidence = extract_evidence(der).evidence
        parsed = parse_quote(quote)

        assert evidence.report_data == parsed.body.report_data
        assert evidence.kind == {TeeType.SGX: "sgx-quote", TeeType.TDX: "tdx-quote"}[parsed.tee]


def test_extracted_dcap_evidence_feeds_a_dcap_verifier() -> None:
    quote = (VECTORS / "dcap" / "dcapqvl_sgx_quote_v3.bin").read_bytes()
    collateral = load_collateral(VECTORS / "dcap" / "dcapqvl_sgx_quote_v3_collateral.json")
    at = collateral.not_before + timedelta(hours=1)

    def dcap_verifier(evidence: Evidence, now: datetime) -> Claims:
        return verify_quote(evidence.raw, collateral, now=now).claims

    evidence = extract_evidence(gramine_style_cert(ANY_KEY, {GRAMINE_LEGACY_QUOTE_OID: quote})).evidence
    claims = dcap_verifier(evidence, at)

    assert claims.tcb_status is TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED
    assert claims.report_data == evidence.report_data


# -- key binding failures --------------------------------------------------------------


def test_legacy_evidence_bound_to_another_key_is_refused(ratls_pair: tuple[bytes, bytes]) -> None:
    stolen = extension_values(ratls_pair[0])[GRAMINE_LEGACY_QUOTE_OID]
    der = gramine_style_cert(ec.generate_private_key(ec.SECP384R1()), {GRAMINE_LEGACY_QUOTE_OID: stolen})

    assert not extract_evidence(der).key_binding_ok
    with pytest.raises(AttestationError, match=r"report_data\[0:32\] = SHA-256\(SPKI\)") as caught:
        verify_ratls_certificate(der, never_called, now=NOW, policy_check=None)
    assert caught.value.reason == "ratls_key_binding_mismatch"


def test_tcg_evidence_copied_to_another_key_fails_on_the_pubkey_hash_claim(ratls_pair: tuple[bytes, bytes]) -> None:
    stolen = extension_values(ratls_pair[0])[TCG_TAGGED_EVIDENCE_OID]
    der = gramine_style_cert(ec.generate_private_key(ec.SECP384R1()), {TCG_TAGGED_EVIDENCE_OID: stolen})

    with pytest.raises(AttestationError, match="claims pubkey-hash") as caught:
        verify_ratls_certificate(der, never_called, now=NOW, policy_check=None)
    assert caught.value.reason == "ratls_key_binding_mismatch"


def test_tcg_claims_rewritten_for_another_key_no_longer_match_the_quote(
    ratls_pair: tuple[bytes, bytes], tee_key: SimulationKey
) -> None:
    quote = cbor2.loads(extension_values(ratls_pair[0])[TCG_TAGGED_EVIDENCE_OID]).value[0]
    key = ec.generate_private_key(ec.SECP384R1())
    der = gramine_style_cert(key, {TCG_TAGGED_EVIDENCE_OID: tcg_value(quote, pubkey_hash_claims(1, spki_sha256(key)))})

    extracted = extract_evidence(der)

    assert extracted.binding == "report_data[0:32] = SHA-256(claims)"
    assert not extracted.key_binding_ok


def test_tcg_claims_may_hash_the_key_with_sha384_and_carry_unknown_claims(tee_key: SimulationKey) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = pubkey_hash_claims(7, hashlib.sha384(spki).digest(), nonce=b"n" * 16, other=[1, {"x": 2}])
    quote = create_sim_evidence(tee_key, MEASUREMENT, hashlib.sha256(claims).digest() + bytes(32), b"", NOW)
    der = gramine_style_cert(key, {TCG_TAGGED_EVIDENCE_OID: tcg_value(quote, claims)})

    claims_out = verify_ratls_certificate(der, sim_verifier(tee_key), now=NOW, policy_check=None)

    assert claims_out.report_data[:32] == hashlib.sha256(claims).digest()


def test_a_verifier_returning_claims_for_other_evidence_is_caught(ratls_pair: tuple[bytes, bytes]) -> None:
    def lying_verifier(evidence: Evidence, now: datetime) -> Claims:
        real = sim_verifier_any(evidence, now)
        return replace(real, report_data=bytes(64))

    with pytest.raises(AttestationError, match="verified report data") as caught:
        verify_ratls_certificate(ratls_pair[0], lying_verifier, now=NOW, policy_check=None)
    assert caught.value.reason == "ratls_key_binding_mismatch"


def sim_verifier_any(evidence: Evidence, now: datetime) -> Claims:
    return verify_sim_evidence(evidence.raw, trusted_keys=None, expected_nonce=None, now=now)


def test_creation_refuses_evidence_not_bound_to_the_requested_report_data(tee_key: SimulationKey) -> None:
    def broken_tee(report_data: bytes) -> bytes:
        return create_sim_evidence(tee_key, MEASUREMENT, bytes(64), b"", NOW)

    with pytest.raises(AttestationError, match="not the one requested") as caught:
        create_ratls_certificate(broken_tee, kind="sim", now=NOW)
    assert caught.value.reason == "ratls_key_binding_mismatch"
    with pytest.raises(ValueError, match="returned sim evidence, not sgx-quote"):
        create_ratls_certificate(sim_evidence_for(tee_key, NOW), kind="sgx-quote", now=NOW)


# -- tampering, validity, malformed input -----------------------------------------------


def flip(der: bytes, at: int) -> bytes:
    return der[:at] + bytes([der[at] ^ 0x01]) + der[at + 1 :]


def test_tampered_extension_bytes_are_refused(ratls_pair: tuple[bytes, bytes], tee_key: SimulationKey) -> None:
    cert_pem = ratls_pair[0]
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    tcg = extension_values(cert_pem)[TCG_TAGGED_EVIDENCE_OID]
    quote = cbor2.loads(tcg).value[0]
    tcg_at, quote_at = der.index(tcg), der.index(quote)
    legacy_at = der.index(extension_values(cert_pem)[GRAMINE_LEGACY_QUOTE_OID])

    # a report-data byte of the TCG quote (sim report_data is at 58..122): the binding breaks
    with pytest.raises(AttestationError, match="not bound") as binding:
        verify_ratls_certificate(flip(der, quote_at + 60), never_called, now=NOW, policy_check=None)
    assert binding.value.reason == "ratls_key_binding_mismatch"
    # the last signature byte of the TCG quote: the binding holds, the evidence signature fails
    with pytest.raises(AttestationError) as signature:
        verify_ratls_certificate(
            flip(der, quote_at + len(quote) - 1), sim_verifier(tee_key), now=NOW, policy_check=None
        )
    assert signature.value.reason == "sim_signature_invalid"
    # a byte of the claims: the pubkey-hash no longer matches the key
    with pytest.raises(AttestationError, match="claims pubkey-hash"):
        verify_ratls_certificate(flip(der, tcg_at + len(tcg) - 1), never_called, now=NOW, policy_check=None)
    # the CBOR tag (d9 ea 60 -> d9 ea 61): malformed
    with pytest.raises(EvidenceParseError, match="CBOR tag 60001"):
        extract_evidence(flip(der, tcg_at + 2))
    # the legacy extension is not consulted while the TCG one is present
    assert extract_evidence(flip(der, legacy_at + 60)).key_binding_ok


def test_expired_and_not_yet_valid_certificates_are_refused(tee_key: SimulationKey) -> None:
    issued = NOW - timedelta(days=100)
    cert_pem, _ = create_ratls_certificate(
        sim_evidence_for(tee_key, issued), kind="sim", now=issued, validity=timedelta(days=30)
    )

    with pytest.raises(AttestationError, match="expired at") as expired:
        verify_ratls_certificate(cert_pem, never_called, now=NOW, policy_check=None)
    assert expired.value.reason == "ratls_certificate_expired"
    with pytest.raises(AttestationError) as early:
        verify_ratls_certificate(cert_pem, never_called, now=issued - timedelta(days=1), policy_check=None)
    assert early.value.reason == "ratls_certificate_not_yet_valid"


def test_a_certificate_without_evidence_is_not_an_ratls_certificate() -> None:
    der = gramine_style_cert(ec.generate_private_key(ec.SECP384R1()), {})

    with pytest.raises(AttestationError) as caught:
        extract_evidence(der)
    assert caught.value.reason == "ratls_no_evidence"


def test_a_certificate_key_that_is_neither_ec_nor_rsa_is_refused(tee_key: SimulationKey) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed25519")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(LEGACY_QUOTE_OID, bytes(200)), critical=False)
        .sign(key, None)
    )

    with pytest.raises(AttestationError) as caught:
        extract_evidence(cert)
    assert caught.value.reason == "ratls_unsupported_key"


@pytest.mark.parametrize(
    "garbage", [b"", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"\x30\x03"]
)
def test_unreadable_certificates_are_parse_errors(garbage: bytes) -> None:
    with pytest.raises(EvidenceParseError, match=r"not a PEM or DER X\.509 certificate"):
        extract_evidence(garbage)


def test_the_policy_check_runs_last_and_its_error_propagates(
    ratls_pair: tuple[bytes, bytes], tee_key: SimulationKey
) -> None:
    strict = Policy(name="no-simulation", mr_enclave=(MEASUREMENT[:32],))
    permissive = Policy(name="dev", allow_simulation=True, mr_enclave=(MEASUREMENT,))

    with pytest.raises(PolicyError):
        verify_ratls_certificate(
            ratls_pair[0], sim_verifier(tee_key), now=NOW, policy_check=lambda c: strict.verify(c, now=NOW)
        )
    claims = verify_ratls_certificate(
        ratls_pair[0], sim_verifier(tee_key), now=NOW, policy_check=lambda c: permissive.verify(c, now=NOW)
    )
    assert claims.insecure


# -- fuzzing: any extension bytes end in a result or a parse error ----------------------

_cbor_leaf = st.one_of(st.integers(-(2**64), 2**64 - 1), st.binary(max_size=40), st.text(max_size=12), st.booleans())
_cbor_values = st.recursive(
    _cbor_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _extract_or_parse_error(der: bytes) -> ExtractedEvidence | None:
    try:
        return extract_evidence(der)
    except EvidenceParseError:
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    oid=st.sampled_from([TCG_TAGGED_EVIDENCE_OID, GRAMINE_LEGACY_QUOTE_OID, LEGACY_QUOTE_OID]),
    value=st.binary(max_size=700),
)
def test_random_extension_bytes_never_crash_extraction(oid: x509.ObjectIdentifier, value: bytes) -> None:
    _extract_or_parse_error(gramine_style_cert(ANY_KEY, {oid: value}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    quote=st.binary(max_size=500) | st.just((VECTORS / "dcap" / "dcapqvl_sgx_quote_v3.bin").read_bytes()[:500]),
    claims=_cbor_values.map(cbor2.dumps)
    | st.builds(pubkey_hash_claims, st.sampled_from([1, 7, 8, 9]), st.binary(max_size=70)),
    tag=st.sampled_from([60000, 60000, 1, 2, 24]),
)
def test_structured_tcg_values_never_crash_extraction(quote: bytes, claims: bytes, tag: int) -> None:
    value = cbor2.dumps(cbor2.CBORTag(tag, [quote, claims]))
    _extract_or_parse_error(gramine_style_cert(ANY_KEY, {TCG_TAGGED_EVIDENCE_OID: value}))


# -- real TLS on 127.0.0.1 --------------------------------------------------------------


class Peer(threading.Thread):
    """Runs one side of a connection in a thread and keeps its result or exception."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as exc:  # reported to the test through .error
            self.error = exc

    def outcome(self) -> Any:
        self.join(TLS_TIMEOUT)
        assert not self.is_alive(), "peer thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(TLS_TIMEOUT)
        yield sock


def connect(listener: socket.socket) -> socket.socket:
    return socket.create_connection(listener.getsockname(), timeout=TLS_TIMEOUT)


def live_pair(key: SimulationKey) -> tuple[bytes, bytes]:
    now = datetime.now(UTC)
    return create_ratls_certificate(sim_evidence_for(key, now), kind="sim", now=now)


def serve_one_message(listener: socket.socket, context: ssl.SSLContext, **kwargs: Any) -> Callable[[], Any]:
    def serve() -> tuple[Claims | None, bytes]:
        conn = accept_verified(listener, context, timeout=TLS_TIMEOUT, **kwargs)
        with conn.sock:
            data = conn.sock.recv(100)
            if data:
                conn.sock.sendall(b"echo:" + data)
            return conn.peer_claims, data

    return serve


def test_client_verifies_the_server_in_the_handshake(listener: socket.socket, tee_key: SimulationKey) -> None:
    server = Peer(serve_one_message(listener, server_context(*live_pair(tee_key))))
    server.start()

    conn = wrap_client(connect(listener), sim_verifier(tee_key), policy_check=None)
    with conn.sock:
        conn.sock.sendall(b"hello")
        reply = conn.sock.recv(100)

    assert conn.peer_claims is not None
    assert conn.peer_claims.mr_enclave == MEASUREMENT
    assert reply == b"echo:hello"
    assert server.outcome() == (None, b"hello")


def test_a_server_with_untrusted_evidence_gets_no_application_byte(
    listener: socket.socket, tee_key: SimulationKey
) -> None:
    server = Peer(serve_one_message(listener, server_context(*live_pair(SimulationKey.generate()))))
    server.start()

    with pytest.raises(AttestationError) as caught:
        wrap_client(connect(listener), sim_verifier(tee_key), policy_check=None)

    assert caught.value.reason == "sim_key_untrusted"
    assert server.outcome() == (None, b"")  # EOF before any data


def test_a_policy_refusal_also_closes_before_any_byte(listener: socket.socket, tee_key: SimulationKey) -> None:
    server = Peer(serve_one_message(listener, server_context(*live_pair(tee_key))))
    server.start()
    strict = Policy(name="hardware-only", mr_enclave=(MEASUREMENT,))

    with pytest.raises(PolicyError):
        wrap_client(
            connect(listener),
            sim_verifier(tee_key),
            policy_check=lambda c: strict.verify(c, now=datetime.now(UTC)),
        )

    assert server.outcome() == (None, b"")


def test_mutual_ratls_both_sides_see_each_others_claims(listener: socket.socket, tee_key: SimulationKey) -> None:
    client_key = SimulationKey.generate()
    context = server_context(*live_pair(tee_key), require_client_ratls=True)
    server = Peer(serve_one_message(listener, context, verifier=sim_verifier(client_key), policy_check=None))
    server.start()
    cert_pem, key_pem = live_pair(client_key)

    conn = wrap_client(
        connect(listener),
        sim_verifier(tee_key),
        policy_check=None,
        context=client_context(cert_pem=cert_pem, key_pem=key_pem),
    )
    with conn.sock:
        conn.sock.sendall(b"mutual")
        assert conn.sock.recv(100) == b"echo:mutual"

    client_claims, data = server.outcome()
    assert data == b"mutual"
    assert (
        client_claims.extra["sim_signer_sha256"]
        == hashlib.sha256(
            client_key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        ).hexdigest()
    )


def test_mutual_ratls_server_refuses_a_client_with_untrusted_evidence(
    listener: socket.socket, tee_key: SimulationKey
) -> None:
    context = server_context(*live_pair(tee_key), require_client_ratls=True)
    server = Peer(serve_one_message(listener, context, verifier=sim_verifier(tee_key), policy_check=None))
    server.start()
    cert_pem, key_pem = live_pair(SimulationKey.generate())

    conn = wrap_client(
        connect(listener),
        sim_verifier(tee_key),
        policy_check=None,
        context=client_context(cert_pem=cert_pem, key_pem=key_pem),
    )
    with pytest.raises(AttestationError) as caught:
        server.outcome()
    with conn.sock:  # TLS 1.3: the client learns only on its first read
        assert conn.sock.recv(100) == b""
    assert caught.value.reason == "sim_key_untrusted"


def test_mutual_ratls_server_refuses_a_client_without_a_certificate(
    listener: socket.socket, tee_key: SimulationKey
) -> None:
    context = server_context(*live_pair(tee_key), require_client_ratls=True)
    server = Peer(serve_one_message(listener, context, verifier=sim_verifier(tee_key), policy_check=None))
    server.start()

    conn = wrap_client(connect(listener), sim_verifier(tee_key), policy_check=None)
    with pytest.raises(ssl.SSLError):
        server.outcome()
    with conn.sock, pytest.raises((ssl.SSLError, ConnectionError)):
        conn.sock.recv(100)


def test_a_ca_verified_server_accepts_an_attested_client(listener: socket.socket, tee_key: SimulationKey) -> None:
    # The secret-provisioning shape (tee-formats.md §2.3): a CA-issued server, an RA-TLS client.
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(2)
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    server_key_pem = server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    context = server_context(server_cert.public_bytes(pem), server_key_pem, require_client_ratls=True)
    server = Peer(serve_one_message(listener, context, verifier=sim_verifier(tee_key), policy_check=None))
    server.start()
    cert_pem, key_pem = live_pair(tee_key)

    conn = wrap_client(
        connect(listener),
        None,
        policy_check=None,
        context=client_context(cert_pem=cert_pem, key_pem=key_pem, server_ca_pem=ca.public_bytes(pem)),
        server_hostname="localhost",
    )
    with conn.sock:
        conn.sock.sendall(b"secret please")
        assert conn.sock.recv(100) == b"echo:secret please"

    client_claims, _ = server.outcome()
    assert conn.peer_claims is None
    assert client_claims.mr_enclave == MEASUREMENT


def test_a_mutual_ratls_context_cannot_be_used_without_verification(tee_key: SimulationKey) -> None:
    context = server_context(*live_pair(tee_key), require_client_ratls=True)

    with socket.socket() as sock:
        with pytest.raises(ValueError, match="accept_verified"):
            context.wrap_socket(sock, server_side=True)
        with pytest.raises(ValueError, match="needs a verifier"):
            accept_verified(sock, context)
    assert open_anchor_certificate().extensions.get_extension_for_class(x509.BasicConstraints).value.ca
