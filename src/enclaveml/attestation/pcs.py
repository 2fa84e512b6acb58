"""DCAP collateral from Intel PCS or a PCCS (PCS v4 API), with an on-disk cache.

This is an adapter: it does network and file I/O, so the pure core (the quote verifier)
never imports it. It only *fetches* collateral; nothing here is trusted. Every signature,
chain, CRL and validity window is checked later by the verifier against the pinned Intel
root, so a hostile server or a tampered cache can make verification fail, never pass.

Requests made by :meth:`PcsClient.fetch_collateral` (``tee-formats.md`` section 1.6)::

    GET {base}/sgx/certification/v4/pckcrl?ca={processor|platform}&encoding=der
        body: the PCK CRL (DER; PEM and hex text are accepted too)
        header SGX-PCK-CRL-Issuer-Chain: URL-encoded PEM
    GET {root_ca_crl_url}
        body: the Intel SGX Root CA CRL (DER, PEM or hex text)
    GET {base}/{sgx|tdx}/certification/v4/tcb?fmspc={FMSPC}
        body: {"tcbInfo": {...}, "signature": "<hex r||s>"}
        header TCB-Info-Issuer-Chain (older servers: SGX-TCB-Info-Issuer-Chain)
    GET {base}/{sgx|tdx}/certification/v4/qe/identity
        body: {"enclaveIdentity": {...}, "signature": "<hex r||s>"}
        header SGX-Enclave-Identity-Issuer-Chain

The root CA CRL has no PCS v4 endpoint: Intel publishes it at the CRL distribution point
of the root certificate (:data:`INTEL_ROOT_CA_CRL_URL`), a PCCS serves it at
``{base}/sgx/certification/v4/rootcacrl``. ``root_ca_crl_url=None`` picks the first for
``base_url == INTEL_PCS_URL`` and the second for anything else.

The result is the collateral layout of ``shared/vectors/README.md`` (keys
:data:`COLLATERAL_KEYS`): PEM text for the issuer chains, lower-case hex DER for the CRLs,
the signed ``tcbInfo`` / ``enclaveIdentity`` JSON text cut byte-exactly out of the
response body (Intel signs those raw bytes, so they are never re-serialised), and the
lower-case hex signatures.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple
from urllib.parse import unquote, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclaveml._atomic import atomic_output
from enclaveml._version import __version__
from enclaveml.attestation.collateral import COLLATERAL_KEYS, find_collateral_file
from enclaveml.errors import AttestationError, ConfigError

__all__ = [
    "COLLATERAL_KEYS",
    "INTEL_PCS_URL",
    "INTEL_ROOT_CA_CRL_URL",
    "PcsClient",
    "earliest_next_update",
    "load_collateral_file",
]

logger = logging.getLogger(__name__)

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
#: The CRL distribution point of the Intel SGX Root CA certificate.
INTEL_ROOT_CA_CRL_URL = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"

_CHAIN_KEYS = ("pck_crl_issuer_chain", "tcb_info_issuer_chain", "qe_identity_issuer_chain")
_CRL_KEYS = ("root_ca_crl", "pck_crl")
_SIGNATURE_KEYS = ("tcb_info_signature", "qe_identity_signature")
_SIGNED_JSON_KEYS = ("tcb_info", "qe_identity")

Tee = Literal["sgx", "tdx"]
PckCa = Literal["processor", "platform"]

#: Real CRLs are a few hundred KiB at most; anything far larger is not a PCS answer.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_SIGNATURE_SIZE = 64  # raw ECDSA P-256 r || s
_FMSPC = re.compile(r"[0-9a-fA-F]{12}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_JSON_WHITESPACE = " \t\n\r"
_OFFLINE_HINT = "`--collateral DIR` works offline"


class _Reply(NamedTuple):
    url: str
    headers: httpx.Headers
    body: bytes


class PcsClient:
    """Fetches DCAP collateral for one platform (FMSPC) and caches it until it expires.

    Parameters:
        base_url: ``INTEL_PCS_URL`` or a PCCS such as ``https://pccs:8081``; the v4 paths
            are appended to it.
        cache_dir: directory of cached collateral, one file per (tee, FMSPC, PCK CA):
            ``<tee>_<fmspc>_<ca>_collateral.json`` in the offline layout, mode 0600;
            ``None`` disables the cache.
        transport: an ``httpx`` transport, for a proxy or a custom TLS setup. Default: none.
        timeout: seconds allowed for each connect / read. Default 10.
        verify: TLS verification: ``True`` (system CAs, default), a CA bundle path (a PCCS
            usually has its own certificate), or ``False`` (development only).
        root_ca_crl_url: where the root CA CRL lives; default described in the module doc.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        cache_dir: Path | None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
        verify: bool | str = True,
        root_ca_crl_url: str | None = None,
    ) -> None:
        self.base_url = _checked_url(base_url, "PCS/PCCS URL").rstrip("/")
        if root_ca_crl_url is None:
            if self.base_url == INTEL_PCS_URL:
                root_ca_crl_url = INTEL_ROOT_CA_CRL_URL
            else:
                root_ca_crl_url = f"{self.base_url}/sgx/certification/v4/rootcacrl"
        self.root_ca_crl_url = _checked_url(root_ca_crl_url, "root CA CRL URL")
        self.cache_dir = cache_dir
        self.timeout = timeout
        tls: bool | ssl.SSLContext = verify if isinstance(verify, bool) else _tls_context(verify)
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            verify=tls,
            follow_redirects=True,
            headers={"User-Agent": f"enclaveml/{__version__}"},
        )

    def __enter__(self) -> PcsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def fetch_collateral(self, fmspc: str, *, tee: Tee, pck_ca: PckCa, now: datetime) -> dict[str, str]:
        """The collateral for ``fmspc``: from the cache while ``now`` is before its earliest
        ``nextUpdate`` (TCB info, QE identity, both CRLs), else downloaded and cached.

        Raises ``AttestationError`` with reason ``collateral_unavailable`` (server
        unreachable, timeout, HTTP error) or ``collateral_malformed`` (not a PCS answer).
        """
        if not _FMSPC.fullmatch(fmspc):
            raise ValueError(f"fmspc must be 12 hex digits, got {fmspc!r}")
        if tee not in ("sgx", "tdx"):
            raise ValueError(f"tee must be 'sgx' or 'tdx', got {tee!r}")
        if pck_ca not in ("processor", "platform"):
            raise ValueError(f"pck_ca must be 'processor' or 'platform', got {pck_ca!r}")
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")

        cache_file = None
        if self.cache_dir is not None:
            cache_file = self.cache_dir / f"{tee}_{fmspc.lower()}_{pck_ca}_collateral.json"
            cached = _read_cache(cache_file, now)
            if cached is not None:
                return cached
        collateral = self._download(fmspc.upper(), tee, pck_ca)
        if cache_file is not None:
            _write_cache(cache_file, collateral)
        return collateral

    def _download(self, fmspc: str, tee: Tee, pck_ca: PckCa) -> dict[str, str]:
        sgx_api = f"{self.base_url}/sgx/certification/v4"
        tee_api = f"{self.base_url}/{tee}/certification/v4"

        pck = self._get(f"{sgx_api}/pckcrl", {"ca": pck_ca, "encoding": "der"})
        root = self._get(self.root_ca_crl_url)
        tcb = self._get(f"{tee_api}/tcb", {"fmspc": fmspc})
        qe = self._get(f"{tee_api}/qe/identity")

        tcb_info, tcb_info_signature = self._signed_json(tcb, "tcbInfo")
        qe_identity, qe_identity_signature = self._signed_json(qe, "enclaveIdentity")
        collateral = {
            "pck_crl_issuer_chain": self._issuer_chain(pck, ("SGX-PCK-CRL-Issuer-Chain",)),
            "root_ca_crl": self._crl_hex(root),
            "pck_crl": self._crl_hex(pck),
            "tcb_info_issuer_chain": self._issuer_chain(tcb, ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain")),
            "tcb_info": tcb_info,
            "tcb_info_signature": tcb_info_signature,
            "qe_identity_issuer_chain": self._issuer_chain(
                qe, ("SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain")
            ),
            "qe_identity": qe_identity,
            "qe_identity_signature": qe_identity_signature,
        }
        earliest_next_update(collateral, source=self.base_url)
        return collateral

    def _get(self, url: str, params: Mapping[str, str] | None = None) -> _Reply:
        request = self._http.build_request("GET", url, params=params)
        shown = str(request.url)
        try:
            response = self._http.send(request, stream=True)
            try:
                if response.status_code != httpx.codes.OK:
                    raise AttestationError(
                        "collateral_unavailable",
                        f"{shown} answered HTTP {response.status_code} {response.reason_phrase}"
                        + _intel_error(response.headers),
                        _unavailable_hint(shown),
                    )
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise self._malformed(shown, f"response larger than {MAX_RESPONSE_BYTES} bytes")
                return _Reply(shown, response.headers, bytes(body))
            finally:
                response.close()
        except httpx.TimeoutException:
            what = f"{shown} did not answer within {self.timeout:g} s"
        except httpx.TransportError as exc:
            what = f"cannot fetch {shown}: {_one_line(str(exc)) or type(exc).__name__}"
        raise AttestationError("collateral_unavailable", what, _unavailable_hint(shown))

    def _signed_json(self, reply: _Reply, member: str) -> tuple[str, str]:
        """The raw text of ``member`` and the hex signature, from ``{member: {...}, "signature": "hex"}``."""
        try:
            text = reply.body.decode("utf-8")
            spans = _top_level_spans(text)
        except ValueError as exc:
            raise self._malformed(reply.url, f"body is not a JSON object ({_one_line(str(exc))})") from None
        for name in (member, "signature"):
            if name not in spans:
                raise self._malformed(reply.url, f'body has no "{name}" member')
        start, end = spans[member]
        raw = text[start:end]
        if not isinstance(json.loads(raw), dict):
            raise self._malformed(reply.url, f'"{member}" is not a JSON object')
        start, end = spans["signature"]
        signature = json.loads(text[start:end])
        if not isinstance(signature, str) or not _is_hex(signature, _SIGNATURE_SIZE):
            raise self._malformed(reply.url, f'"signature" is not {_SIGNATURE_SIZE} hex-encoded bytes')
        return raw, signature.lower()

    def _issuer_chain(self, reply: _Reply, header_names: Iterable[str]) -> str:
        names = tuple(header_names)
        encoded = next((reply.headers[name] for name in names if name in reply.headers), None)
        if encoded is None:
            raise self._malformed(reply.url, f"response has no {names[0]} header")
        chain = unquote(encoded)
        try:
            if not x509.load_pem_x509_certificates(chain.encode()):
                raise ValueError("no certificate")
        except ValueError:
            raise self._malformed(reply.url, f"header {names[0]} is not a URL-encoded PEM chain") from None
        return chain

    def _crl_hex(self, reply: _Reply) -> str:
        try:
            der = _crl_der(reply.body)
            x509.load_der_x509_crl(der)
        except ValueError:
            raise self._malformed(reply.url, "body is not a CRL (DER, PEM or hex)") from None
        return der.hex()

    def _malformed(self, url: str, detail: str) -> AttestationError:
        return AttestationError(
            "collateral_malformed",
            f"{url}: {detail}",
            f"is {self.base_url} an Intel PCS or a PCCS serving the v4 API? {_OFFLINE_HINT}",
        )


def load_collateral_file(path: str | Path) -> dict[str, str]:
    """Collateral from a JSON file in the layout of ``shared/vectors/README.md``.

    ``path`` may be the file, or a directory that holds ``collateral.json`` or else
    exactly one ``<name>_collateral.json`` (a cache directory holds one per platform;
    name the file then). Keys other than :data:`COLLATERAL_KEYS` are ignored.
    """
    path = Path(path)
    if path.is_dir():
        path = find_collateral_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such collateral file", "pass a collateral JSON file or a directory holding one"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read collateral ({_one_line(str(exc))})") from None
    collateral, _ = _parse_collateral(text, source=str(path))
    return collateral


def earliest_next_update(collateral: Mapping[str, str], *, source: str = "collateral") -> datetime:
    """The first ``nextUpdate`` among the TCB info, the QE identity and both CRLs: the end of
    the window in which this collateral may be reused without asking the server again."""
    moments = []
    try:
        for key in _SIGNED_JSON_KEYS:
            body = json.loads(collateral[key])
            moment = datetime.fromisoformat(body["nextUpdate"])
            if moment.tzinfo is None:
                raise ValueError(f"{key} nextUpdate has no time zone")
            moments.append(moment)
        for key in _CRL_KEYS:
            crl = x509.load_der_x509_crl(bytes.fromhex(collateral[key]))
            if crl.next_update_utc is not None:
                moments.append(crl.next_update_utc)
    except (KeyError, TypeError, ValueError) as exc:
        raise AttestationError(
            "collateral_malformed",
            f"{source}: collateral has no readable nextUpdate ({_one_line(str(exc))})",
            f"fetch it again, or {_OFFLINE_HINT} with a file in the documented layout",
        ) from None
    return min(moments)


def _parse_collateral(text: str, *, source: str) -> tuple[dict[str, str], datetime]:
    def malformed(detail: str) -> AttestationError:
        return AttestationError(
            "collateral_malformed",
            f"{source}: {detail}",
            "collateral files use the layout in docs/attestation/pcs.md",
        )

    try:
        document = json.loads(text)
    except ValueError as exc:
        raise malformed(f"not valid JSON ({_one_line(str(exc))})") from None
    if not isinstance(document, dict):
        raise malformed("not a JSON object")
    missing = [key for key in COLLATERAL_KEYS if not isinstance(document.get(key), str)]
    if missing:
        raise malformed(f"missing or non-text members: {', '.join(missing)}")
    collateral = {key: str(document[key]) for key in COLLATERAL_KEYS}
    for key in _CHAIN_KEYS:
        if "-----BEGIN CERTIFICATE-----" not in collateral[key]:
            raise malformed(f"{key} is not PEM text")
    for key in _SIGNATURE_KEYS:
        if not _is_hex(collateral[key], _SIGNATURE_SIZE):
            raise malformed(f"{key} is not {_SIGNATURE_SIZE} hex-encoded bytes")
    for key in _CRL_KEYS:
        if not _is_hex(collateral[key]):
            raise malformed(f"{key} is not hex")
    return collateral, earliest_next_update(collateral, source=source)


def _read_cache(path: Path, now: datetime) -> dict[str, str] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("ignoring unreadable collateral cache %s: %s", path, exc)
        return None
    try:
        collateral, expires = _parse_collateral(text, source=str(path))
    except AttestationError as exc:
        logger.warning("ignoring corrupt collateral cache entry: %s", exc.what)
        return None
    if now >= expires:
        logger.info("cached collateral %s expired at %s; fetching again", path.name, expires.isoformat())
        return None
    logger.debug("using cached collateral %s (valid until %s)", path, expires.isoformat())
    return collateral


def _write_cache(path: Path, collateral: Mapping[str, str]) -> None:
    # A cache that cannot be written costs a download next time; it must not fail the fetch.
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_output(path, mode=0o600) as out:
            out.write(json.dumps(dict(collateral), indent=2).encode("utf-8") + b"\n")
    except OSError as exc:
        logger.warning("cannot write collateral cache %s: %s", path, exc)


def _top_level_spans(text: str) -> dict[str, tuple[int, int]]:
    """``{member: (start, end)}`` of each value of the JSON object ``text``, as offsets into it.

    Cutting ``text[start:end]`` keeps the value byte-exact, which the TCB info and QE
    identity signatures need (they cover the raw text, spec section 1.6).
    """
    decoder = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}
    i = _skip_whitespace(text, 0)
    if not text.startswith("{", i):
        raise ValueError("expected '{'")
    i = _skip_whitespace(text, i + 1)
    if text.startswith("}", i):
        i += 1
    else:
        while True:
            if not text.startswith('"', i):
                raise ValueError(f"expected a member name at offset {i}")
            name, i = decoder.raw_decode(text, i)
            i = _skip_whitespace(text, i)
            if not text.startswith(":", i):
                raise ValueError(f"expected ':' at offset {i}")
            start = _skip_whitespace(text, i + 1)
            _, end = decoder.raw_decode(text, start)
            if name in spans:
                raise ValueError(f"duplicate member {name!r}")
            spans[name] = (start, end)
            i = _skip_whitespace(text, end)
            if text.startswith(",", i):
                i = _skip_whitespace(text, i + 1)
            elif text.startswith("}", i):
                i += 1
                break
            else:
                raise ValueError(f"expected ',' or '}}' at offset {i}")
    if _skip_whitespace(text, i) != len(text):
        raise ValueError(f"trailing data at offset {i}")
    return spans


def _skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in _JSON_WHITESPACE:
        i += 1
    return i


def _crl_der(body: bytes) -> bytes:
    """PCS sends DER for ``encoding=der``; a PCCS may send PEM or hex text instead."""
    stripped = body.strip()
    if stripped.startswith(b"-----BEGIN X509 CRL-----"):
        return x509.load_pem_x509_crl(stripped).public_bytes(Encoding.DER)
    if body[:1] == b"\x30":
        return body
    return bytes.fromhex(stripped.decode("ascii"))


def _is_hex(text: str, size: int | None = None) -> bool:
    return _HEX.fullmatch(text) is not None and (size is None or len(text) == 2 * size)


def _unavailable_hint(url: str) -> str:
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    if parts.hostname is not None and parts.hostname.endswith(".trustedservices.intel.com"):
        return f"is {origin} reachable from here (proxy, firewall)? {_OFFLINE_HINT}"
    return f"is PCCS running at {origin}? {_OFFLINE_HINT}"


def _intel_error(headers: httpx.Headers) -> str:
    # Intel PCS explains refusals in these headers; show them, on the same line.
    detail = " ".join(headers[name] for name in ("Error-Code", "Error-Message") if name in headers)
    return f" ({_one_line(detail)})" if detail else ""


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _checked_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ConfigError(f"{what} {url!r} is not an http(s) URL", "for example https://pccs:8081")
    return url


def _tls_context(ca_file: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA bundle {ca_file}: {_one_line(str(exc))}") from None
