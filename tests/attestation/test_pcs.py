"""Fetching collateral from a real HTTP server on loopback that answers like Intel PCS / a PCCS.

The server replays the recorded collateral of ``shared/vectors/dcap``: the signed JSON goes
into the body by string concatenation (so the signed bytes survive untouched), issuer
chains go URL-encoded into headers, CRLs go out as DER, and every request is counted.
"""

from __future__ import annotations

import json
import re
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclaveml.attestation.pcs import (
    COLLATERAL_KEYS,
    INTEL_PCS_URL,
    INTEL_ROOT_CA_CRL_URL,
    PcsClient,
    earliest_next_update,
    load_collateral_file,
)
from enclaveml.errors import AttestationError, ConfigError

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "dcap"


@dataclass(frozen=True)
class Platform:
    vector: str
    tee: str
    fmspc: str
    pck_ca: str
    now: datetime  # inside the recorded collateral's window

    def recorded(self) -> dict[str, str]:
        result: dict[str, str] = json.loads((VECTORS / self.vector).read_text())
        return result


SGX = Platform(
    "dcapqvl_sgx_quote_v3_collateral.json", "sgx", "00A067110000", "processor", datetime(2025, 7, 1, tzinfo=UTC)
)
TDX = Platform(
    "dcapqvl_tdx_quote_v4_collateral.json", "tdx", "B0C06F000000", "platform", datetime(2025, 7, 1, tzinfo=UTC)
)
TDX_V5 = Platform(
    "dcapqvl_tdx_quote_v5_notcbmatch_collateral.json",
    "tdx",
    "90C06F000000",
    "platform",
    datetime(2026, 3, 1, tzinfo=UTC),
)
SGX_CACHE_FILE = "sgx_00a067110000_processor_collateral.json"
SGX_EXPIRES = datetime(2025, 7, 19, 10, 1, 18, tzinfo=UTC)  # the QE identity's nextUpdate comes first


@dataclass
class Route:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    stall: bool = False  # hold the answer until the test ends (a server that hangs)


@dataclass
class RecordedPcs:
    """What the loopback server answers, and which paths it was asked for."""

    url: str = ""
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def serve(self, platform: Platform, collateral: dict[str, str] | None = None) -> None:
        c = platform.recorded() if collateral is None else collateral
        sgx, tee = "/sgx/certification/v4", f"/{platform.tee}/certification/v4"
        self.routes[f"{sgx}/pckcrl?ca={platform.pck_ca}&encoding=der"] = Route(
            200, bytes.fromhex(c["pck_crl"]), {"SGX-PCK-CRL-Issuer-Chain": quote(c["pck_crl_issuer_chain"], safe="")}
        )
        self.routes[f"{sgx}/rootcacrl"] = Route(200, c["root_ca_crl"].encode())  # a PCCS answers in hex
        self.routes[f"{tee}/tcb?fmspc={platform.fmspc}"] = Route(
            200,
            ('{"tcbInfo":' + c["tcb_info"] + ',"signature":"' + c["tcb_info_signature"] + '"}').encode(),
            {"TCB-Info-Issuer-Chain": quote(c["tcb_info_issuer_chain"], safe="")},
        )
        self.routes[f"{tee}/qe/identity"] = Route(
            200,
            ('{"enclaveIdentity":' + c["qe_identity"] + ',"signature":"' + c["qe_identity_signature"] + '"}').encode(),
            {"SGX-Enclave-Identity-Issuer-Chain": quote(c["qe_identity_issuer_chain"], safe="")},
        )

    def client(self, cache_dir: Path | None, **options: object) -> PcsClient:
        return PcsClient(self.url, cache_dir=cache_dir, **options)  # type: ignore[arg-type]


def _handler_for(pcs: RecordedPcs) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # a silent client cannot hold a server thread for long

        def do_GET(self) -> None:
            pcs.requests.append(self.path)
            route = pcs.routes.get(self.path, Route(404, b'{"error":"not found"}'))
            if route.stall:
                pcs.release.wait(timeout=5)
            try:
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)
            except OSError:
                pass  # the client gave up (timeout test)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def pcs() -> Iterator[RecordedPcs]:
    state = RecordedPcs()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -- fetching ---------------------------------------------------------------------------------


@pytest.mark.parametrize("platform", [SGX, TDX, TDX_V5], ids=["sgx", "tdx_v4", "tdx_v5"])
def test_fetch_returns_the_recorded_collateral_field_by_field(pcs: RecordedPcs, platform: Platform) -> None:
    pcs.serve(platform)

    with pcs.client(None) as client:
        fetched = client.fetch_collateral(
            platform.fmspc.lower(),
            tee=platform.tee,  # type: ignore[arg-type]
            pck_ca=platform.pck_ca,  # type: ignore[arg-type]
            now=platform.now,
        )

    recorded = platform.recorded()
    assert list(fetched) == list(COLLATERAL_KEYS) == list(recorded)
    for key in COLLATERAL_KEYS:
        assert fetched[key] == recorded[key], key
    assert sorted(pcs.requests) == sorted(pcs.routes)


def test_signed_text_is_cut_exactly_whatever_the_member_order_and_spacing(pcs: RecordedPcs) -> None:
    pcs.serve(SGX)
    c = SGX.recorded()
    pcs.routes["/sgx/certification/v4/tcb?fmspc=00A067110000"].body = (
        '{ "signature" : "' + c["tcb_info_signature"].upper() + '",\n  "tcbInfo" :\t' + c["tcb_info"] + "\n}\n"
    ).encode()

    with pcs.client(None) as client:
        fetched = client.fetch_collateral(SGX.fmspc, tee="sgx", pck_ca="processor", now=SGX.now)

    assert fetched["tcb_info"] == c["tcb_info"]
    assert fetched["tcb_info_signature"] == c["tcb_info_signature"]


def test_pcs_style_root_crl_url_and_pem_pck_crl_are_accepted(pcs: RecordedPcs) -> None:
    pcs.serve(SGX)
    c = SGX.recorded()
    del pcs.routes["/sgx/certification/v4/rootcacrl"]
    pcs.routes["/IntelSGXRootCA.der"] = Route(200, bytes.fromhex(c["root_ca_crl"]))
    pem = x509.load_der_x509_crl(bytes.fromhex(c["pck_crl"])).public_bytes(Encoding.PEM)
    pcs.routes["/sgx/certification/v4/pckcrl?ca=processor&encoding=der"].body = pem

    with pcs.client(None, root_ca_crl_url=f"{pcs.url}/IntelSGXRootCA.der") as client:
        fetched = client.fetch_collateral(SGX.fmspc, tee="sgx", pck_ca="processor", now=SGX.now)

    assert fetched == c
    assert "/IntelSGXRootCA.der" in pcs.requests


def test_root_crl_comes_from_intel_for_pcs_and_from_the_pccs_otherwise() -> None:
    with PcsClient(INTEL_PCS_URL, cache_dir=None) as intel, PcsClient("https://pccs:8081/", cache_dir=None) as pccs:
        assert intel.root_ca_crl_url == INTEL_ROOT_CA_CRL_URL
        assert pccs.root_ca_crl_url == "https://pccs:8081/sgx/certification/v4/rootcacrl"


# -- the cache --------------------------------------------------------------------------------


def test_second_fetch_within_next_update_comes_from_the_cache(pcs: RecordedPcs, tmp_path: Path) -> None:
    pcs.serve(SGX)
    cache = tmp_path / "cache"
    with pcs.client(cache) as client:
        first = client.fetch_collateral(SGX.fmspc, tee="sgx", pck_ca="processor", now=SGX.now)
    asked = len(pcs.requests)

    with pcs.client(cache) as client:
        second = client.fetch_collateral(
            SGX.fmspc, tee="sgx", pck_ca="processor", now=SGX_EXPIRES - timedelta(seconds=1)
        )

    assert second == first == SGX.recorded()
    assert len(pcs.requests) == asked == 4
    assert stat.S_IMODE((cache / SGX_CACHE_FILE).stat().st_mode) == 0o600
    assert load_collateral_file(cache / SGX_CACHE_FILE) == first  # a cache entry also works offline


def test_fetch_at_next_update_downloads_again(pcs: RecordedPcs, tmp_path: Path) -> None:
    pcs.serve(SGX)
    assert earliest_next_update(SGX.recorded()) == SGX_EXPIRES
    with pcs.client(tmp_path) as client:
        client.fetch_collateral(SGX.fmspc, tee="sgx", pck_ca="processor", now=SGX.now)

        client.fetch_collateral(SGX.fmspc, tee="sgx", pck_ca="processor", now=SGX_EXPIRES)

    assert len(pcs.requests) == 8


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"tcb_info": ',
        b"[]",
        b'{"tcb_info": "{}"}',
        json.dumps({**SGX.recorded(), "qe_identity": '{"id":"QE"}'}).encode(),
        json.dumps({**SGX.recorded(), "pck_crl": "zz"}).encode(),
        json.dumps({**SGX.recorded(), "root_ca_crl": "3082"}).encode(),
        b"\xff\xfe",
    ],
    ids=[
        "empty",
        "truncated",
        "not_object",
        "missing_keys",
        "no_next_update",
        "crl_not_hex",
        "crl_truncated",
        "binary",
    ],
)
def test_corrupt_cache_entry_is_fetched_again(pcs: RecordedPcs, tmp_path: Path, content: bytes) -> None:
    pcs.serve(SGX)
    (tmp_path / SGX_CACHE_FILE).write_bytes(content)

    with pcs.client(tmp_path) as client:
        fetched = client.fetch_collateral(SGX.fmspc, tee="sgx", pck_ca="processor", now=SGX.now)

    assert fetched == SGX.recorded()
    assert len(pcs.requests) == 4
    assert load_collateral_file(tmp_path / SGX_CACHE_FILE) == fetched


# -- failures ---------------------------------------------------------------------------------


def _fetch_sgx(client: PcsClient) -> dict[str, str]:
    return client.fetch_collateral(SGX.fmspc, tee="sgx", pck_ca="processor", now=SGX.now)


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_names_the_url_and_status(pcs: RecordedPcs, status: int) -> None:
    pcs.serve(SGX)
    pcs.routes["/sgx/certification/v4/tcb?fmspc=00A067110000"] = Route(
        status, b"{}", {"Error-Code": "InvalidParameter", "Error-Message": "bad \t fmspc"}
    )

    with pcs.client(None) as client, pytest.raises(AttestationError) as caught:
        _fetch_sgx(client)

    error = caught.value
    assert error.reason == "collateral_unavailable"
    assert f"{pcs.url}/sgx/certification/v4/tcb?fmspc=00A067110000 answered HTTP {status}" in error.what
    assert "InvalidParameter bad fmspc" in error.what
    assert f"is PCCS running at {pcs.url}?" in error.hint
    assert "--collateral DIR" in error.hint
    assert "\n" not in error.diagnostics()


def test_connection_refused_names_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: every connect is refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with PcsClient(url, cache_dir=None) as client, pytest.raises(AttestationError) as caught:
            _fetch_sgx(client)

    assert caught.value.reason == "collateral_unavailable"
    assert caught.value.what.startswith(f"cannot fetch {url}/sgx/certification/v4/pckcrl?ca=processor")
    assert "\n" not in caught.value.diagnostics()


def test_timeout_names_the_url_and_the_limit(pcs: RecordedPcs) -> None:
    pcs.serve(SGX)
    pcs.routes["/sgx/certification/v4/qe/identity"].stall = True

    with pcs.client(None, timeout=0.3) as client, pytest.raises(AttestationError) as caught:
        _fetch_sgx(client)

    assert caught.value.reason == "collateral_unavailable"
    assert caught.value.what == f"{pcs.url}/sgx/certification/v4/qe/identity did not answer within 0.3 s"
    assert "\n" not in caught.value.diagnostics()


TCB_PATH = "/sgx/certification/v4/tcb?fmspc=00A067110000"
PCK_CRL_PATH = "/sgx/certification/v4/pckcrl?ca=processor&encoding=der"


@pytest.mark.parametrize(
    ("path", "body", "headers", "message"),
    [
        (TCB_PATH, b"<html>maintenance</html>", None, "body is not a JSON object"),
        (TCB_PATH, b'{"tcbInfo":{"id":"SGX"}}', None, 'body has no "signature" member'),
        (TCB_PATH, b'{"signature":"00"}', None, 'body has no "tcbInfo" member'),
        (TCB_PATH, b'{"tcbInfo":[],"signature":"' + b"ab" * 64 + b'"}', None, '"tcbInfo" is not a JSON object'),
        (TCB_PATH, b'{"tcbInfo":{},"signature":"abcd"}', None, '"signature" is not 64 hex-encoded bytes'),
        (TCB_PATH, b'{"tcbInfo":{},"signature":"' + b"ab" * 64 + b'"} trailing', None, "trailing data"),
        (TCB_PATH, b'{"tcbInfo":{},"tcbInfo":{},"signature":""}', None, "duplicate member"),
        (TCB_PATH, None, {}, "response has no TCB-Info-Issuer-Chain header"),
        (TCB_PATH, None, {"TCB-Info-Issuer-Chain": "not%20a%20chain"}, "is not a URL-encoded PEM chain"),
        (PCK_CRL_PATH, b"not a crl", None, "body is not a CRL"),
        (PCK_CRL_PATH, b"\x30\x82\x01", None, "body is not a CRL"),
    ],
    ids=[
        "html",
        "no_signature",
        "no_tcb_info",
        "tcb_info_not_object",
        "short_signature",
        "trailing_data",
        "duplicate_member",
        "no_chain_header",
        "chain_not_pem",
        "crl_garbage",
        "crl_truncated",
    ],
)
def test_malformed_answer_is_collateral_malformed(
    pcs: RecordedPcs, path: str, body: bytes | None, headers: dict[str, str] | None, message: str
) -> None:
    pcs.serve(SGX)
    route = pcs.routes[path]
    if body is not None:
        route.body = body
    if headers is not None:
        route.headers = headers

    with pcs.client(None) as client, pytest.raises(AttestationError, match=message) as caught:
        _fetch_sgx(client)

    assert caught.value.reason == "collateral_malformed"
    assert caught.value.what.startswith(f"{pcs.url}{path}: ")
    assert "\n" not in caught.value.diagnostics()


def test_tcb_info_without_next_update_is_collateral_malformed(pcs: RecordedPcs) -> None:
    pcs.serve(SGX, {**SGX.recorded(), "tcb_info": '{"id":"SGX"}'})

    with pcs.client(None) as client, pytest.raises(AttestationError, match="no readable nextUpdate") as caught:
        _fetch_sgx(client)

    assert caught.value.reason == "collateral_malformed"


@pytest.mark.parametrize(
    ("fmspc", "tee", "pck_ca", "now"),
    [
        ("00A0671100", "sgx", "processor", SGX.now),
        ("00A067110000", "sev", "processor", SGX.now),
        ("00A067110000", "sgx", "intermediate", SGX.now),
        ("00A067110000", "sgx", "processor", datetime(2025, 7, 1)),  # naive: no time zone
    ],
)
def test_misuse_is_value_error(fmspc: str, tee: str, pck_ca: str, now: datetime) -> None:
    with PcsClient("https://pccs:8081", cache_dir=None) as client, pytest.raises(ValueError):
        client.fetch_collateral(fmspc, tee=tee, pck_ca=pck_ca, now=now)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["pccs:8081", "ftp://pccs", "https://"])
def test_bad_server_url_fails_at_construction(url: str) -> None:
    with pytest.raises(ConfigError, match="is not an http"):
        PcsClient(url, cache_dir=None)


# -- offline collateral -----------------------------------------------------------------------


def test_load_collateral_file_reads_the_recorded_layout() -> None:
    assert load_collateral_file(VECTORS / SGX.vector) == SGX.recorded()


def test_load_collateral_directory_prefers_collateral_json(tmp_path: Path) -> None:
    (tmp_path / "collateral.json").write_text((VECTORS / TDX.vector).read_text())
    (tmp_path / "other_collateral.json").write_text((VECTORS / SGX.vector).read_text())

    assert load_collateral_file(tmp_path) == TDX.recorded()


def test_load_collateral_directory_with_one_named_file(tmp_path: Path) -> None:
    (tmp_path / "platform_collateral.json").write_text((VECTORS / SGX.vector).read_text())

    assert load_collateral_file(tmp_path) == SGX.recorded()


def test_load_collateral_directory_with_several_files_is_ambiguous() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("exactly one *collateral.json (found: dcapqvl_sgx_quote_v3_collateral.json, ")
    ):
        load_collateral_file(VECTORS)


def test_load_missing_collateral_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such collateral file"):
        load_collateral_file(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match=re.escape("(found: none)")):
        load_collateral_file(tmp_path)


def test_load_malformed_collateral_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "collateral.json"
    broken.write_text(json.dumps({**SGX.recorded(), "tcb_info_signature": "12"}))

    with pytest.raises(AttestationError, match="tcb_info_signature is not 64 hex-encoded bytes") as caught:
        load_collateral_file(tmp_path)

    assert caught.value.reason == "collateral_malformed"
    assert caught.value.what.startswith(str(broken))
