"""The PCK certificate chain a DCAP quote carries, and the Intel SGX extension of its leaf.

The extension ``1.2.840.113741.1.13.1`` (spec §1.5) is a DER ``SEQUENCE`` of
``SEQUENCE { OID, value }`` pairs::

    .1  PPID           OCTET STRING (16)
    .2  TCB            SEQUENCE of pairs: .2.1-.2.16 component SVNs (INTEGER),
                       .2.17 PCESVN (INTEGER), .2.18 CPUSVN (OCTET STRING, 16)
    .3  PCE-ID         OCTET STRING (2)
    .4  FMSPC          OCTET STRING (6)
    .5  SGX type       ENUMERATED (0 Standard, 1 Scalable, 2 Scalable with integrity)
    .6  PlatformInstanceID  OCTET STRING (16), Platform-CA certificates only
    .7  Configuration  SEQUENCE, Platform-CA certificates only (not decoded)

``cryptography`` hands the extension over as opaque bytes; the small DER walker below reads
just these shapes (definite lengths, low tag numbers) and rejects anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography import x509

from enclaveml.attestation.certchain import load_pem_chain
from enclaveml.errors import EvidenceParseError

__all__ = ["SGX_EXTENSION_OID", "PckCertChain", "SgxExtension", "parse_pck_chain", "parse_sgx_extension"]

SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = SGX_EXTENSION_OID.dotted_string

_SEQUENCE = 0x30
_OID = 0x06
_OCTET_STRING = 0x04
_INTEGER = 0x02
_ENUMERATED = 0x0A


class SgxExtensionError(ValueError):
    """The SGX extension is missing or not shaped as spec §1.5 says."""


@dataclass(frozen=True)
class SgxExtension:
    """The platform identity and TCB that Intel certified in the PCK leaf."""

    ppid: bytes
    cpu_svn_components: tuple[int, ...]  # the 16 component SVNs, TCB .2.1 - .2.16
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None = None


@dataclass(frozen=True)
class PckCertChain:
    """The PEM chain from certification data type 5: PCK leaf, PCK CA, usually the root."""

    pem: bytes = field(repr=False)
    certificates: tuple[x509.Certificate, ...]
    sgx_extension: SgxExtension

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]


def parse_pck_chain(pem: bytes, *, offset: int) -> PckCertChain:
    """Parse the PEM chain found at quote ``offset``; the trailing NUL real quotes carry is dropped."""
    text = pem.rstrip(b"\0")
    try:
        certificates = load_pem_chain(text)
    except ValueError as exc:
        raise EvidenceParseError("pck_cert_chain", offset, f"the PCK certificate chain is not PEM: {exc}") from exc
    if len(certificates) < 2:
        raise EvidenceParseError(
            "pck_cert_chain", offset, f"the PCK certificate chain holds {len(certificates)} certificate(s), needs >= 2"
        )
    try:
        extension = parse_sgx_extension(certificates[0])
    except SgxExtensionError as exc:
        raise EvidenceParseError("pck_certificate.sgx_extension", offset, str(exc)) from exc
    return PckCertChain(pem=text, certificates=certificates, sgx_extension=extension)


def parse_sgx_extension(certificate: x509.Certificate) -> SgxExtension:
    """Decode the SGX extension of a PCK certificate; ``SgxExtensionError`` when malformed."""
    try:
        raw = certificate.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
    except x509.ExtensionNotFound as exc:
        raise SgxExtensionError("the PCK certificate has no SGX extension (1.2.840.113741.1.13.1)") from exc
    except ValueError as exc:  # an unparsable extension list
        raise SgxExtensionError(f"the PCK certificate extensions do not parse: {exc}") from exc
    if not isinstance(raw, x509.UnrecognizedExtension):
        raise SgxExtensionError("the SGX extension is not an opaque extension")
    top = _pairs(_single(raw.value, _SEQUENCE, "SGX extension"), "SGX extension")
    tcb = _pairs(_need(top, ".2", _SEQUENCE), "TCB")
    components = tuple(_integer(_need(tcb, f".2.{i}", _INTEGER), f"TCB component {i}") for i in range(1, 17))
    instance = top.get(".6")
    return SgxExtension(
        ppid=_sized(_need(top, ".1", _OCTET_STRING), 16, "PPID"),
        cpu_svn_components=components,
        pce_svn=_integer(_need(tcb, ".2.17", _INTEGER), "PCESVN"),
        cpu_svn=_sized(_need(tcb, ".2.18", _OCTET_STRING), 16, "CPUSVN"),
        pce_id=_sized(_need(top, ".3", _OCTET_STRING), 2, "PCE-ID"),
        fmspc=_sized(_need(top, ".4", _OCTET_STRING), 6, "FMSPC"),
        sgx_type=_integer(_need(top, ".5", _ENUMERATED), "SGX type"),
        platform_instance_id=None if instance is None or instance[0] != _OCTET_STRING else instance[1],
    )


# -- a minimal DER walker --------------------------------------------------------------------


def _tlv(data: bytes, pos: int, what: str) -> tuple[int, int, int]:
    """(tag, value start, value end) of the element at ``pos``."""
    if pos + 2 > len(data):
        raise SgxExtensionError(f"{what}: truncated DER element at byte {pos}")
    tag, length = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise SgxExtensionError(f"{what}: multi-byte DER tag at byte {pos}")
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise SgxExtensionError(f"{what}: bad DER length at byte {pos}")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > len(data):
        raise SgxExtensionError(f"{what}: DER element at byte {pos} runs past its container")
    return tag, start, start + length


def _elements(data: bytes, what: str) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(data):
        tag, start, end = _tlv(data, pos, what)
        yield tag, data[start:end]
        pos = end


def _single(data: bytes, tag: int, what: str) -> bytes:
    found, start, end = _tlv(data, 0, what)
    if found != tag or end != len(data):
        raise SgxExtensionError(f"{what}: expected one DER element with tag 0x{tag:02x}")
    return data[start:end]


def _pairs(data: bytes, what: str) -> dict[str, tuple[int, bytes]]:
    """``SEQUENCE { OID, value }`` entries keyed by the OID suffix after the SGX arc (``.2.17``)."""
    out: dict[str, tuple[int, bytes]] = {}
    for tag, body in _elements(data, what):
        if tag != _SEQUENCE:
            raise SgxExtensionError(f"{what}: entry is not a SEQUENCE")
        items = list(_elements(body, what))
        if len(items) != 2 or items[0][0] != _OID:
            raise SgxExtensionError(f"{what}: entry is not an (OID, value) pair")
        oid = _decode_oid(items[0][1], what)
        if not oid.startswith(_SGX + "."):
            raise SgxExtensionError(f"{what}: unexpected OID {oid}")
        out[oid[len(_SGX) :]] = items[1]
    return out


def _need(pairs: dict[str, tuple[int, bytes]], suffix: str, tag: int) -> bytes:
    if suffix not in pairs:
        raise SgxExtensionError(f"SGX extension: {_SGX}{suffix} is missing")
    found, value = pairs[suffix]
    if found != tag:
        raise SgxExtensionError(f"SGX extension: {_SGX}{suffix} has DER tag 0x{found:02x}, expected 0x{tag:02x}")
    return value


def _decode_oid(body: bytes, what: str) -> str:
    if not body or body[-1] & 0x80:
        raise SgxExtensionError(f"{what}: malformed OID")
    arcs: list[int] = []
    value = 0
    for byte in body:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(arc) for arc in head + arcs[1:])


def _integer(body: bytes, what: str) -> int:
    if not body or len(body) > 8:
        raise SgxExtensionError(f"SGX extension: {what} is not a small INTEGER")
    value = int.from_bytes(body, "big", signed=True)
    if value < 0:
        raise SgxExtensionError(f"SGX extension: {what} is negative")
    return value


def _sized(body: bytes, size: int, what: str) -> bytes:
    if len(body) != size:
        raise SgxExtensionError(f"SGX extension: {what} is {len(body)} bytes, expected {size}")
    return body
