"""Parse Intel DCAP quotes v3 (SGX), v4 (TDX 1.0) and v5 (SGX, TDX 1.0, TDX 1.5): spec §1.1-1.4.

Layout (little-endian integers, big-endian ECDSA ``r‖s`` and ``x‖y``)::

    v3, v4   header[48] ‖ body                          ‖ u32 sig_len ‖ signature data[sig_len] ‖ ignored
    v5       header[48] ‖ u16 body_type ‖ u32 body_size ‖ body ‖ u32 sig_len ‖ signature data ‖ ignored

    body     SGX report body (384) for v3, v4 with tee_type 0, v5 type 1;
             TD report 1.0 (584) for v4 with tee_type 0x81, v5 type 2; TD report 1.5 (648) for v5 type 3.

    signature data, v3      quote sig[64] ‖ attestation key[64] ‖ QE block ‖ u16 5 ‖ u32 M ‖ PCK chain[M]
    signature data, v4/v5   quote sig[64] ‖ attestation key[64] ‖ u16 6 ‖ u32 S ‖
                            ( QE block ‖ u16 5 ‖ u32 M ‖ PCK chain[M] )[S]
    QE block                QE report[384] ‖ QE report sig[64] ‖ u16 N ‖ QE auth data[N]

The attestation key signs bytes ``[0, signed_length)``: header and body (with the v5 type and size).
Every length must agree with what it frames; any other shape raises ``EvidenceParseError``
naming the field and its offset. Bytes after the signature data are ignored, as Intel's QVL
does, and counted in ``Quote.trailing_bytes`` so a caller can warn.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from enclaveml.attestation.claims import TeeType
from enclaveml.attestation.pck import PckCertChain, parse_pck_chain
from enclaveml.errors import EvidenceParseError

__all__ = [
    "ATT_KEY_TYPE_ECDSA_P256",
    "BODY_SGX",
    "BODY_TD10",
    "BODY_TD15",
    "CERT_DATA_PCK_CHAIN",
    "CERT_DATA_QE_REPORT",
    "INTEL_QE_VENDOR_ID",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "QeReportCertificationData",
    "Quote",
    "QuoteHeader",
    "QuoteLayout",
    "QuoteSignatureData",
    "SgxReportBody",
    "TdReportBody",
    "parse_quote",
]

ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6
BODY_SGX, BODY_TD10, BODY_TD15 = 1, 2, 3

HEADER_SIZE = 48
SGX_REPORT_BODY_SIZE = 384
TD10_REPORT_BODY_SIZE = 584
TD15_REPORT_BODY_SIZE = 648
_BODY_SIZES = {BODY_SGX: SGX_REPORT_BODY_SIZE, BODY_TD10: TD10_REPORT_BODY_SIZE, BODY_TD15: TD15_REPORT_BODY_SIZE}
_SIGNATURE_SIZE = 64
_KEY_SIZE = 64

# SGX ATTRIBUTES.flags bits (spec §1.2) and TD ATTRIBUTES bits (spec §1.3).
SGX_FLAG_INIT = 0x01
SGX_FLAG_DEBUG = 0x02
SGX_FLAG_MODE64BIT = 0x04
SGX_FLAG_PROVISION_KEY = 0x10
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte header. ``tee_type`` is ``att_key_data_0`` in v3 (0 in real quotes)."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int  # v3 only; reserved (0) in v4/v5
    pce_svn: int  # v3 only; reserved (0) in v4/v5
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class SgxReportBody:
    """``sgx_report_body_t`` (384 bytes): an ISV enclave report or the QE report."""

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes  # flags (u64 LE) ‖ xfrm (u64 LE)
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes
    raw: bytes = field(repr=False)

    @property
    def flags(self) -> int:
        return int.from_bytes(self.attributes[:8], "little")

    @property
    def xfrm(self) -> int:
        return int.from_bytes(self.attributes[8:], "little")

    @property
    def debug(self) -> bool:
        return bool(self.flags & SGX_FLAG_DEBUG)


@dataclass(frozen=True)
class TdReportBody:
    """``sgx_report2_body_t``: TD report 1.0 (584 bytes) or 1.5 (648, adds the last two fields)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None
    mr_service_td: bytes | None
    raw: bytes = field(repr=False)

    @property
    def td_attributes_value(self) -> int:
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        """TUD bit 0 of TDATTRIBUTES."""
        return bool(self.td_attributes_value & TD_ATTR_DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        return bool(self.td_attributes_value & TD_ATTR_SEPT_VE_DISABLE)


@dataclass(frozen=True)
class QeReportCertificationData:
    """The QE report, its signature by the PCK key, the QE auth data and the PCK chain."""

    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain: PckCertChain


@dataclass(frozen=True)
class QuoteSignatureData:
    """``quote_signature`` is by ``attestation_key`` over the signed range of the quote."""

    quote_signature: bytes
    attestation_key: bytes
    certification_data_type: int  # 5 (v3, flat) or 6 (v4/v5, QE report certification data)
    qe: QeReportCertificationData


@dataclass(frozen=True)
class QuoteLayout:
    """Offsets into the quote of each region, for diagnostics and tamper tests."""

    body: int
    signature_data: int
    quote_signature: int
    attestation_key: int
    qe_report: int
    qe_report_signature: int
    qe_auth_data: int
    pck_chain: int
    end: int  # first byte after the signature data


@dataclass(frozen=True)
class Quote:
    header: QuoteHeader
    body_type: int
    body: SgxReportBody | TdReportBody
    signature_data: QuoteSignatureData
    signed_length: int
    layout: QuoteLayout
    trailing_bytes: int
    raw: bytes = field(repr=False)

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the attestation key signed: ``raw[0:signed_length]``."""
        return self.raw[: self.signed_length]

    @property
    def tee(self) -> TeeType:
        return TeeType.SGX if self.body_type == BODY_SGX else TeeType.TDX

    @property
    def source(self) -> str:
        return f"dcap-quote-v{self.header.version}"

    @property
    def pck_chain(self) -> PckCertChain:
        return self.signature_data.qe.pck_chain


class _Reader:
    """Reads fields in order; every short read names the field and its offset."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, size: int, name: str) -> bytes:
        if self.pos + size > self.end:
            raise EvidenceParseError(
                name, self.pos, f"truncated: {name} needs {size} bytes, {self.end - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u16(self, name: str) -> int:
        value: int = struct.unpack("<H", self.take(2, name))[0]
        return value

    def u32(self, name: str) -> int:
        value: int = struct.unpack("<I", self.take(4, name))[0]
        return value


def parse_quote(data: bytes) -> Quote:
    """Parse a DCAP quote. Raises ``EvidenceParseError`` for any malformed input, nothing else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a quote is bytes, not {type(data).__name__}")
    raw = bytes(data)
    reader = _Reader(raw)
    header = _parse_header(reader)
    body_type = _read_body_type(reader, header)
    body_offset = reader.pos
    body_bytes = reader.take(_BODY_SIZES[body_type], "report_body")
    body = _parse_sgx_body(body_bytes) if body_type == BODY_SGX else _parse_td_body(body_bytes)
    signed_length = reader.pos

    length_offset = reader.pos
    signature_length = reader.u32("signature_data_len")
    start = reader.pos
    if signature_length > len(raw) - start:
        raise EvidenceParseError(
            "signature_data_len",
            length_offset,
            f"signature_data_len is {signature_length} but only {len(raw) - start} bytes follow",
        )
    end = start + signature_length
    signature_data, layout = _parse_signature_data(_Reader(raw, start, end), header.version, body_offset)
    return Quote(
        header=header,
        body_type=body_type,
        body=body,
        signature_data=signature_data,
        signed_length=signed_length,
        layout=layout,
        trailing_bytes=len(raw) - end,
        raw=raw,
    )


def _parse_header(reader: _Reader) -> QuoteHeader:
    version = reader.u16("header.version")
    if version not in (3, 4, 5):
        raise EvidenceParseError("header.version", 0, f"unsupported quote version {version} (supported: 3, 4, 5)")
    att_key_type = reader.u16("header.att_key_type")
    if att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise EvidenceParseError(
            "header.att_key_type", 2, f"unsupported attestation key type {att_key_type} (supported: 2, ECDSA-P256)"
        )
    tee_type = reader.u32("header.tee_type")
    qe_svn = reader.u16("header.qe_svn")
    pce_svn = reader.u16("header.pce_svn")
    qe_vendor_id = reader.take(16, "header.qe_vendor_id")
    user_data = reader.take(20, "header.user_data")
    return QuoteHeader(version, att_key_type, tee_type, qe_svn, pce_svn, qe_vendor_id, user_data)


def _read_body_type(reader: _Reader, header: QuoteHeader) -> int:
    """The body that follows the header: fixed by the version (v3) or tee_type (v4), declared in v5."""
    if header.version == 3:
        return BODY_SGX
    if header.version == 4:
        if header.tee_type == TEE_TYPE_SGX:
            return BODY_SGX
        if header.tee_type == TEE_TYPE_TDX:
            return BODY_TD10
        raise EvidenceParseError("header.tee_type", 4, f"unknown tee_type 0x{header.tee_type:08x} (0x0 SGX, 0x81 TDX)")
    type_offset = reader.pos
    body_type = reader.u16("body_type")
    if body_type not in _BODY_SIZES:
        raise EvidenceParseError(
            "body_type", type_offset, f"unknown v5 body type {body_type} (1 SGX, 2 TD 1.0, 3 TD 1.5)"
        )
    size_offset = reader.pos
    body_size = reader.u32("body_size")
    if body_size != _BODY_SIZES[body_type]:
        raise EvidenceParseError(
            "body_size",
            size_offset,
            f"body_size {body_size} does not fit body type {body_type}, which is {_BODY_SIZES[body_type]}",
        )
    return body_type


def _parse_sgx_body(raw: bytes) -> SgxReportBody:
    # Offsets from spec §1.2 (sgx_report_body_t); gaps are reserved bytes.
    return SgxReportBody(
        cpu_svn=raw[0:16],
        misc_select=int.from_bytes(raw[16:20], "little"),
        isv_ext_prod_id=raw[32:48],
        attributes=raw[48:64],
        mr_enclave=raw[64:96],
        mr_signer=raw[128:160],
        config_id=raw[192:256],
        isv_prod_id=int.from_bytes(raw[256:258], "little"),
        isv_svn=int.from_bytes(raw[258:260], "little"),
        config_svn=int.from_bytes(raw[260:262], "little"),
        isv_family_id=raw[304:320],
        report_data=raw[320:384],
        raw=raw,
    )


def _parse_td_body(raw: bytes) -> TdReportBody:
    # Offsets from spec §1.3 (sgx_report2_body_t) and §1.4 (TD 1.5 additions).
    rtmrs = (raw[328:376], raw[376:424], raw[424:472], raw[472:520])
    is_td15 = len(raw) == TD15_REPORT_BODY_SIZE
    return TdReportBody(
        tee_tcb_svn=raw[0:16],
        mr_seam=raw[16:64],
        mr_signer_seam=raw[64:112],
        seam_attributes=raw[112:120],
        td_attributes=raw[120:128],
        xfam=raw[128:136],
        mr_td=raw[136:184],
        mr_config_id=raw[184:232],
        mr_owner=raw[232:280],
        mr_owner_config=raw[280:328],
        rtmrs=rtmrs,
        report_data=raw[520:584],
        tee_tcb_svn2=raw[584:600] if is_td15 else None,
        mr_service_td=raw[600:648] if is_td15 else None,
        raw=raw,
    )


def _parse_signature_data(reader: _Reader, version: int, body_offset: int) -> tuple[QuoteSignatureData, QuoteLayout]:
    signature_offset = reader.pos
    quote_signature = reader.take(_SIGNATURE_SIZE, "signature_data.quote_signature")
    key_offset = reader.pos
    attestation_key = reader.take(_KEY_SIZE, "signature_data.attestation_key")
    if version == 3:
        cert_type = CERT_DATA_PCK_CHAIN
        qe_reader = reader
    else:
        cert_type = _expect_type(reader, CERT_DATA_QE_REPORT, "certification_data.type")
        size_offset = reader.pos
        size = reader.u32("certification_data.size")
        if size != reader.end - reader.pos:
            raise EvidenceParseError(
                "certification_data.size",
                size_offset,
                f"QE report certification data size is {size} but signature_data_len leaves {reader.end - reader.pos}",
            )
        qe_reader = _Reader(reader.data, reader.pos, reader.pos + size)
    qe_report_offset = qe_reader.pos
    qe_report = _parse_sgx_body(qe_reader.take(SGX_REPORT_BODY_SIZE, "qe_report"))
    qe_signature_offset = qe_reader.pos
    qe_report_signature = qe_reader.take(_SIGNATURE_SIZE, "qe_report_signature")
    auth_size = qe_reader.u16("qe_auth_data.size")
    auth_offset = qe_reader.pos
    qe_auth_data = qe_reader.take(auth_size, "qe_auth_data")
    _expect_type(qe_reader, CERT_DATA_PCK_CHAIN, "pck_cert_chain.type")
    chain_size_offset = qe_reader.pos
    chain_size = qe_reader.u32("pck_cert_chain.size")
    if chain_size != qe_reader.end - qe_reader.pos:
        raise EvidenceParseError(
            "pck_cert_chain.size",
            chain_size_offset,
            f"PCK chain size is {chain_size} but its container leaves {qe_reader.end - qe_reader.pos} bytes",
        )
    chain_offset = qe_reader.pos
    pck_chain = parse_pck_chain(qe_reader.take(chain_size, "pck_cert_chain"), offset=chain_offset)
    qe = QeReportCertificationData(qe_report, qe_report_signature, qe_auth_data, pck_chain)
    layout = QuoteLayout(
        body=body_offset,
        signature_data=signature_offset,
        quote_signature=signature_offset,
        attestation_key=key_offset,
        qe_report=qe_report_offset,
        qe_report_signature=qe_signature_offset,
        qe_auth_data=auth_offset,
        pck_chain=chain_offset,
        end=reader.end,
    )
    return QuoteSignatureData(quote_signature, attestation_key, cert_type, qe), layout


def _expect_type(reader: _Reader, expected: int, name: str) -> int:
    offset = reader.pos
    found = reader.u16(name)
    if found != expected:
        raise EvidenceParseError(name, offset, f"unsupported certification data type {found}, expected {expected}")
    return found
