"""A fake Intel DCAP PKI for tests: a root, a TCB signing certificate, a PCK CA and a PCK leaf
(with the SGX extension), CRLs we sign, TCB Info / QE Identity JSON, and DCAP quotes (v3 SGX,
v4 TDX 1.0, v5 TDX 1.5) that verify under it when the root is pinned with ``root_ca=``.

Names copy Intel's (``Intel SGX Root CA`` ...), so only the keys differ from the real PKI:
a fake quote checked against the real root fails with ``root_ca_mismatch``.

    pki = FakeIntelPki()
    quote = pki.sgx_quote()
    collateral = Collateral.from_dict(pki.collateral(pki.tcb_info_sgx(), pki.qe_identity_sgx()))
    verify_quote(quote, collateral, now=pki.now, root_ca=pki.root.cert)

Import it as ``from pki import ...`` from ``tests/attestation``; other test directories add
this directory to ``sys.path`` first.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

NOW = datetime(2025, 7, 1, 12, 0, 0, tzinfo=UTC)
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
# Intel's public QE measurements (spec §1.6); the fake QE claims them.
SGX_QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
TD_QE_MRSIGNER = bytes.fromhex("dc9e2a7c6f948f17474e34a7fc43ed030f7c1563f1babddf6340c82e0e54a8c5")
QE_ATTRIBUTES = bytes.fromhex("1500000000000000e700000000000000")  # INIT|MODE64|PROVISION_KEY
ENCLAVE_ATTRIBUTES = bytes.fromhex("0500000000000000e700000000000000")  # INIT|MODE64, no DEBUG
TD_ATTRIBUTES_SEPT_VE_DISABLE = bytes.fromhex("0000001000000000")
DEFAULT_CPU_SVN = (3, 3, 2, 2, 4, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0)
DEFAULT_PCE_SVN = 13
DEFAULT_TEE_TCB_SVN = bytes([6, 1, 3] + [0] * 13)  # module SVN 6, module version 1 (TDX_01), late microcode 3


# -- DER, just enough for the SGX extension ------------------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _int(value: int, tag: int = 0x02) -> bytes:
    return _der(tag, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _pair(suffix: str, value: bytes) -> bytes:
    return _der(0x30, _oid(SGX_EXTENSION_OID + suffix) + value)


def sgx_extension_der(
    *,
    fmspc: bytes,
    pce_id: bytes = b"\x00\x00",
    cpu_svn: Sequence[int] = DEFAULT_CPU_SVN,
    pce_svn: int = DEFAULT_PCE_SVN,
    sgx_type: int = 0,
    ppid: bytes = bytes(range(16)),
) -> bytes:
    """The DER value of the SGX extension (spec §1.5)."""
    tcb = b"".join(_pair(f".2.{i + 1}", _int(svn)) for i, svn in enumerate(cpu_svn))
    tcb += _pair(".2.17", _int(pce_svn)) + _pair(".2.18", _der(0x04, bytes(cpu_svn)))
    return _der(
        0x30,
        _pair(".1", _der(0x04, ppid))
        + _pair(".2", _der(0x30, tcb))
        + _pair(".3", _der(0x04, pce_id))
        + _pair(".4", _der(0x04, fmspc))
        + _pair(".5", _int(sgx_type, tag=0x0A)),
    )


# -- keys, certificates, CRLs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intel Corporation"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def issue(
    cn: str,
    issuer: Issued | None,
    *,
    ca: bool,
    not_before: datetime,
    not_after: datetime,
    extensions: Iterable[x509.ExtensionType] = (),
) -> Issued:
    """A P-256 certificate; ``issuer=None`` makes it self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn) if issuer is None else issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    signer = key if issuer is None else issuer.key
    return Issued(key, builder.sign(signer, hashes.SHA256()))


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-SHA256 as raw big-endian r‖s (spec §1.1)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    numbers = key.public_key().public_numbers()
    return numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")


def make_crl(
    issuer: Issued,
    revoked: Iterable[x509.Certificate] = (),
    *,
    this_update: datetime,
    next_update: datetime,
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(this_update)
        .next_update(next_update)
    )
    for cert in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(this_update)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(signer or issuer.key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(Encoding.PEM).decode() for c in certs)


def _date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- report bodies ---------------------------------------------------------------------------------


def sgx_report_body(
    *,
    mr_enclave: bytes = b"\x11" * 32,
    mr_signer: bytes = b"\x22" * 32,
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    attributes: bytes = ENCLAVE_ATTRIBUTES,
    misc_select: int = 0,
    report_data: bytes = b"\x00" * 64,
) -> bytes:
    body = bytearray(384)
    body[16:20] = misc_select.to_bytes(4, "little")
    body[48:64] = attributes
    body[64:96] = mr_enclave
    body[128:160] = mr_signer
    body[256:260] = struct.pack("<HH", isv_prod_id, isv_svn)
    body[320:384] = report_data
    return bytes(body)


def td_report_body(
    *,
    tee_tcb_svn: bytes = DEFAULT_TEE_TCB_SVN,
    mr_seam: bytes = b"\x5e" * 48,
    mr_signer_seam: bytes = b"\x00" * 48,
    seam_attributes: bytes = b"\x00" * 8,
    td_attributes: bytes = TD_ATTRIBUTES_SEPT_VE_DISABLE,
    xfam: bytes = bytes.fromhex("e702060000000000"),
    mr_td: bytes = b"\x33" * 48,
    rtmrs: Sequence[bytes] = (b"\x40" * 48, b"\x41" * 48, b"\x42" * 48, b"\x00" * 48),
    report_data: bytes = b"\x44" * 64,
    tee_tcb_svn2: bytes | None = None,
    mr_service_td: bytes = b"\x00" * 48,
) -> bytes:
    """A TD report 1.0 body, or 1.5 when ``tee_tcb_svn2`` is given."""
    body = (
        tee_tcb_svn + mr_seam + mr_signer_seam + seam_attributes + td_attributes + xfam + mr_td
        + b"\x00" * 48 * 3 + b"".join(rtmrs) + report_data
    )  # fmt: skip
    if tee_tcb_svn2 is not None:
        body += tee_tcb_svn2 + mr_service_td
    return body


# -- the PKI ---------------------------------------------------------------------------------------


@dataclass
class FakeIntelPki:
    """Root → TCB Signing, Root → PCK CA → PCK leaf; everything valid around ``now``."""

    now: datetime = NOW
    fmspc: bytes = bytes.fromhex("00a067110000")
    pce_id: bytes = b"\x00\x00"
    cpu_svn: Sequence[int] = DEFAULT_CPU_SVN
    pce_svn: int = DEFAULT_PCE_SVN
    platform: bool = False
    pck_validity: tuple[datetime, datetime] | None = None
    pck_cn: str = "Intel SGX PCK Certificate"
    root: Issued = field(init=False)
    tcb_signing: Issued = field(init=False)
    pck_ca: Issued = field(init=False)
    pck: Issued = field(init=False)
    attestation_key: ec.EllipticCurvePrivateKey = field(init=False)

    def __post_init__(self) -> None:
        start, end = self.now - timedelta(days=365), self.now + timedelta(days=3650)
        self.root = issue("Intel SGX Root CA", None, ca=True, not_before=start, not_after=end)
        self.tcb_signing = issue("Intel SGX TCB Signing", self.root, ca=False, not_before=start, not_after=end)
        ca_cn = "Intel SGX PCK Platform CA" if self.platform else "Intel SGX PCK Processor CA"
        self.pck_ca = issue(ca_cn, self.root, ca=True, not_before=start, not_after=end)
        extension = sgx_extension_der(
            fmspc=self.fmspc,
            pce_id=self.pce_id,
            cpu_svn=self.cpu_svn,
            pce_svn=self.pce_svn,
            sgx_type=1 if self.platform else 0,
        )
        pck_start, pck_end = self.pck_validity or (start, end)
        self.pck = issue(
            self.pck_cn,
            self.pck_ca,
            ca=False,
            not_before=pck_start,
            not_after=pck_end,
            extensions=[x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID), extension)],
        )
        self.attestation_key = ec.generate_private_key(ec.SECP256R1())

    # -- collateral --

    def collateral(
        self,
        tcb_info: Mapping[str, Any] | str,
        qe_identity: Mapping[str, Any] | str,
        *,
        root_crl: x509.CertificateRevocationList | None = None,
        pck_crl: x509.CertificateRevocationList | None = None,
        tcb_signer: Issued | None = None,
    ) -> dict[str, str]:
        """The collateral dict (vectors layout); JSON given as a dict is serialised compactly and signed."""
        signer = tcb_signer or self.tcb_signing
        tcb_text = tcb_info if isinstance(tcb_info, str) else json.dumps(tcb_info, separators=(",", ":"))
        qe_text = qe_identity if isinstance(qe_identity, str) else json.dumps(qe_identity, separators=(",", ":"))
        root_crl = self.crl(self.root) if root_crl is None else root_crl  # an empty CRL is falsy
        pck_crl = self.crl(self.pck_ca) if pck_crl is None else pck_crl
        return {
            "pck_crl_issuer_chain": _pem(self.pck_ca.cert, self.root.cert),
            "root_ca_crl": root_crl.public_bytes(Encoding.DER).hex(),
            "pck_crl": pck_crl.public_bytes(Encoding.DER).hex(),
            "tcb_info_issuer_chain": _pem(signer.cert, self.root.cert),
            "tcb_info": tcb_text,
            "tcb_info_signature": sign_raw(signer.key, tcb_text.encode()).hex(),
            "qe_identity_issuer_chain": _pem(signer.cert, self.root.cert),
            "qe_identity": qe_text,
            "qe_identity_signature": sign_raw(signer.key, qe_text.encode()).hex(),
        }

    def crl(
        self,
        issuer: Issued,
        revoked: Iterable[x509.Certificate] = (),
        *,
        window: tuple[datetime, datetime] | None = None,
    ) -> x509.CertificateRevocationList:
        this_update, next_update = window or (self.now - timedelta(days=1), self.now + timedelta(days=30))
        return make_crl(issuer, revoked, this_update=this_update, next_update=next_update)

    def _window(self) -> dict[str, str]:
        return {"issueDate": _date(self.now - timedelta(days=1)), "nextUpdate": _date(self.now + timedelta(days=30))}

    def tcb_info_sgx(self, levels: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "id": "SGX",
            "version": 3,
            **self._window(),
            "fmspc": self.fmspc.hex().upper(),
            "pceId": self.pce_id.hex().upper(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": 17,
            "tcbLevels": list(
                levels
                or [
                    tcb_level(self.cpu_svn, self.pce_svn, "UpToDate"),
                    tcb_level([0] * 16, 1, "OutOfDate", advisories=["INTEL-SA-00001"]),
                ]
            ),
        }

    def tcb_info_tdx(
        self,
        levels: Sequence[Mapping[str, Any]] | None = None,
        *,
        module_levels: Sequence[Mapping[str, Any]] | None = None,
        module_mrsigner: bytes = b"\x00" * 48,
    ) -> dict[str, Any]:
        tdx = list(DEFAULT_TEE_TCB_SVN[:3]) + [0] * 13
        tdx[1] = 0
        identity = {
            "id": "TDX_01",
            "mrsigner": module_mrsigner.hex().upper(),
            "attributes": "0000000000000000",
            "attributesMask": "FFFFFFFFFFFFFFFF",
            "tcbLevels": list(module_levels or [enclave_level(6, "UpToDate"), enclave_level(2, "OutOfDate")]),
        }
        return {
            **self.tcb_info_sgx(
                levels
                or [
                    tcb_level(self.cpu_svn, self.pce_svn, "UpToDate", tdx=tdx),
                    tcb_level([0] * 16, 1, "OutOfDate", tdx=[0] * 16, advisories=["INTEL-SA-00002"]),
                ]
            ),
            "id": "TDX",
            "tdxModule": {
                "mrsigner": module_mrsigner.hex().upper(),
                "attributes": "0000000000000000",
                "attributesMask": "FFFFFFFFFFFFFFFF",
            },
            "tdxModuleIdentities": [identity],
        }

    def qe_identity(self, *, tdx: bool = False, levels: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "id": "TD_QE" if tdx else "QE",
            "version": 2,
            **self._window(),
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": (TD_QE_MRSIGNER if tdx else SGX_QE_MRSIGNER).hex().upper(),
            "isvprodid": 2 if tdx else 1,
            "tcbLevels": list(levels or [enclave_level(8, "UpToDate"), enclave_level(6, "OutOfDate")]),
        }

    # -- quotes --

    def qe_report(self, *, tdx: bool, qe_auth_data: bytes, isv_svn: int = 8, **fields: Any) -> bytes:
        """A QE report bound to this PKI's attestation key (REPORTDATA = SHA-256(key ‖ auth data) ‖ 0*32)."""
        binding = hashlib.sha256(raw_public_key(self.attestation_key) + qe_auth_data).digest() + b"\x00" * 32
        defaults: dict[str, Any] = {
            "mr_signer": TD_QE_MRSIGNER if tdx else SGX_QE_MRSIGNER,
            "isv_prod_id": 2 if tdx else 1,
            "attributes": QE_ATTRIBUTES,
            "report_data": binding,
        }
        return sgx_report_body(isv_svn=isv_svn, **{**defaults, **fields})

    def quote(
        self,
        body: bytes,
        *,
        version: int,
        tee_type: int,
        body_type: int | None = None,
        qe_report: bytes | None = None,
        qe_auth_data: bytes = bytes(range(32)),
        qe_vendor_id: bytes = INTEL_QE_VENDOR_ID,
        trailing: bytes = b"",
    ) -> bytes:
        """A DCAP quote over ``body``, signed by this PKI's attestation key, QE and PCK."""
        tdx = tee_type == 0x81
        qe_report = qe_report or self.qe_report(tdx=tdx, qe_auth_data=qe_auth_data)
        header = struct.pack("<HHIHH", version, 2, tee_type, 0, 0) + qe_vendor_id + b"\x00" * 20
        if version == 5:
            header += struct.pack("<HI", body_type or (3 if len(body) == 648 else 2), len(body))
        signed = header + body
        chain = _pem(self.pck.cert, self.pck_ca.cert, self.root.cert).encode() + b"\x00"
        qe_block = (
            qe_report + sign_raw(self.pck.key, qe_report) + struct.pack("<H", len(qe_auth_data)) + qe_auth_data
            + struct.pack("<HI", 5, len(chain)) + chain
        )  # fmt: skip
        if version >= 4:
            qe_block = struct.pack("<HI", 6, len(qe_block)) + qe_block
        signature_data = sign_raw(self.attestation_key, signed) + raw_public_key(self.attestation_key) + qe_block
        return signed + struct.pack("<I", len(signature_data)) + signature_data + trailing

    def sgx_quote(self, **body_fields: Any) -> bytes:
        return self.quote(sgx_report_body(**body_fields), version=3, tee_type=0)

    def tdx_quote(self, *, version: int = 4, **body_fields: Any) -> bytes:
        if version == 5:
            body_fields.setdefault("tee_tcb_svn2", DEFAULT_TEE_TCB_SVN)
        return self.quote(td_report_body(**body_fields), version=version, tee_type=0x81)


def tcb_level(
    sgx: Sequence[int],
    pce_svn: int,
    status: str,
    *,
    tdx: Sequence[int] | None = None,
    advisories: Sequence[str] = (),
    date: str = "2024-03-13T00:00:00Z",
) -> dict[str, Any]:
    tcb: dict[str, Any] = {"sgxtcbcomponents": [{"svn": v} for v in sgx], "pcesvn": pce_svn}
    if tdx is not None:
        tcb["tdxtcbcomponents"] = [{"svn": v} for v in tdx]
    level: dict[str, Any] = {"tcb": tcb, "tcbDate": date, "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def enclave_level(isv_svn: int, status: str, *, advisories: Sequence[str] = ()) -> dict[str, Any]:
    level: dict[str, Any] = {"tcb": {"isvsvn": isv_svn}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level
