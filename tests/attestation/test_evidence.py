"""The evidence dispatcher: one entry recognises, verifies and describes every kind of evidence,
with exactly the verdicts of the verifiers it dispatches to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pki import FakeIntelPki
from test_maa import NOW as MAA_NOW
from test_maa import PROVIDER, Signer, sgx_payload

from enclaveml.attestation.claims import TcbStatus, TeeType
from enclaveml.attestation.collateral import Collateral, load_collateral
from enclaveml.attestation.dcap import verify_quote
from enclaveml.attestation.evidence import (
    CollateralRequest,
    collateral_request,
    detect_evidence,
    inspect_evidence,
    refusal_without_policy,
    verify_evidence,
    verify_maa_evidence,
)
from enclaveml.attestation.ratls import GRAMINE_LEGACY_QUOTE_OID, create_ratls_certificate
from enclaveml.attestation.sim import SimulationKey, create_sim_evidence
from enclaveml.errors import AttestationError, ConfigError, EvidenceParseError

DCAP = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "dcap"
SGX_V3 = "dcapqvl_sgx_quote_v3"
TDX_V4 = "dcapqvl_tdx_quote_v4"
TDX_V5 = "dcapqvl_tdx_quote_v5_notcbmatch"
INSIDE = {SGX_V3: datetime(2025, 7, 1, tzinfo=UTC), TDX_V4: datetime(2025, 7, 1, tzinfo=UTC)}
INSIDE[TDX_V5] = datetime(2026, 3, 1, tzinfo=UTC)
MEASUREMENT = bytes(range(48))
NOW = datetime(2025, 7, 1, 12, tzinfo=UTC)


def quote(name: str) -> bytes:
    return (DCAP / f"{name}.bin").read_bytes()


def collateral(name: str) -> Collateral:
    return load_collateral(DCAP / f"{name}_collateral.json")


@pytest.fixture(scope="module")
def sim_key() -> SimulationKey:
    return SimulationKey.generate()


def sim_cert(key: SimulationKey, now: datetime = NOW, **kw: object) -> bytes:
    cert, _ = create_ratls_certificate(
        lambda rd: create_sim_evidence(key, MEASUREMENT, rd, b"", now),
        kind="sim",
        now=now,
        **kw,  # type: ignore[arg-type]
    )
    return cert


# -- detection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [(SGX_V3, "sgx-quote"), (TDX_V4, "tdx-quote"), (TDX_V5, "tdx-quote")])
def test_real_quotes_are_recognised(name: str, kind: str) -> None:
    assert detect_evidence(quote(name)) == kind


def test_sim_evidence_pem_and_der_certificates_and_tokens_are_recognised(sim_key: SimulationKey) -> None:
    pem = sim_cert(sim_key)
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert detect_evidence(create_sim_evidence(sim_key, MEASUREMENT, bytes(64), b"", NOW)) == "sim"
    assert detect_evidence(pem) == "ratls-cert"
    assert detect_evidence(der) == "ratls-cert"
    assert detect_evidence(Signer().sign(sgx_payload()).encode() + b"\n") == "maa-token"


@pytest.mark.parametrize("garbage", [b"", b"hello world", b"\x07\x00" + bytes(100)], ids=["empty", "text", "v7"])
def test_anything_else_is_a_parse_error(garbage: bytes) -> None:
    with pytest.raises(EvidenceParseError):
        detect_evidence(garbage)


# -- verification: the same verdicts as the verifiers dispatched to --------------------------------


@pytest.mark.parametrize("name", [SGX_V3, TDX_V4, TDX_V5])
def test_quotes_verify_exactly_as_verify_quote_does(name: str) -> None:
    expected = verify_quote(quote(name), collateral(name), now=INSIDE[name])
    verified = verify_evidence(quote(name), now=INSIDE[name], collateral=collateral(name))
    assert (verified.kind, verified.status, verified.advisories) == (
        detect_evidence(quote(name)), expected.status, expected.advisory_ids
    )  # fmt: skip
    assert verified.claims == expected.claims
    assert verified.ratls_key_binding_ok is None


def test_sgx_v3_status_and_description() -> None:
    verified = verify_evidence(quote(SGX_V3), now=INSIDE[SGX_V3], collateral=collateral(SGX_V3))
    assert verified.status is TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED
    assert verified.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert verified.description == "SGX quote v3"
    assert verified.to_json()["status"] == "ConfigurationAndSWHardeningNeeded"


def test_tdx_v4_trailing_bytes_are_a_warning() -> None:
    verified = verify_evidence(quote(TDX_V4), now=INSIDE[TDX_V4], collateral=collateral(TDX_V4))
    assert verified.status is TcbStatus.UP_TO_DATE
    assert verified.warnings == ("70 bytes after the signature data were ignored",)


def test_a_quote_without_collateral_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="needs collateral"):
        verify_evidence(quote(SGX_V3), now=INSIDE[SGX_V3], collateral=None)


def test_expired_collateral_names_the_step() -> None:
    with pytest.raises(AttestationError) as caught:
        verify_evidence(quote(SGX_V3), now=datetime(2026, 7, 1, tzinfo=UTC), collateral=collateral(SGX_V3))
    assert caught.value.reason in ("collateral_expired", "crl_expired")


def test_an_maa_token_is_sent_to_its_own_verifier() -> None:
    with pytest.raises(ConfigError, match="MAA token") as caught:
        verify_evidence(Signer().sign(sgx_payload()).encode(), now=MAA_NOW, collateral=None)
    assert "--maa-token" in caught.value.hint


def test_sim_evidence_is_insecure_and_warns_when_no_key_is_pinned(sim_key: SimulationKey) -> None:
    evidence = create_sim_evidence(sim_key, MEASUREMENT, bytes(64), b"", NOW)
    verified = verify_evidence(evidence, now=NOW, collateral=None)
    assert (verified.kind, verified.status, verified.claims.insecure) == ("sim", TcbStatus.SIMULATED, True)
    assert "no trusted simulation key" in verified.warnings[0]
    pinned = verify_evidence(evidence, now=NOW, collateral=None, sim_trusted_keys=[sim_key.public_key])
    assert pinned.warnings == ()


def test_sim_evidence_from_an_untrusted_key_or_too_old_is_refused(sim_key: SimulationKey) -> None:
    evidence = create_sim_evidence(sim_key, MEASUREMENT, bytes(64), b"", NOW)
    other = SimulationKey.generate().public_key
    with pytest.raises(AttestationError) as untrusted:
        verify_evidence(evidence, now=NOW, collateral=None, sim_trusted_keys=[other])
    with pytest.raises(AttestationError) as old:
        verify_evidence(evidence, now=NOW + timedelta(seconds=61), collateral=None, sim_max_age_s=60)
    assert (untrusted.value.reason, old.value.reason) == ("sim_key_untrusted", "evidence_expired")


# -- RA-TLS certificates ------------------------------------------------------------------------


def test_ratls_certificate_with_sim_evidence(sim_key: SimulationKey) -> None:
    verified = verify_evidence(sim_cert(sim_key), now=NOW, collateral=None, sim_trusted_keys=[sim_key.public_key])
    assert (verified.kind, verified.inner_kind, verified.ratls_key_binding_ok) == ("ratls-cert", "sim", True)
    assert verified.claims.mr_enclave == MEASUREMENT
    assert verified.ratls_oid == "2.23.133.5.4.9"  # the TCG extension is preferred
    assert verified.description == "RA-TLS certificate with simulated evidence"


def test_ratls_certificate_with_only_the_legacy_extension(sim_key: SimulationKey) -> None:
    cert = sim_cert(sim_key, embed=[GRAMINE_LEGACY_QUOTE_OID])
    verified = verify_evidence(cert, now=NOW, collateral=None)
    assert verified.ratls_oid == GRAMINE_LEGACY_QUOTE_OID.dotted_string


def test_ratls_certificate_with_a_dcap_quote_bound_to_its_key() -> None:
    pki = FakeIntelPki()
    cert, _ = create_ratls_certificate(lambda rd: pki.sgx_quote(report_data=rd), kind="sgx-quote", now=pki.now)
    fake = Collateral.from_dict(pki.collateral(pki.tcb_info_sgx(), pki.qe_identity()))
    verified = verify_evidence(cert, now=pki.now, collateral=fake, root_ca=pki.root.cert)
    assert (verified.inner_kind, verified.status, verified.ratls_key_binding_ok) == ("sgx-quote", "UpToDate", True)
    assert verified.dcap is not None
    assert collateral_request(cert) == CollateralRequest("00A067110000", "sgx", "processor")


def cert_carrying(extensions: dict[x509.ObjectIdentifier, bytes]) -> bytes:
    """A self-signed certificate for a fresh key carrying these evidence extensions, as is."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RATLS")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2001, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2030, 12, 31, tzinfo=UTC))
    )
    for oid, value in extensions.items():
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_a_real_quote_in_a_certificate_is_shown_but_not_bound_to_its_key() -> None:
    cert = cert_carrying({GRAMINE_LEGACY_QUOTE_OID: quote(SGX_V3)})
    report = inspect_evidence(cert)
    assert (report.kind, report.inner_kind, report.fields["ratls.key_binding_ok"]) == ("ratls-cert", "sgx-quote", False)
    assert report.fields["mr_enclave"] == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert "not bound to the certificate key" in report.warnings[0]
    with pytest.raises(AttestationError) as caught:
        verify_evidence(cert, now=INSIDE[SGX_V3], collateral=collateral(SGX_V3))
    assert caught.value.reason == "ratls_key_binding_mismatch"


def test_sim_evidence_moved_to_another_key_breaks_the_binding(sim_key: SimulationKey) -> None:
    source = x509.load_pem_x509_certificate(sim_cert(sim_key))
    moved = cert_carrying(
        {e.oid: e.value.value for e in source.extensions if isinstance(e.value, x509.UnrecognizedExtension)}
    )
    with pytest.raises(AttestationError) as caught:
        verify_evidence(moved, now=NOW, collateral=None)
    assert caught.value.reason == "ratls_key_binding_mismatch"


# -- acceptance without a policy ---------------------------------------------------------------


def test_without_a_policy_simulation_and_tcb_not_supported_are_refused(sim_key: SimulationKey) -> None:
    sim = verify_evidence(create_sim_evidence(sim_key, MEASUREMENT, bytes(64), b"", NOW), now=NOW, collateral=None)
    v5 = verify_evidence(quote(TDX_V5), now=INSIDE[TDX_V5], collateral=collateral(TDX_V5))
    v3 = verify_evidence(quote(SGX_V3), now=INSIDE[SGX_V3], collateral=collateral(SGX_V3))
    sim_refusal, v5_refusal = refusal_without_policy(sim), refusal_without_policy(v5)
    assert sim_refusal is not None
    assert sim_refusal.reason == "simulation_not_allowed"
    assert v5_refusal is not None
    assert v5_refusal.reason == "tcb_not_supported"
    assert "TcbNotSupported" in v5_refusal.what
    assert refusal_without_policy(v3) is None


# -- collateral requests and inspection -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (SGX_V3, CollateralRequest("00A067110000", "sgx", "processor")),
        (TDX_V4, CollateralRequest("B0C06F000000", "tdx", "platform")),
        (TDX_V5, CollateralRequest("90C06F000000", "tdx", "platform")),
    ],
)
def test_collateral_request_names_platform_tee_and_pck_ca(name: str, expected: CollateralRequest) -> None:
    assert collateral_request(quote(name)) == expected


def test_sim_evidence_needs_no_collateral(sim_key: SimulationKey) -> None:
    assert collateral_request(create_sim_evidence(sim_key, MEASUREMENT, bytes(64), b"", NOW)) is None
    assert collateral_request(sim_cert(sim_key)) is None


def test_inspect_sgx_v3_shows_identity_and_decoded_attributes() -> None:
    report = inspect_evidence(quote(SGX_V3))
    assert report.fields["mr_enclave"] == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert report.fields["mr_signer"] == "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    assert report.fields["attributes.flags"] == ["INIT", "MODE64BIT"]
    assert report.fields["debug"] is False
    assert report.fields["report_data"] == b"Hello, world!".hex() + "00" * 51
    assert (report.fields["pck.fmspc"], report.warnings) == ("00a067110000", ())


def test_inspect_tdx_shows_td_fields_and_warns_about_trailing_bytes() -> None:
    v4, v5 = inspect_evidence(quote(TDX_V4)), inspect_evidence(quote(TDX_V5))
    assert str(v4.fields["mr_td"]).startswith("91eb2b44d141d4ece09f0c75c2c53d24")
    assert v4.fields["td_attributes.flags"] == ["SEPT_VE_DISABLE"]
    assert v4.fields["xfam"] == "e702060000000000"
    assert v4.fields["rtmr3"] == "00" * 48
    assert v4.warnings == ("70 bytes after the signature data (ignored, as Intel's QVL does)",)
    assert "tee_tcb_svn2" in v5.fields
    assert "tee_tcb_svn2" not in v4.fields


def test_inspect_truncated_quote_names_the_field() -> None:
    with pytest.raises(EvidenceParseError, match="signature_data_len"):
        inspect_evidence(quote(SGX_V3)[:3000])


# -- MAA ------------------------------------------------------------------------------------------


def test_maa_token_verifies_into_sgx_claims() -> None:
    signer = Signer()
    verified = verify_maa_evidence(
        signer.sign(sgx_payload()) + "\n", {"keys": [signer.jwk()]}, issuer=PROVIDER, now=MAA_NOW
    )
    assert (verified.kind, verified.claims.tee, verified.status) == ("maa-token", TeeType.SGX, TcbStatus.UP_TO_DATE)
    assert verified.description == "MAA token (sgx; TCB verdict by MAA)"
    assert verified.warnings == ()
