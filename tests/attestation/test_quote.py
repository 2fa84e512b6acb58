"""Parsing real DCAP quotes (v3 SGX, v4 TDX, v5 TDX 1.5): exact fields, and nothing but
``EvidenceParseError`` for any malformed input."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pki import FakeIntelPki, issue

from enclaveml.attestation.claims import TeeType
from enclaveml.attestation.pck import SgxExtensionError, parse_sgx_extension
from enclaveml.attestation.quote import (
    BODY_SGX,
    BODY_TD10,
    BODY_TD15,
    INTEL_QE_VENDOR_ID,
    Quote,
    SgxReportBody,
    TdReportBody,
    parse_quote,
)
from enclaveml.errors import EvidenceParseError

DCAP = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "dcap"
SGX_V3 = (DCAP / "dcapqvl_sgx_quote_v3.bin").read_bytes()
TDX_V4 = (DCAP / "dcapqvl_tdx_quote_v4.bin").read_bytes()
TDX_V5 = (DCAP / "dcapqvl_tdx_quote_v5_notcbmatch.bin").read_bytes()
QUOTES = {"sgx_v3": SGX_V3, "tdx_v4": TDX_V4, "tdx_v5": TDX_V5}


def _sgx_body(quote: Quote) -> SgxReportBody:
    assert isinstance(quote.body, SgxReportBody)
    return quote.body


def _td_body(quote: Quote) -> TdReportBody:
    assert isinstance(quote.body, TdReportBody)
    return quote.body


def test_sgx_v3_vector_fields() -> None:
    quote = parse_quote(SGX_V3)

    assert (quote.header.version, quote.header.att_key_type, quote.header.tee_type) == (3, 2, 0)
    assert (quote.header.qe_svn, quote.header.pce_svn) == (10, 15)
    assert quote.header.qe_vendor_id == INTEL_QE_VENDOR_ID
    assert (quote.body_type, quote.tee, quote.source) == (BODY_SGX, TeeType.SGX, "dcap-quote-v3")
    body = _sgx_body(quote)
    assert body.mr_enclave.hex() == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert body.mr_signer.hex() == "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    assert (body.isv_prod_id, body.isv_svn) == (0, 0)
    assert body.flags == 0x05
    assert body.debug is False
    assert body.report_data == b"Hello, world!".ljust(64, b"\x00")
    assert quote.signed_length == 432
    assert quote.signed_bytes == SGX_V3[:432]
    assert quote.trailing_bytes == 0
    assert quote.signature_data.certification_data_type == 5
    assert len(quote.signature_data.qe.qe_auth_data) == 32
    assert quote.signature_data.qe.qe_report.flags == 0x15
    pck = quote.pck_chain
    assert [c.subject.rfc4514_string().split("CN=")[1] for c in pck.certificates] == [
        "Intel SGX PCK Certificate",
        "Intel SGX PCK Processor CA",
        "Intel SGX Root CA",
    ]
    assert pck.sgx_extension.fmspc.hex() == "00a067110000"
    assert pck.sgx_extension.pce_svn == 13
    assert pck.sgx_extension.sgx_type == 0
    assert pck.sgx_extension.pce_id == b"\x00\x00"


def test_tdx_v4_vector_fields() -> None:
    quote = parse_quote(TDX_V4)

    assert (quote.header.version, quote.header.tee_type) == (4, 0x81)
    assert (quote.body_type, quote.tee, quote.source) == (BODY_TD10, TeeType.TDX, "dcap-quote-v4")
    body = _td_body(quote)
    assert body.tee_tcb_svn.hex().startswith("060103")
    assert body.mr_td.hex() == (
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
    )
    rtmr0, rtmr1, rtmr2, rtmr3 = (r.hex() for r in body.rtmrs)
    assert (rtmr0[:8], rtmr0[-4:]) == ("44c0197b", "c9c0")
    assert (rtmr1[:8], rtmr1[-4:]) == ("0084452c", "9378")
    assert (rtmr2[:8], rtmr2[-4:]) == ("d833feef", "3132")
    assert rtmr3 == "00" * 48
    assert body.td_attributes.hex() == "0000001000000000"
    assert body.sept_ve_disable is True
    assert body.debug is False
    assert body.xfam.hex() == "e702060000000000"
    assert (body.report_data.hex()[:8], body.report_data.hex()[-4:]) == ("9a9d48e7", "3f20")
    assert (body.tee_tcb_svn2, body.mr_service_td) == (None, None)
    qe = quote.signature_data.qe.qe_report
    assert qe.mr_signer.hex() == "dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5"
    assert (qe.isv_prod_id, qe.isv_svn) == (2, 6)
    assert "Intel SGX PCK Platform CA" in quote.pck_chain.certificates[1].subject.rfc4514_string()
    assert quote.pck_chain.sgx_extension.fmspc.hex() == "b0c06f000000"
    assert quote.signature_data.certification_data_type == 6
    assert quote.signed_length == 632
    assert quote.trailing_bytes == 70  # zero padding after signature_data
    assert quote.layout.end == 5006 - 70


def test_tdx_v5_vector_fields() -> None:
    quote = parse_quote(TDX_V5)

    assert (quote.header.version, quote.body_type, quote.source) == (5, BODY_TD15, "dcap-quote-v5")
    assert quote.signed_length == 702  # 48 header + 2 type + 4 size + 648 body
    assert quote.layout.body == 54
    body = _td_body(quote)
    assert body.tee_tcb_svn2 is not None
    assert body.mr_service_td == b"\x00" * 48
    assert quote.pck_chain.sgx_extension.cpu_svn_components[7] == 3  # "component 8"
    assert quote.pck_chain.sgx_extension.fmspc.hex() == "90c06f000000"
    assert quote.trailing_bytes == 0


def test_debug_attribute_bits_are_decoded() -> None:
    sgx = bytearray(SGX_V3)
    sgx[96] |= 0x02  # ATTRIBUTES.flags DEBUG (spec §1.2)
    td = bytearray(TDX_V4)
    td[48 + 120] |= 0x01  # TDATTRIBUTES TUD bit 0

    assert _sgx_body(parse_quote(bytes(sgx))).debug is True
    assert _td_body(parse_quote(bytes(td))).debug is True


@pytest.mark.parametrize("name", sorted(QUOTES))
def test_every_truncation_is_a_parse_error_naming_a_field(name: str) -> None:
    quote = QUOTES[name]
    end = parse_quote(quote).layout.end
    for size in range(end):
        with pytest.raises(EvidenceParseError) as caught:
            parse_quote(quote[:size])
        assert caught.value.field
        assert 0 <= caught.value.offset <= size
    for size in range(end, len(quote) + 1):  # cutting only padding still parses
        assert parse_quote(quote[:size]).trailing_bytes == size - end


@pytest.mark.parametrize("name", sorted(QUOTES))
def test_trailing_bytes_are_ignored_and_counted(name: str) -> None:
    original = parse_quote(QUOTES[name])

    padded = parse_quote(QUOTES[name] + b"trailing junk")

    assert padded.trailing_bytes == original.trailing_bytes + len(b"trailing junk")
    assert padded.body == original.body
    assert padded.signed_bytes == original.signed_bytes


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("quote", "offset", "fmt", "value", "field"),
    [
        (SGX_V3, 0, "<H", 2, "header.version"),
        (SGX_V3, 0, "<H", 6, "header.version"),
        (SGX_V3, 2, "<H", 3, "header.att_key_type"),
        (TDX_V4, 4, "<I", 0x42, "header.tee_type"),
        (TDX_V5, 48, "<H", 9, "body_type"),
        (TDX_V5, 50, "<I", 584, "body_size"),
        (SGX_V3, 432, "<I", 5000, "signature_data_len"),
        (SGX_V3, 432, "<I", 4000, "pck_cert_chain.size"),
        (TDX_V4, 632, "<I", 4310, "certification_data.size"),
        (TDX_V4, 636 + 128, "<H", 5, "certification_data.type"),
        (TDX_V4, 1252, "<H", 4, "pck_cert_chain.type"),
        (SGX_V3, 1046, "<H", 1, "pck_cert_chain.type"),
        (SGX_V3, 1012, "<H", 4000, "qe_auth_data"),
    ],
)
def test_malformed_fields_are_named(quote: bytes, offset: int, fmt: str, value: int, field: str) -> None:
    with pytest.raises(EvidenceParseError) as caught:
        parse_quote(_patched(quote, offset, fmt, value))

    assert caught.value.field == field
    assert caught.value.reason == "malformed_evidence"


def test_garbage_pck_chain_is_a_parse_error() -> None:
    quote = parse_quote(SGX_V3)
    start = quote.layout.pck_chain
    broken = SGX_V3[:start] + b"x" * (len(SGX_V3) - start)

    with pytest.raises(EvidenceParseError, match="PEM") as caught:
        parse_quote(broken)

    assert (caught.value.field, caught.value.offset) == ("pck_cert_chain", start)


def test_a_pck_leaf_without_sgx_extension_is_refused() -> None:
    pki = FakeIntelPki()
    plain = issue("Intel SGX PCK Certificate", pki.pck_ca, ca=False, not_before=pki.now, not_after=pki.now)

    with pytest.raises(SgxExtensionError, match="no SGX extension"):
        parse_sgx_extension(plain.cert)


def test_sgx_extension_fields_round_trip() -> None:
    pki = FakeIntelPki(fmspc=bytes.fromhex("112233445566"), pce_svn=300, cpu_svn=tuple(range(16)), platform=True)

    extension = parse_sgx_extension(pki.pck.cert)

    assert extension.fmspc.hex() == "112233445566"
    assert extension.pce_svn == 300
    assert extension.cpu_svn_components == tuple(range(16))
    assert extension.cpu_svn == bytes(range(16))
    assert extension.sgx_type == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_random_sgx_extension_values_give_only_extension_errors(value: bytes) -> None:
    pki = _PKI
    cert = issue(
        "Intel SGX PCK Certificate",
        pki.pck_ca,
        ca=False,
        not_before=pki.now,
        not_after=pki.now,
        extensions=[x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.840.113741.1.13.1"), value)],
    )
    with contextlib.suppress(SgxExtensionError):
        parse_sgx_extension(cert.cert)


_PKI = FakeIntelPki()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_give_only_parse_errors(data: bytes) -> None:
    with contextlib.suppress(EvidenceParseError):
        parse_quote(data)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(QUOTES)),
    header=st.sampled_from([b"\x03\x00\x02\x00", b"\x04\x00\x02\x00", b"\x05\x00\x02\x00"]),
    rest=st.binary(max_size=1500),
)
def test_random_bodies_behind_a_valid_header_give_only_parse_errors(name: str, header: bytes, rest: bytes) -> None:
    data = header + QUOTES[name][4:48] + rest
    with contextlib.suppress(EvidenceParseError):
        parse_quote(data)


# Every length field of the three vectors: (quote, offset, struct format).
_LENGTH_FIELDS = [
    ("sgx_v3", 432, "<I"),
    ("sgx_v3", 1012, "<H"),
    ("sgx_v3", 1048, "<I"),
    ("tdx_v4", 632, "<I"),
    ("tdx_v4", 766, "<I"),
    ("tdx_v4", 1218, "<H"),
    ("tdx_v4", 1254, "<I"),
    ("tdx_v5", 50, "<I"),
    ("tdx_v5", 702, "<I"),
    ("tdx_v5", 836, "<I"),
    ("tdx_v5", 1288, "<H"),
    ("tdx_v5", 1324, "<I"),
]


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(_LENGTH_FIELDS), value=st.integers(min_value=0, max_value=2**32 - 1))
def test_mutated_lengths_give_only_parse_errors(field: tuple[str, int, str], value: int) -> None:
    name, offset, fmt = field
    value &= 0xFFFF if fmt == "<H" else 0xFFFFFFFF
    data = _patched(QUOTES[name], offset, fmt, value)
    with contextlib.suppress(EvidenceParseError):
        parse_quote(data)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(QUOTES)), position=st.integers(min_value=0), byte=st.integers(0, 255))
def test_any_single_byte_change_gives_only_parse_errors(name: str, position: int, byte: int) -> None:
    data = bytearray(QUOTES[name])
    data[position % len(data)] = byte
    with contextlib.suppress(EvidenceParseError):
        parse_quote(bytes(data))


def test_length_field_offsets_match_the_layout() -> None:
    for name, offset, fmt in _LENGTH_FIELDS:
        value = struct.unpack_from(fmt, QUOTES[name], offset)[0]
        assert value in (4164, 32, 3548, 4300, 4166, 3678, 648), (name, offset, value)


def test_a_quote_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        parse_quote("not bytes")  # type: ignore[arg-type]
