"""DCAP quote verification: the three real vectors give exactly Intel's verdicts, and every
tampered, expired, revoked or mismatched input fails at its own step with its own reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pki import (
    DEFAULT_CPU_SVN,
    DEFAULT_PCE_SVN,
    DEFAULT_TEE_TCB_SVN,
    FakeIntelPki,
    enclave_level,
    issue,
    make_crl,
    tcb_level,
)

from enclaveml.attestation.claims import TcbStatus, TeeType
from enclaveml.attestation.collateral import Collateral
from enclaveml.attestation.dcap import INTEL_SGX_ROOT_CA, INTEL_SGX_ROOT_CA_SHA256, DcapResult, verify_quote
from enclaveml.attestation.quote import parse_quote
from enclaveml.errors import AttestationError, EvidenceParseError

DCAP = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "dcap"


@dataclass(frozen=True)
class Vector:
    quote: bytes
    collateral: dict[str, str]

    @property
    def parsed_collateral(self) -> Collateral:
        return Collateral.from_dict(self.collateral)

    @property
    def now(self) -> datetime:
        """The middle of the collateral's validity window."""
        c = self.parsed_collateral
        return c.not_before + (c.expiry - c.not_before) / 2

    def verify(self, quote: bytes | None = None, collateral: dict[str, str] | None = None) -> DcapResult:
        return verify_quote(
            self.quote if quote is None else quote,
            Collateral.from_dict(self.collateral if collateral is None else collateral),
            now=self.now,
        )


def _vector(stem: str) -> Vector:
    return Vector(
        (DCAP / f"{stem}.bin").read_bytes(),
        json.loads((DCAP / f"{stem}_collateral.json").read_text()),
    )


VECTORS = {
    "sgx_v3": _vector("dcapqvl_sgx_quote_v3"),
    "tdx_v4": _vector("dcapqvl_tdx_quote_v4"),
    "tdx_v5": _vector("dcapqvl_tdx_quote_v5_notcbmatch"),
}


# -- the real vectors -------------------------------------------------------------------------------


def test_sgx_v3_vector_is_configuration_and_sw_hardening_needed() -> None:
    result = VECTORS["sgx_v3"].verify()

    assert result.status is TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED
    assert result.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert result.qe_tcb_status is TcbStatus.UP_TO_DATE
    assert result.tdx_module_status is None
    claims = result.claims
    assert (claims.tee, claims.source, claims.debug) == (TeeType.SGX, "dcap-quote-v3", False)
    assert claims.tcb_status is result.status
    assert claims.advisory_ids == result.advisory_ids
    assert claims.mr_enclave is not None
    assert claims.mr_enclave.hex() == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert claims.mr_signer is not None
    assert claims.mr_signer.hex() == "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    assert (claims.isv_prod_id, claims.isv_svn) == (0, 0)
    assert claims.report_data == b"Hello, world!".ljust(64, b"\x00")
    assert claims.fmspc == "00a067110000"
    assert claims.collateral_expiry == datetime.fromisoformat("2025-07-19T10:01:18+00:00")


def test_tdx_v4_vector_is_up_to_date() -> None:
    result = VECTORS["tdx_v4"].verify()

    assert result.status is TcbStatus.UP_TO_DATE
    assert result.advisory_ids == ()
    assert result.tdx_module_status is TcbStatus.UP_TO_DATE
    claims = result.claims
    assert (claims.tee, claims.source, claims.debug) == (TeeType.TDX, "dcap-quote-v4", False)
    assert claims.mr_td is not None
    assert claims.mr_td.hex().startswith("91eb2b44d141d4ec")
    assert claims.rtmrs is not None
    assert len(claims.rtmrs) == 4
    assert claims.td_attributes == bytes.fromhex("0000001000000000")
    assert claims.fmspc == "b0c06f000000"
    assert claims.collateral_expiry == datetime.fromisoformat("2025-07-19T10:00:35+00:00")


def test_tdx_v5_vector_is_tcb_not_supported() -> None:
    result = VECTORS["tdx_v5"].verify()

    assert result.status is TcbStatus.TCB_NOT_SUPPORTED  # PCK component 8 is 3, every level needs 5
    assert result.advisory_ids == ()
    assert result.claims.source == "dcap-quote-v5"
    assert result.claims.tcb_status is TcbStatus.TCB_NOT_SUPPORTED
    assert "tee_tcb_svn2" in result.claims.extra


@pytest.mark.parametrize(
    ("name", "start", "end"),
    [
        ("sgx_v3", "2025-06-19T10:56:11+00:00", "2025-07-19T10:01:18+00:00"),
        ("tdx_v4", "2025-06-19T10:32:27+00:00", "2025-07-19T10:00:35+00:00"),
        ("tdx_v5", "2026-02-18T10:58:51+00:00", "2026-03-20T10:41:15+00:00"),
    ],
)
def test_collateral_window_matches_the_vectors_readme(name: str, start: str, end: str) -> None:
    collateral = VECTORS[name].parsed_collateral

    assert collateral.not_before == datetime.fromisoformat(start)
    assert collateral.expiry == datetime.fromisoformat(end)
    for now in (collateral.not_before, collateral.expiry):  # both edges are inside
        verify_quote(VECTORS[name].quote, collateral, now=now)


@pytest.mark.parametrize(
    ("name", "before", "after"),
    [
        ("sgx_v3", "collateral_not_yet_valid", "collateral_expired"),  # QE Identity expires first
        ("tdx_v4", "collateral_not_yet_valid", "crl_expired"),  # the PCK CRL expires first
        ("tdx_v5", "collateral_not_yet_valid", "crl_expired"),
    ],
)
def test_one_second_outside_the_window_fails(name: str, before: str, after: str) -> None:
    vector = VECTORS[name]
    collateral = vector.parsed_collateral
    second = timedelta(seconds=1)

    with pytest.raises(AttestationError) as early:
        verify_quote(vector.quote, collateral, now=collateral.not_before - second)
    with pytest.raises(AttestationError) as late:
        verify_quote(vector.quote, collateral, now=collateral.expiry + second)

    assert (early.value.reason, late.value.reason) == (before, after)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_after_the_tcb_info_expires_collateral_expired(name: str) -> None:
    vector = VECTORS[name]
    collateral = vector.parsed_collateral

    with pytest.raises(AttestationError, match="TCB Info expired") as caught:
        verify_quote(vector.quote, collateral, now=collateral.tcb_info.next_update + timedelta(seconds=1))

    assert caught.value.reason == "collateral_expired"


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


# Which region of a quote a one-bit change hits, and the step that must notice it.
_QUOTE_REGIONS: dict[str, tuple[Callable[[Any], int], str]] = {
    "header": (lambda q: 28, "quote_signature_invalid"),  # user_data
    "body": (lambda q: q.layout.body + (320 if q.body_type == 1 else 520), "quote_signature_invalid"),  # REPORTDATA
    "quote_signature": (lambda q: q.layout.quote_signature + 7, "quote_signature_invalid"),
    "attestation_key": (lambda q: q.layout.attestation_key + 7, "qe_report_data_mismatch"),
    "qe_report": (lambda q: q.layout.qe_report + 64, "qe_report_signature_invalid"),  # QE MRENCLAVE
    "qe_report_signature": (lambda q: q.layout.qe_report_signature + 7, "qe_report_signature_invalid"),
    "qe_auth_data": (lambda q: q.layout.qe_auth_data, "qe_report_data_mismatch"),
}


@pytest.mark.parametrize("region", sorted(_QUOTE_REGIONS))
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_one_flipped_bit_in_a_signed_region_fails_its_step(name: str, region: str) -> None:
    vector = VECTORS[name]
    offset_of, reason = _QUOTE_REGIONS[region]

    with pytest.raises(AttestationError) as caught:
        vector.verify(quote=_flip(vector.quote, offset_of(parse_quote(vector.quote))))

    assert caught.value.reason == reason


def _edit(collateral: dict[str, str], key: str, change: Callable[[str], str]) -> dict[str, str]:
    return {**collateral, key: change(collateral[key])}


def _flip_last_hex_digit(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


def _lowercase_first_hex_letter(text: str, field: str) -> str:
    """Change the signed bytes without changing what they mean (hex is case-insensitive)."""
    start = text.index(f'"{field}":"') + len(field) + 4
    for i in range(start, len(text)):
        if text[i] in "ABCDEF":
            return text[:i] + text[i].lower() + text[i + 1 :]
    raise AssertionError(f"no hex letter in {field}")


_COLLATERAL_EDITS: dict[str, tuple[str, Callable[[str], str], str]] = {
    "tcb_info_json": ("tcb_info", lambda t: _lowercase_first_hex_letter(t, "fmspc"), "tcb_info_signature_invalid"),
    "tcb_info_signature": ("tcb_info_signature", _flip_last_hex_digit, "tcb_info_signature_invalid"),
    "qe_identity_json": (
        "qe_identity",
        lambda t: _lowercase_first_hex_letter(t, "mrsigner"),
        "qe_identity_signature_invalid",
    ),
    "qe_identity_signature": ("qe_identity_signature", _flip_last_hex_digit, "qe_identity_signature_invalid"),
    "root_ca_crl": ("root_ca_crl", _flip_last_hex_digit, "crl_signature_invalid"),
    "pck_crl": ("pck_crl", _flip_last_hex_digit, "crl_signature_invalid"),
}


@pytest.mark.parametrize("edit", sorted(_COLLATERAL_EDITS))
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_tampered_collateral_fails_its_signature_check(name: str, edit: str) -> None:
    key, change, reason = _COLLATERAL_EDITS[edit]
    vector = VECTORS[name]

    with pytest.raises(AttestationError) as caught:
        vector.verify(collateral=_edit(vector.collateral, key, change))

    assert caught.value.reason == reason


def test_collateral_for_another_tee_is_refused() -> None:
    sgx, tdx = VECTORS["sgx_v3"], VECTORS["tdx_v4"]
    mixed = {**sgx.collateral, **{k: tdx.collateral[k] for k in ("tcb_info", "tcb_info_signature")}}

    with pytest.raises(AttestationError, match="TCB Info is TDX") as caught:
        sgx.verify(collateral=mixed)

    assert caught.value.reason == "tcb_info_mismatch"


def test_a_real_quote_under_another_pinned_root_is_root_ca_mismatch() -> None:
    vector = VECTORS["sgx_v3"]

    with pytest.raises(AttestationError, match="SHA-256") as caught:
        verify_quote(vector.quote, vector.parsed_collateral, now=vector.now, root_ca=FakeIntelPki().root.cert)

    assert caught.value.reason == "root_ca_mismatch"


def test_the_packaged_root_is_intels() -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    assert INTEL_SGX_ROOT_CA.public_bytes(Encoding.DER) == (DCAP / "intel_sgx_root_ca.der").read_bytes()
    assert INTEL_SGX_ROOT_CA_SHA256 == "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"


def test_a_malformed_quote_is_a_parse_error() -> None:
    vector = VECTORS["sgx_v3"]

    with pytest.raises(EvidenceParseError):
        vector.verify(quote=vector.quote[:100])


def test_now_must_be_timezone_aware() -> None:
    vector = VECTORS["sgx_v3"]

    with pytest.raises(ValueError, match="timezone"):
        verify_quote(vector.quote, vector.parsed_collateral, now=datetime(2025, 7, 1))


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(VECTORS)), position=st.integers(min_value=0), byte=st.integers(0, 255))
def test_any_changed_quote_byte_is_refused_or_harmless(name: str, position: int, byte: int) -> None:
    vector = VECTORS[name]
    data = bytearray(vector.quote)
    position %= parse_quote(vector.quote).layout.end  # padding is not signed
    changed = data[position] != byte
    data[position] = byte
    try:
        result = vector.verify(quote=bytes(data))
    except AttestationError:
        return
    # Only unsigned bytes may change without failing: the PCK chain's PEM text is checked
    # by certificate signatures, so an accepted change must leave the decoded chain intact.
    assert not changed or position >= parse_quote(vector.quote).layout.pck_chain
    assert result.status is vector.verify().status


# -- a fake Intel PKI: revocation, expiry and mismatches ------------------------------------------


def _verify(pki: FakeIntelPki, quote: bytes, collateral: dict[str, str], now: datetime | None = None) -> DcapResult:
    return verify_quote(quote, Collateral.from_dict(collateral), now=now or pki.now, root_ca=pki.root.cert)


def _reason(pki: FakeIntelPki, quote: bytes, collateral: dict[str, str], now: datetime | None = None) -> str:
    with pytest.raises(AttestationError) as caught:
        _verify(pki, quote, collateral, now)
    return caught.value.reason


@pytest.fixture(scope="module")
def pki() -> FakeIntelPki:
    return FakeIntelPki()


@pytest.fixture(scope="module")
def sgx_collateral(pki: FakeIntelPki) -> dict[str, str]:
    return pki.collateral(pki.tcb_info_sgx(), pki.qe_identity())


@pytest.fixture(scope="module")
def tdx_collateral(pki: FakeIntelPki) -> dict[str, str]:
    return pki.collateral(pki.tcb_info_tdx(), pki.qe_identity(tdx=True))


def test_fake_pki_quotes_verify_up_to_date(
    pki: FakeIntelPki, sgx_collateral: dict[str, str], tdx_collateral: dict[str, str]
) -> None:
    assert _verify(pki, pki.sgx_quote(), sgx_collateral).status is TcbStatus.UP_TO_DATE
    assert _verify(pki, pki.tdx_quote(version=4), tdx_collateral).status is TcbStatus.UP_TO_DATE
    assert _verify(pki, pki.tdx_quote(version=5), tdx_collateral).status is TcbStatus.UP_TO_DATE


def test_a_fake_quote_under_intels_root_is_root_ca_mismatch(pki: FakeIntelPki, sgx_collateral: dict[str, str]) -> None:
    with pytest.raises(AttestationError) as caught:
        verify_quote(pki.sgx_quote(), Collateral.from_dict(sgx_collateral), now=pki.now)

    assert caught.value.reason == "root_ca_mismatch"


def test_revoked_pck_leaf(pki: FakeIntelPki) -> None:
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), pck_crl=pki.crl(pki.pck_ca, [pki.pck.cert]))

    assert _reason(pki, pki.sgx_quote(), collateral) == "pck_revoked"


def test_revoked_pck_ca(pki: FakeIntelPki) -> None:
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), root_crl=pki.crl(pki.root, [pki.pck_ca.cert]))

    assert _reason(pki, pki.sgx_quote(), collateral) == "pck_ca_revoked"


def test_revoked_tcb_signing_certificate(pki: FakeIntelPki) -> None:
    root_crl = pki.crl(pki.root, [pki.tcb_signing.cert])
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), root_crl=root_crl)

    assert _reason(pki, pki.sgx_quote(), collateral) == "tcb_signing_revoked"


def test_revoked_root(pki: FakeIntelPki) -> None:
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), root_crl=pki.crl(pki.root, [pki.root.cert]))

    assert _reason(pki, pki.sgx_quote(), collateral) == "root_ca_revoked"


@pytest.mark.parametrize(
    ("which", "window", "reason"),
    [
        ("root", (1, 30), "crl_not_yet_valid"),
        ("root", (-30, -1), "crl_expired"),
        ("pck", (1, 30), "crl_not_yet_valid"),
        ("pck", (-30, -1), "crl_expired"),
    ],
)
def test_crl_outside_its_window(pki: FakeIntelPki, which: str, window: tuple[int, int], reason: str) -> None:
    moments = (pki.now + timedelta(days=window[0]), pki.now + timedelta(days=window[1]))
    crl = pki.crl(pki.root if which == "root" else pki.pck_ca, window=moments)
    if which == "root":
        collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), root_crl=crl)
    else:
        collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), pck_crl=crl)

    assert _reason(pki, pki.sgx_quote(), collateral) == reason


def test_pck_crl_of_another_ca_is_crl_issuer_mismatch(pki: FakeIntelPki) -> None:
    other_ca = issue("Intel SGX PCK Platform CA", pki.root, ca=True, not_before=pki.now, not_after=pki.now)
    crl = make_crl(other_ca, this_update=pki.now, next_update=pki.now + timedelta(days=1))
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), pck_crl=crl)

    assert _reason(pki, pki.sgx_quote(), collateral) == "crl_issuer_mismatch"


def test_pck_crl_signed_by_the_wrong_key(pki: FakeIntelPki) -> None:
    crl = make_crl(pki.pck_ca, this_update=pki.now, next_update=pki.now + timedelta(days=1), signer=pki.root.key)
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), pck_crl=crl)

    assert _reason(pki, pki.sgx_quote(), collateral) == "crl_signature_invalid"


@pytest.mark.parametrize(
    ("validity", "reason"),
    [((-400, -1), "certificate_expired"), ((1, 400), "certificate_not_yet_valid")],
)
def test_pck_certificate_outside_its_validity(validity: tuple[int, int], reason: str) -> None:
    pki = FakeIntelPki()
    pki = FakeIntelPki(pck_validity=(pki.now + timedelta(days=validity[0]), pki.now + timedelta(days=validity[1])))
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity())

    assert _reason(pki, pki.sgx_quote(), collateral) == reason


def test_pck_leaf_without_the_pck_name_is_refused() -> None:
    pki = FakeIntelPki(pck_cn="Some Other Certificate")
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity())

    assert _reason(pki, pki.sgx_quote(), collateral) == "pck_chain_invalid"


def test_tcb_info_signed_by_a_non_tcb_signing_certificate(pki: FakeIntelPki) -> None:
    impostor = issue("Intel SGX PCK Processor CA", pki.root, ca=False, not_before=pki.now, not_after=pki.now)
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), tcb_signer=impostor)

    assert _reason(pki, pki.sgx_quote(), collateral) == "tcb_info_issuer_chain_invalid"


def test_tcb_signing_certificate_not_issued_by_the_root(pki: FakeIntelPki) -> None:
    other = FakeIntelPki()
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(), tcb_signer=other.tcb_signing)

    assert _reason(pki, pki.sgx_quote(), collateral) == "tcb_info_issuer_chain_invalid"


def test_qe_identity_issuer_chain_is_checked(pki: FakeIntelPki, sgx_collateral: dict[str, str]) -> None:
    other = FakeIntelPki()
    forged = {**sgx_collateral, "qe_identity_issuer_chain": other.collateral({}, {})["qe_identity_issuer_chain"]}

    assert _reason(pki, pki.sgx_quote(), forged) == "root_ca_mismatch"


def test_pck_crl_issuer_chain_is_checked(pki: FakeIntelPki, sgx_collateral: dict[str, str]) -> None:
    forged = {**sgx_collateral, "pck_crl_issuer_chain": sgx_collateral["tcb_info_issuer_chain"]}

    assert _reason(pki, pki.sgx_quote(), forged) == "pck_crl_issuer_chain_invalid"


def test_fmspc_mismatch(pki: FakeIntelPki) -> None:
    tcb_info = {**pki.tcb_info_sgx(), "fmspc": "AABBCCDDEEFF"}

    assert _reason(pki, pki.sgx_quote(), pki.collateral(tcb_info, pki.qe_identity())) == "fmspc_mismatch"


def test_pceid_mismatch(pki: FakeIntelPki) -> None:
    tcb_info = {**pki.tcb_info_sgx(), "pceId": "0001"}

    assert _reason(pki, pki.sgx_quote(), pki.collateral(tcb_info, pki.qe_identity())) == "pceid_mismatch"


def test_qe_identity_for_the_wrong_tee(pki: FakeIntelPki) -> None:
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(tdx=True))

    assert _reason(pki, pki.sgx_quote(), collateral) == "qe_identity_mismatch"


@pytest.mark.parametrize(
    "field",
    [
        {"mrsigner": "00" * 32},
        {"isvprodid": 7},
        {"attributes": "13000000000000000000000000000000"},  # expects DEBUG
        {"miscselect": "01000000"},
    ],
)
def test_qe_that_is_not_intels_is_qe_identity_mismatch(pki: FakeIntelPki, field: dict[str, Any]) -> None:
    collateral = pki.collateral(pki.tcb_info_sgx(), {**pki.qe_identity(), **field})

    assert _reason(pki, pki.sgx_quote(), collateral) == "qe_identity_mismatch"


def test_qe_vendor_must_be_intel(pki: FakeIntelPki, sgx_collateral: dict[str, str]) -> None:
    quote = pki.quote(parse_quote(pki.sgx_quote()).body.raw, version=3, tee_type=0, qe_vendor_id=b"\x01" * 16)

    assert _reason(pki, quote, sgx_collateral) == "unsupported_quote"


def test_sgx_body_in_a_v5_quote_is_unsupported(pki: FakeIntelPki, sgx_collateral: dict[str, str]) -> None:
    quote = pki.quote(parse_quote(pki.sgx_quote()).body.raw, version=5, tee_type=0, body_type=1)

    assert _reason(pki, quote, sgx_collateral) == "unsupported_quote"


@pytest.mark.parametrize(
    "body_fields",
    [
        {"mr_signer_seam": b"\x01" * 48},
        {"seam_attributes": b"\x01" + b"\x00" * 7},
        {"tee_tcb_svn": bytes([6, 9, 3] + [0] * 13)},  # module version 9: no TDX_09 identity
    ],
)
def test_tdx_module_mismatch(pki: FakeIntelPki, tdx_collateral: dict[str, str], body_fields: dict[str, Any]) -> None:
    assert _reason(pki, pki.tdx_quote(**body_fields), tdx_collateral) == "tdx_module_mismatch"


def test_tdx_module_version_zero_uses_tdx_module(pki: FakeIntelPki, tdx_collateral: dict[str, str]) -> None:
    result = _verify(pki, pki.tdx_quote(tee_tcb_svn=bytes([6, 0, 3] + [0] * 13)), tdx_collateral)

    assert result.status is TcbStatus.UP_TO_DATE


# -- TCB status derivation, end to end ---------------------------------------------------------


_SGX_LEVELS = [
    tcb_level(DEFAULT_CPU_SVN, DEFAULT_PCE_SVN, "UpToDate"),
    tcb_level([0] * 16, 1, "OutOfDate", advisories=["INTEL-SA-00001"]),
]


def test_sgx_level_below_the_latest_carries_its_status_and_advisories() -> None:
    pki = FakeIntelPki(cpu_svn=(1,) * 16, pce_svn=5)
    collateral = pki.collateral(pki.tcb_info_sgx(_SGX_LEVELS), pki.qe_identity())

    result = _verify(pki, pki.sgx_quote(), collateral)

    assert result.status is TcbStatus.OUT_OF_DATE
    assert result.advisory_ids == ("INTEL-SA-00001",)


def test_sgx_platform_below_every_level_is_tcb_not_supported() -> None:
    pki = FakeIntelPki(pce_svn=0)
    collateral = pki.collateral(pki.tcb_info_sgx(_SGX_LEVELS), pki.qe_identity())

    result = _verify(pki, pki.sgx_quote(), collateral)

    assert result.status is TcbStatus.TCB_NOT_SUPPORTED
    assert result.advisory_ids == ()


@pytest.mark.parametrize(
    ("qe_levels", "status", "qe_status"),
    [
        ([enclave_level(9, "UpToDate"), enclave_level(8, "OutOfDate")], TcbStatus.OUT_OF_DATE, TcbStatus.OUT_OF_DATE),
        ([enclave_level(9, "UpToDate"), enclave_level(8, "Revoked")], TcbStatus.REVOKED, TcbStatus.REVOKED),
        ([enclave_level(9, "UpToDate")], TcbStatus.TCB_NOT_SUPPORTED, TcbStatus.TCB_NOT_SUPPORTED),
    ],
)
def test_qe_status_converges_into_the_result(
    pki: FakeIntelPki, qe_levels: list[dict[str, Any]], status: TcbStatus, qe_status: TcbStatus
) -> None:
    collateral = pki.collateral(pki.tcb_info_sgx(), pki.qe_identity(levels=qe_levels))

    result = _verify(pki, pki.sgx_quote(), collateral)

    assert (result.status, result.qe_tcb_status, result.platform_status) == (status, qe_status, TcbStatus.UP_TO_DATE)


def test_outdated_tdx_module_makes_the_platform_out_of_date(pki: FakeIntelPki) -> None:
    tcb_info = pki.tcb_info_tdx(module_levels=[enclave_level(7, "UpToDate"), enclave_level(6, "OutOfDate")])
    collateral = pki.collateral(tcb_info, pki.qe_identity(tdx=True))

    result = _verify(pki, pki.tdx_quote(), collateral)

    assert (result.status, result.tdx_module_status) == (TcbStatus.OUT_OF_DATE, TcbStatus.OUT_OF_DATE)


def test_td15_that_would_be_current_after_relaunch_is_relaunch_advised(pki: FakeIntelPki) -> None:
    tdx_latest = [9, 0, 4] + [0] * 13
    levels = [
        tcb_level(pki.cpu_svn, pki.pce_svn, "UpToDate", tdx=tdx_latest),
        tcb_level(pki.cpu_svn, pki.pce_svn, "OutOfDate", tdx=[0] * 16, advisories=["INTEL-SA-00003"]),
    ]
    module_levels = [enclave_level(9, "UpToDate"), enclave_level(6, "OutOfDate")]
    collateral = pki.collateral(pki.tcb_info_tdx(levels, module_levels=module_levels), pki.qe_identity(tdx=True))
    running, available = DEFAULT_TEE_TCB_SVN, bytes([9, 1, 4] + [0] * 13)

    result = _verify(pki, pki.tdx_quote(version=5, tee_tcb_svn=running, tee_tcb_svn2=available), collateral)
    stale = _verify(pki, pki.tdx_quote(version=5, tee_tcb_svn=running, tee_tcb_svn2=running), collateral)

    assert result.status is TcbStatus.TD_RELAUNCH_ADVISED
    assert stale.status is TcbStatus.OUT_OF_DATE
    assert "INTEL-SA-00003" in result.advisory_ids


def test_debug_enclave_is_reported_in_claims(pki: FakeIntelPki, sgx_collateral: dict[str, str]) -> None:
    quote = pki.sgx_quote(attributes=bytes.fromhex("0700000000000000e700000000000000"))

    assert _verify(pki, quote, sgx_collateral).claims.debug is True


def test_trailing_bytes_do_not_change_the_verdict(pki: FakeIntelPki, sgx_collateral: dict[str, str]) -> None:
    quote = pki.quote(parse_quote(pki.sgx_quote()).body.raw, version=3, tee_type=0, trailing=b"\x00" * 9)

    result = _verify(pki, quote, sgx_collateral)

    assert (result.status, result.quote.trailing_bytes) == (TcbStatus.UP_TO_DATE, 9)
