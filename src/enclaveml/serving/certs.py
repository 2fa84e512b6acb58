"""Certificates for serving over TLS: a private CA, a server certificate and a client certificate.

What CCZoo's ``generate_oneway_ssl_config.sh`` / ``generate_twoway_ssl_config.sh`` do with
``openssl`` (tee-formats.md §5 "Certificate scripts"), with ``cryptography`` and stricter
profiles. Both modes use a CA, so a client trusts ``ca.crt`` and the server certificate can be
renewed without redistributing anything::

    ca.crt  ca.key          CA=true, pathlen 0, keyCertSign + cRLSign
    server.crt server.key   CA=false, digitalSignature (+ keyEncipherment for RSA), serverAuth,
                            SAN DNS:<cn>, DNS:localhost, IP:127.0.0.1 and every --san
    client.crt client.key   (two-way) CA=false, digitalSignature, clientAuth
    ssl.cfg                 TF Serving's SSLConfig text proto (§5 ``ssl.cfg``) for the server

Keys are ECDSA P-256 by default (fast, small) or RSA-2048 (``key_type="rsa"``, as CCZoo).
Every file is PEM, mode 0600, written atomically; existing files are refused unless
``force``. Time is an argument (``now``): certificates valid from ``now`` (minus a small clock
skew allowance) for ``days``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enclaveml._atomic import atomic_output
from enclaveml.errors import ConfigError
from enclaveml.serving.tls import ServerTls, ssl_config_text

__all__ = [
    "CA_COMMON_NAME",
    "DEFAULT_DAYS",
    "CertPaths",
    "Issued",
    "KeyType",
    "create_ca",
    "issue_client_certificate",
    "issue_oneway",
    "issue_server_certificate",
    "issue_twoway",
    "parse_san",
]

KeyType = Literal["ec", "rsa"]
DEFAULT_DAYS = 365
CA_COMMON_NAME = "enclaveml serving CA"
RSA_KEY_SIZE = 2048
_CLOCK_SKEW = timedelta(minutes=5)  # not_before is back-dated so peers with slow clocks accept
_DEFAULT_SANS = ("DNS:localhost", "IP:127.0.0.1")
_HOST_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
)
GeneralName = x509.DNSName | x509.IPAddress


@dataclass(frozen=True, repr=False)
class Issued:
    """A certificate and its private key, both PEM. The key never shows in ``repr``."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def __repr__(self) -> str:
        return f"Issued({self.certificate.subject.rfc4514_string()})"


@dataclass(frozen=True)
class CertPaths:
    """The files ``issue_oneway`` / ``issue_twoway`` wrote (client files only for two-way)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    ssl_config: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    def files(self) -> tuple[Path, ...]:
        found = (self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.client_cert, self.client_key)
        return (*(p for p in found if p is not None), self.ssl_config)

    def server_tls(self) -> ServerTls:
        """The server side as ``ServerTls`` (mutual TLS when client files were issued)."""
        return ServerTls.from_ssl_config(self.ssl_config)


# -- building blocks (in memory) -------------------------------------------------------------


def create_ca(
    common_name: str = CA_COMMON_NAME, *, now: datetime, days: int = DEFAULT_DAYS, key_type: KeyType = "ec"
) -> Issued:
    """A self-signed CA that may sign end-entity certificates only (pathlen 0)."""
    key = _new_key(key_type)
    name = _name(common_name)
    builder = (
        _base(name, name, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _signed(builder, key, key)


def issue_server_certificate(
    ca: Issued,
    common_name: str,
    *,
    sans: Iterable[str] = (),
    now: datetime,
    days: int = DEFAULT_DAYS,
    key_type: KeyType = "ec",
) -> Issued:
    """A TLS server certificate from ``ca``: SAN ``common_name``, localhost, 127.0.0.1 and ``sans``."""
    names = _general_names([common_name, *_DEFAULT_SANS, *sans])
    return _issue(ca, common_name, names, ExtendedKeyUsageOID.SERVER_AUTH, now, days, key_type)


def issue_client_certificate(
    ca: Issued, common_name: str, *, now: datetime, days: int = DEFAULT_DAYS, key_type: KeyType = "ec"
) -> Issued:
    """A TLS client certificate from ``ca`` (extended key usage clientAuth only)."""
    return _issue(ca, common_name, [], ExtendedKeyUsageOID.CLIENT_AUTH, now, days, key_type)


def parse_san(value: str) -> GeneralName:
    """``DNS:name``, ``IP:address`` or a bare name / address (an address when it parses as one)."""
    kind, sep, rest = value.partition(":")
    if sep and kind.upper() in ("DNS", "IP"):
        value, explicit = rest, kind.upper()
    else:
        explicit = ""
    value = value.strip()
    if not value:
        raise ConfigError("an empty subject alternative name", "write it like DNS:serving.example.com or IP:10.0.0.5")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        if explicit == "IP":
            raise ConfigError(f"{value!r} is not an IP address", "write it like IP:10.0.0.5") from None
        return x509.DNSName(_host_name(value))
    if explicit == "DNS":
        raise ConfigError(f"{value!r} is an IP address, not a DNS name", f"write it as IP:{value}")
    return x509.IPAddress(address)


# -- the two layouts on disk -----------------------------------------------------------------


def issue_oneway(
    common_name: str,
    out_dir: str | Path,
    *,
    sans: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    key_type: KeyType = "ec",
    now: datetime,
    force: bool = False,
) -> CertPaths:
    """One-way TLS: ``ca.crt ca.key server.crt server.key ssl.cfg`` in ``out_dir``."""
    return _issue_files(common_name, Path(out_dir), None, sans, days, key_type, now, force)


def issue_twoway(
    common_name: str,
    out_dir: str | Path,
    *,
    client_cn: str = "client",
    sans: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    key_type: KeyType = "ec",
    now: datetime,
    force: bool = False,
) -> CertPaths:
    """Mutual TLS: the one-way files plus ``client.crt client.key``; ``ssl.cfg`` requires client certs."""
    return _issue_files(common_name, Path(out_dir), client_cn, sans, days, key_type, now, force)


def _issue_files(
    common_name: str,
    out_dir: Path,
    client_cn: str | None,
    sans: Sequence[str],
    days: int,
    key_type: KeyType,
    now: datetime,
    force: bool,
) -> CertPaths:
    if key_type not in get_args(KeyType):
        raise ConfigError(f"unknown key type {key_type!r}", "use ec or rsa")
    if days < 1:
        raise ConfigError(f"validity of {days} days", "certificates must be valid for at least one day")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    two_way = client_cn is not None
    paths = CertPaths(
        out_dir,
        out_dir / "ca.crt",
        out_dir / "ca.key",
        out_dir / "server.crt",
        out_dir / "server.key",
        out_dir / "ssl.cfg",
        out_dir / "client.crt" if two_way else None,
        out_dir / "client.key" if two_way else None,
    )
    # Refuse before any key is made or any file written: a half-replaced set mixes two CAs.
    existing = [p.name for p in paths.files() if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{out_dir}: {', '.join(existing)} already exist(s)",
            "pass --force to replace them (clients must then trust the new ca.crt), or choose another -o",
        )
    ca = create_ca(now=now, days=days, key_type=key_type)
    server = issue_server_certificate(ca, common_name, sans=sans, now=now, days=days, key_type=key_type)
    client = None
    if client_cn is not None:
        client = issue_client_certificate(ca, client_cn, now=now, days=days, key_type=key_type)
    ssl_cfg = ssl_config_text(ServerTls(server.cert_pem, server.key_pem, ca.cert_pem if two_way else None))
    contents = {
        paths.ca_cert: ca.cert_pem,
        paths.ca_key: ca.key_pem,
        paths.server_cert: server.cert_pem,
        paths.server_key: server.key_pem,
        paths.ssl_config: ssl_cfg.encode(),
    }
    if client is not None and paths.client_cert is not None and paths.client_key is not None:
        contents |= {paths.client_cert: client.cert_pem, paths.client_key: client.key_pem}
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, data in contents.items():
        with atomic_output(path, mode=0o600) as out:
            out.write(data)
    return paths


# -- X.509 details ---------------------------------------------------------------------------


def _issue(
    ca: Issued,
    common_name: str,
    names: list[GeneralName],
    purpose: x509.ObjectIdentifier,
    now: datetime,
    days: int,
    key_type: KeyType,
) -> Issued:
    ca_cert = ca.certificate
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError("the CA key is neither EC nor RSA", "create the CA with `enclaveml certs`")
    key = _new_key(key_type)
    builder = (
        _base(_name(common_name), ca_cert.subject, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(encipher=isinstance(key, rsa.RSAPrivateKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _signed(builder, key, ca_key)


def _new_key(key_type: KeyType) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
    raise ConfigError(f"unknown key type {key_type!r}", "use ec or rsa")


def _name(common_name: str) -> x509.Name:
    if not common_name or len(common_name) > 64:  # X.520 ub-common-name
        raise ConfigError(f"common name {common_name!r} must have 1 to 64 characters", "e.g. --cn serving.example.com")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _base(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    now: datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool = False, encipher: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _host_name(value: str) -> str:
    try:
        host = value.encode("idna").decode("ascii")
    except UnicodeError:
        host = ""
    if not _HOST_NAME.fullmatch(host):
        raise ConfigError(f"{value!r} is not a valid DNS name", "write it like DNS:serving.example.com")
    return host


def _general_names(values: Iterable[str]) -> list[GeneralName]:
    names: list[GeneralName] = []
    for value in values:
        name = parse_san(value)
        if name not in names:
            names.append(name)
    return names


def _signed(
    builder: x509.CertificateBuilder,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    signer: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
) -> Issued:
    cert = builder.sign(signer, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)
