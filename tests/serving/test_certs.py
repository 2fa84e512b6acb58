"""A model owner issues serving certificates: a private CA, the server's and a client's certificate."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from enclaveml.errors import ConfigError
from enclaveml.serving.certs import (
    CA_COMMON_NAME,
    create_ca,
    issue_oneway,
    issue_server_certificate,
    issue_twoway,
    parse_san,
)
from enclaveml.serving.tls import ServerTls, parse_ssl_config, ssl_config_text

E = TypeVar("E", bound=x509.ExtensionType)
NOW = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, kind: type[E]) -> E:
    return cert.extensions.get_extension_for_class(kind).value


def test_oneway_writes_a_ca_a_server_certificate_and_ssl_cfg_all_private(tmp_path: Path) -> None:
    paths = issue_oneway("serving.example.com", tmp_path / "certs", now=NOW)

    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "ssl.cfg",
    ]
    assert [p.name for p in paths.files()] == ["ca.crt", "ca.key", "server.crt", "server.key", "ssl.cfg"]
    for path in paths.files():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not any(p.name.startswith(".") for p in paths.directory.iterdir())  # no temporary file left


def test_the_ca_may_sign_end_entity_certificates_only(tmp_path: Path) -> None:
    ca = load(issue_oneway("serving.example.com", tmp_path, now=NOW).ca_cert)

    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = ext(ca, x509.KeyUsage)
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    assert ca.subject == ca.issuer
    assert ca.subject.rfc4514_string() == f"CN={CA_COMMON_NAME}"
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"


def test_the_server_certificate_is_a_tls_server_leaf_for_its_names(tmp_path: Path) -> None:
    paths = issue_oneway("serving.example.com", tmp_path, sans=["IP:10.0.0.5", "DNS:grpc.example.com"], now=NOW)
    ca, server = load(paths.ca_cert), load(paths.server_cert)

    server.verify_directly_issued_by(ca)
    assert server.subject.rfc4514_string() == "CN=serving.example.com"
    assert ext(server, x509.BasicConstraints) == x509.BasicConstraints(ca=False, path_length=None)
    usage = ext(server, x509.KeyUsage)
    assert usage.digital_signature
    assert not usage.key_encipherment
    assert not usage.key_cert_sign
    assert list(ext(server, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = ext(server, x509.SubjectAlternativeName)
    assert sans.get_values_for_type(x509.DNSName) == ["serving.example.com", "localhost", "grpc.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
    ]
    ski = ext(ca, x509.SubjectKeyIdentifier)
    aki = ext(server, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == ski.digest
    assert server.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert server.not_valid_after_utc == NOW + timedelta(days=365)


def test_twoway_adds_a_client_certificate_and_requires_it_in_ssl_cfg(tmp_path: Path) -> None:
    paths = issue_twoway("serving.example.com", tmp_path, client_cn="analyst", days=30, now=NOW)

    assert paths.client_cert is not None
    assert paths.client_key is not None
    assert [p.name for p in paths.files()] == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
        "ssl.cfg",
    ]
    client = load(paths.client_cert)
    client.verify_directly_issued_by(load(paths.ca_cert))
    assert client.subject.rfc4514_string() == "CN=analyst"
    assert list(ext(client, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client.not_valid_after_utc == NOW + timedelta(days=30)
    tls = paths.server_tls()
    assert tls.mutual
    assert tls.client_ca_pem == paths.ca_cert.read_bytes()
    assert stat.S_IMODE(paths.client_key.stat().st_mode) == 0o600


def test_rsa_keys_as_cczoo_used_them(tmp_path: Path) -> None:
    paths = issue_oneway("serving.example.com", tmp_path, key_type="rsa", now=NOW)
    server = load(paths.server_cert)

    key = server.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 2048
    usage = ext(server, x509.KeyUsage)
    assert usage.digital_signature
    assert usage.key_encipherment


def test_existing_files_are_never_overwritten_without_force(tmp_path: Path) -> None:
    issue_oneway("serving.example.com", tmp_path, now=NOW)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(ConfigError, match=r"ca\.crt, ca\.key, server\.crt, server\.key, ssl\.cfg already exist"):
        issue_twoway("serving.example.com", tmp_path, now=NOW)

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing replaced, nothing added
    issue_twoway("serving.example.com", tmp_path, now=NOW, force=True)
    assert (tmp_path / "ca.crt").read_bytes() != before["ca.crt"]
    assert (tmp_path / "client.crt").exists()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("serving.example.com", x509.DNSName("serving.example.com")),
        ("DNS:*.svc.cluster.local", x509.DNSName("*.svc.cluster.local")),
        ("10.0.0.5", x509.IPAddress(ipaddress.ip_address("10.0.0.5"))),
        ("IP:::1", x509.IPAddress(ipaddress.ip_address("::1"))),
        ("bücher.example", x509.DNSName("xn--bcher-kva.example")),
    ],
)
def test_subject_alternative_names_are_dns_names_or_addresses(value: str, expected: x509.GeneralName) -> None:
    assert parse_san(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("IP:serving.example.com", "is not an IP address"),
        ("DNS:10.0.0.5", "is an IP address, not a DNS name"),
        ("bad name with spaces", "is not a valid DNS name"),
        ("a..b", "is not a valid DNS name"),
        ("DNS:", "an empty subject alternative name"),
    ],
)
def test_malformed_names_are_refused_before_anything_is_written(tmp_path: Path, value: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        issue_oneway("serving.example.com", tmp_path / "out", sans=[value], now=NOW)
    assert not (tmp_path / "out").exists()


def test_the_common_name_must_be_a_host_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a valid DNS name"):
        issue_oneway("My Server", tmp_path, now=NOW)
    with pytest.raises(ConfigError, match="1 to 64 characters"):
        issue_oneway("a" * 30 + "." + "b" * 40, tmp_path, now=NOW)


def test_an_issued_pair_never_shows_its_key() -> None:
    ca = create_ca(now=NOW)
    server = issue_server_certificate(ca, "serving.example.com", now=NOW)

    assert repr(server) == "Issued(CN=serving.example.com)"
    tls = ServerTls(server.cert_pem, server.key_pem, ca.cert_pem)
    assert repr(tls) == "ServerTls(CN=serving.example.com, mutual TLS)"
    assert b"PRIVATE" not in repr(tls).encode()


# -- ssl.cfg: TF Serving's SSLConfig text proto ------------------------------------------------


def test_ssl_cfg_round_trips_through_the_text_proto() -> None:
    ca = create_ca(now=NOW)
    server = issue_server_certificate(ca, "serving.example.com", now=NOW)
    for tls in (ServerTls(server.cert_pem, server.key_pem), ServerTls(server.cert_pem, server.key_pem, ca.cert_pem)):
        text = ssl_config_text(tls)
        assert parse_ssl_config(text) == tls
    assert "client_verify: true" in ssl_config_text(ServerTls(server.cert_pem, server.key_pem, ca.cert_pem))


def cczoo_line(pem: bytes) -> str:
    """The way CCZoo's scripts write a PEM: one line, literal \\n around the base64."""
    lines = pem.decode().strip().splitlines()
    return lines[0] + "\\n" + "".join(lines[1:-1]) + "\\n" + lines[-1]


def test_ssl_cfg_as_cczoo_writes_it_is_read() -> None:
    ca = create_ca(now=NOW)
    server = issue_server_certificate(ca, "serving.example.com", now=NOW)
    text = (
        f"server_key: '{cczoo_line(server.key_pem)}'\n"
        f"server_cert: '{cczoo_line(server.cert_pem)}'\n"
        f"custom_ca: '{cczoo_line(ca.cert_pem)}'\n"
        "client_verify: true\n"
    )
    tls = parse_ssl_config(text)
    assert tls.mutual
    assert tls.certificate.subject.rfc4514_string() == "CN=serving.example.com"
    # custom_ca without client_verify asks for no client certificate, as in TF Serving
    assert not parse_ssl_config(text.replace("client_verify: true", "client_verify: false")).mutual


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda t: t.replace("server_key", "server_kee", 1), r"not a TF Serving SSLConfig text proto \(line 1, column"),
        (lambda t: t[: len(t) // 2], "not a TF Serving SSLConfig text proto"),
        (lambda t: t.split("server_cert")[0], "`server_cert` is missing"),
        (lambda t: t + "client_verify: true\n", "`client_verify: true` without `custom_ca`"),
    ],
)
def test_a_broken_ssl_cfg_is_refused_without_showing_the_key(
    mangle: Callable[[str], str], reason: str, tmp_path: Path
) -> None:
    server = issue_server_certificate(create_ca(now=NOW), "serving.example.com", now=NOW)
    text = mangle(ssl_config_text(ServerTls(server.cert_pem, server.key_pem)))
    (tmp_path / "ssl.cfg").write_text(text)

    with pytest.raises(ConfigError, match=reason) as raised:
        ServerTls.from_ssl_config(tmp_path / "ssl.cfg")
    assert str(tmp_path / "ssl.cfg") in raised.value.what
    key_body = server.key_pem.decode().splitlines()[1]
    assert key_body not in raised.value.diagnostics()


def test_a_key_of_another_certificate_is_refused() -> None:
    ca = create_ca(now=NOW)
    one = issue_server_certificate(ca, "serving.example.com", now=NOW)
    other = issue_server_certificate(ca, "serving.example.com", now=NOW)

    with pytest.raises(ConfigError, match="the server key does not belong to the server certificate"):
        ServerTls(one.cert_pem, other.key_pem)
    with pytest.raises(ConfigError, match="the server certificate is not a PEM certificate"):
        ServerTls(one.key_pem, one.key_pem)
    with pytest.raises(ConfigError, match="the server key is not an unencrypted PEM private key"):
        ServerTls(one.cert_pem, one.cert_pem)
