"""Transport security for the model server: one-way TLS and mutual TLS, for gRPC and REST.

The server side is one value, ``ServerTls`` (certificate chain, key, and the CA of accepted
clients: set means mutual TLS is *required*). It becomes gRPC server credentials
(``grpc_server_credentials``) or ``uvicorn.Config`` options (``uvicorn_ssl_options``); it can be
read from TF Serving's ``--ssl_config_file`` (``ServerTls.from_ssl_config``), the ``SSLConfig``
text proto of tee-formats.md §5::

    server_key: "-----BEGIN PRIVATE KEY-----\\n...\\n-----END PRIVATE KEY-----\\n"
    server_cert: "-----BEGIN CERTIFICATE-----\\n..."
    custom_ca: "-----BEGIN CERTIFICATE-----\\n..."     # the client CA (mutual TLS)
    client_verify: true                                # require client certificates

The text proto is read and written by ``protobuf``'s ``text_format`` over the four-field
message built at run time (TF Serving's ``ssl_config_pb2`` is not published on PyPI).

The client side follows CCZoo's ``resnet_client_grpc.py`` (§5 "Client"), so its ``-ca``,
``-crt`` and ``-key`` files mean the same here::

    root  = ca if ca else crt      one-way: crt is the server's certificate, the only trust root
    chain = crt if ca else None    two-way: ca is the root, crt/key the client's certificate

``channel_credentials`` gives ``grpc.ChannelCredentials``, ``client_ssl_context`` an
``ssl.SSLContext`` for REST clients (``httpx.Client(verify=context)``). With neither ``ca`` nor
``crt`` the system's trust roots are used (CCZoo falls back to an insecure channel; we never do).

Keys stay in memory: where a library reads only files (uvicorn, ``ssl``), the PEM goes to an
anonymous memfd that is closed when the block ends (``ratls_tls`` does the same).
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from enclaveml.attestation.ratls_tls import _private_file
from enclaveml.errors import ConfigError

__all__ = [
    "ServerTls",
    "channel_credentials",
    "client_ssl_context",
    "grpc_server_credentials",
    "parse_ssl_config",
    "ssl_config_text",
    "uvicorn_ssl_options",
]

_SSL_CONFIG_HINT = "see TF Serving's ssl_config.proto: server_key, server_cert, custom_ca, client_verify"


@dataclass(frozen=True, repr=False)
class ServerTls:
    """A server's TLS identity: ``cert_pem`` (leaf first, then any intermediates) and ``key_pem``.

    ``client_ca_pem``: when set, every client must present a certificate issued by this CA
    (mutual TLS); when ``None``, no client certificate is asked for. Checked on creation: the
    PEMs parse and the key belongs to the leaf certificate (``ConfigError`` otherwise).
    """

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None = None

    def __post_init__(self) -> None:
        leaf = _certificates(self.cert_pem, "the server certificate")[0]
        key = _private_key(self.key_pem, "the server key")
        if _spki(key.public_key()) != _spki(leaf.public_key()):
            raise ConfigError(
                "the server key does not belong to the server certificate",
                "pass the key that was issued together with the certificate",
            )
        if self.client_ca_pem is not None:
            _certificates(self.client_ca_pem, "the client CA")

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate (mutual TLS)."""
        return self.client_ca_pem is not None

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate the server presents."""
        return _certificates(self.cert_pem, "the server certificate")[0]

    def __repr__(self) -> str:
        mode = "mutual TLS" if self.mutual else "one-way TLS"
        return f"ServerTls({self.certificate.subject.rfc4514_string()}, {mode})"

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> ServerTls:
        """Read PEM files; ``client_ca`` turns on mutual TLS."""
        ca = _read(client_ca, "client CA") if client_ca is not None else None
        return cls(_read(cert, "certificate"), _read(key, "key"), ca)

    @classmethod
    def from_ssl_config(cls, path: str | Path) -> ServerTls:
        """Read TF Serving's ``--ssl_config_file`` (module docstring)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the SSL config {path}: {_why(exc)}", "check the path") from None
        return parse_ssl_config(text, source=str(path))


def parse_ssl_config(text: str, *, source: str = "ssl.cfg") -> ServerTls:
    """``ServerTls`` from ``SSLConfig`` text. ``client_verify: true`` needs ``custom_ca``.

    As in TF Serving, ``custom_ca`` without ``client_verify`` asks for no client certificate.
    Errors name the line and column, never the text (it holds the server key).
    """
    config = _ssl_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        where = f"line {exc.GetLine()}, column {exc.GetColumn()}" if exc.GetLine() is not None else "unknown position"
        raise ConfigError(f"{source}: not a TF Serving SSLConfig text proto ({where})", _SSL_CONFIG_HINT) from None
    for name in ("server_key", "server_cert"):
        if not getattr(config, name):
            raise ConfigError(f"{source}: `{name}` is missing", _SSL_CONFIG_HINT)
    if config.client_verify and not config.custom_ca:
        raise ConfigError(f"{source}: `client_verify: true` without `custom_ca`", "add the client CA as custom_ca")
    client_ca = config.custom_ca.encode() if config.client_verify else None
    try:
        return ServerTls(config.server_cert.encode(), config.server_key.encode(), client_ca)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.what}", exc.hint) from None


def ssl_config_text(tls: ServerTls) -> str:
    """``tls`` as ``SSLConfig`` text that TF Serving and ``parse_ssl_config`` read. Holds the key."""
    config = _ssl_config_class()()
    config.server_key = tls.key_pem.decode("ascii")
    config.server_cert = tls.cert_pem.decode("ascii")
    if tls.client_ca_pem is not None:
        config.custom_ca = tls.client_ca_pem.decode("ascii")
        config.client_verify = True
    text: str = text_format.MessageToString(config)
    return text


# -- servers ---------------------------------------------------------------------------------


def grpc_server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``; client certificates required when ``tls.mutual``."""
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)],
        root_certificates=tls.client_ca_pem,
        require_client_auth=tls.mutual,
    )


@contextlib.contextmanager
def uvicorn_ssl_options(tls: ServerTls) -> Iterator[dict[str, Any]]:
    """Keyword arguments for ``uvicorn.Config`` (``ssl_certfile``, ``ssl_keyfile``, and for mutual
    TLS ``ssl_ca_certs`` with ``ssl_cert_reqs=CERT_REQUIRED``).

    The files are memfds of this process (``/proc/self/fd/N``): valid only inside the block and
    only in this process, so run the server (or at least its start-up, where uvicorn loads
    them) inside the block, with one worker and no reloader.
    """
    with contextlib.ExitStack() as stack:
        options: dict[str, Any] = {
            "ssl_certfile": stack.enter_context(_private_file(tls.cert_pem)),
            "ssl_keyfile": stack.enter_context(_private_file(tls.key_pem)),
        }
        if tls.client_ca_pem is not None:
            options["ssl_ca_certs"] = stack.enter_context(_private_file(tls.client_ca_pem))
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        yield options


# -- clients ---------------------------------------------------------------------------------


def channel_credentials(*, ca: bytes | None, crt: bytes | None, key: bytes | None) -> grpc.ChannelCredentials:
    """gRPC channel credentials with CCZoo's meaning of ``ca``, ``crt``, ``key`` (module docstring)."""
    root, chain, private_key = _client_roles(ca, crt, key)
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=private_key, certificate_chain=chain)


def client_ssl_context(
    *, ca: bytes | None, crt: bytes | None, key: bytes | None, check_hostname: bool = True
) -> ssl.SSLContext:
    """A TLS >= 1.2 client context with the same meaning of ``ca``, ``crt``, ``key``.

    ``check_hostname=False`` only when the root is a pinned server certificate (RA-TLS):
    then the pin alone identifies the server.
    """
    root, chain, private_key = _client_roles(ca, crt, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if root is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        try:
            context.load_verify_locations(cadata=root.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError):
            raise ConfigError(
                "the trust root is not a PEM certificate", "pass the CA (-ca) or server (-crt) PEM"
            ) from None
    context.check_hostname = check_hostname
    if chain is not None and private_key is not None:
        with _private_file(chain + b"\n" + private_key) as path:
            try:
                context.load_cert_chain(path)
            except ssl.SSLError:
                raise ConfigError(
                    "the client certificate and key do not load or do not match",
                    "pass the client.crt and client.key issued together",
                ) from None
    return context


def _client_roles(
    ca: bytes | None, crt: bytes | None, key: bytes | None
) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(root, chain, key) from CCZoo's options, refusing the combinations it would misuse."""
    if ca is None:
        if key is not None:
            raise ConfigError(
                "a client key without a CA: in one-way TLS the certificate is the server's, not the client's",
                "for mutual TLS pass the CA too (-ca CA -crt CLIENT_CERT -key CLIENT_KEY)",
            )
        if crt is not None:
            _certificates(crt, "the server certificate (-crt)")
        return crt, None, None
    _certificates(ca, "the CA certificate (-ca)")
    if (crt is None) != (key is None):
        raise ConfigError("mutual TLS needs both the client certificate and its key", "pass -crt and -key together")
    if crt is not None and key is not None:
        _certificates(crt, "the client certificate (-crt)")
        _private_key(key, "the client key (-key)")
    return ca, crt, key


# -- parsing helpers ---------------------------------------------------------------------------


@functools.cache
def _ssl_config_class() -> Any:
    """TF Serving's ``tensorflow.serving.SSLConfig`` (proto3), in a private descriptor pool."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="enclaveml/tensorflow_serving/ssl_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    message = proto.message_type.add(name="SSLConfig")
    string, boolean = descriptor_pb2.FieldDescriptorProto.TYPE_STRING, descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
    fields = (("server_key", 1, string), ("server_cert", 2, string), ("custom_ca", 3, string))
    for name, number, kind in (*fields, ("client_verify", 4, boolean)):
        message.field.add(name=name, number=number, type=kind, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.SSLConfig"))


def _certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(pem)
    except ValueError:
        found = []
    if not found:
        raise ConfigError(f"{what} is not a PEM certificate", "pass the .crt file (-----BEGIN CERTIFICATE-----)")
    return found


def _private_key(pem: bytes, what: str) -> Any:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise ConfigError(
            f"{what} is not an unencrypted PEM private key", "pass the .key file (-----BEGIN PRIVATE KEY-----)"
        ) from None


def _spki(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {_why(exc)}", "check the path") from None


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__
