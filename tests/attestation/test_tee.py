"""Evidence from the local TEE, against directory trees laid out as Gramine and the kernel expose them.

No hardware here, so a "fake kernel" thread plays the other side of each file protocol on a
temporary directory, the way the real one behaves:

- configfs-tsm: it notices a new report directory and creates its attributes
  (``generation`` last); ``inblob`` and ``outblob`` are FIFOs, so writing ``inblob`` bumps
  ``generation`` and the report is produced only when ``outblob`` is read — in order, with
  no sleeps in the code under test. The report is the real TDX v4 vector quote with its
  REPORTDATA replaced by what was written.
- Gramine: ``user_report_data`` and ``quote`` are FIFOs; reading ``quote`` yields the real
  SGX v3 vector quote carrying the bytes written to ``user_report_data``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import pytest

from enclaveml.attestation.quote import parse_quote
from enclaveml.attestation.sim import SimulationKey, verify_sim_evidence
from enclaveml.attestation.tee import (
    ConfigfsTsmTee,
    GramineTee,
    SimulatedTee,
    Tee,
    detect_tee,
    probe_tees,
)
from enclaveml.errors import ConfigError

DCAP = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "dcap"
SGX_V3 = (DCAP / "dcapqvl_sgx_quote_v3.bin").read_bytes()
TDX_V4 = (DCAP / "dcapqvl_tdx_quote_v4.bin").read_bytes()
SGX_REPORT_DATA, TDX_REPORT_DATA = slice(368, 432), slice(568, 632)
HELLO = b"Hello, world!".ljust(64, b"\0")  # the REPORTDATA inside the SGX vector
T = TypeVar("T")


def with_report_data(quote: bytes, where: slice, data: bytes) -> bytes:
    return quote[: where.start] + data + quote[where.stop :]


def bounded(fn: Callable[[], T], timeout: float = 20.0) -> T:
    """Run ``fn`` in a daemon thread so that a protocol bug fails the test instead of hanging it."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout} s"
    if error:
        raise error[0]
    return result[0]


# -- the other side of the files ----------------------------------------------------------------


class FakeDevice:
    """Serves request FIFO -> response FIFO pairs in background threads until stopped."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def spawn(self, fn: Callable[[], None]) -> None:
        thread = threading.Thread(target=fn, daemon=True)
        self.threads.append(thread)
        thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)

    def requests(self, fifo: Path, alive: Callable[[], bool]) -> Iterator[bytes]:
        """Each write to ``fifo`` (held open for reading and writing, so it never reports EOF)."""
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            while not self.stop.is_set() and alive():
                ready, _, _ = select.select([fd], [], [], 0.01)
                if ready:
                    yield os.read(fd, 4096)
        finally:
            os.close(fd)

    def respond(self, fifo: Path, data: bytes, alive: Callable[[], bool]) -> None:
        """Wait for the reader of ``fifo``, then give it ``data`` and EOF."""
        while not self.stop.is_set() and alive():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: nobody reads yet
                    return
                time.sleep(0.001)
                continue
            os.set_blocking(fd, True)
            try:
                with contextlib.suppress(BrokenPipeError):
                    os.write(fd, data)
            finally:
                os.close(fd)
            return


def write_atomically(path: Path, data: bytes) -> None:
    """Readers never see a half-written file; the temporary file lives outside the report tree."""
    tmp = path.parent.parent.parent / f".{path.parent.name}.{path.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)


class FakeTsm(FakeDevice):
    """The kernel's configfs-tsm report subsystem on a plain directory."""

    def __init__(self, root: Path, provider: str = "tdx_guest", *, races: int = 0, omit: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.root, self.provider, self.races, self.omit = root, provider, races, omit
        self.inblobs: list[bytes] = []
        self.entries: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        self.spawn(self._watch)

    def report_for(self, inblob: bytes) -> bytes:
        if self.provider == "tdx_guest":
            return with_report_data(TDX_V4, TDX_REPORT_DATA, inblob.ljust(64, b"\0"))
        return b"SNP-REPORT" + inblob  # an opaque provider format

    def _watch(self) -> None:
        known: set[str] = set()
        while not self.stop.is_set():
            for entry in os.scandir(self.root):
                if entry.is_dir() and entry.name not in known:
                    known.add(entry.name)
                    self.entries.append(entry.name)
                    self.spawn(lambda path=Path(entry.path): self._serve(path))
            time.sleep(0.002)

    def _serve(self, entry: Path) -> None:
        with contextlib.suppress(FileNotFoundError):  # the entry was removed meanwhile
            self._serve_entry(entry)

    def _serve_entry(self, entry: Path) -> None:
        for name in ("inblob", "outblob"):
            if name not in self.omit:
                os.mkfifo(entry / name)
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "auxblob").write_bytes(b"")
        (entry / "privlevel_floor").write_text("0\n")
        generation = 0
        write_atomically(entry / "generation", b"0\n")  # last: the entry is ready
        if "inblob" in self.omit:
            return
        for inblob in self.requests(entry / "inblob", entry.is_dir):
            self.inblobs.append(inblob)
            generation += 1
            if self.races > 0:  # another process writes inblob in between
                self.races -= 1
                generation += 1
            write_atomically(entry / "generation", f"{generation}\n".encode())
            if "outblob" not in self.omit:
                self.respond(entry / "outblob", self.report_for(inblob), entry.is_dir)


class FakeGramine(FakeDevice):
    """Gramine's /dev/attestation inside an enclave with ``sgx.remote_attestation = "dcap"``."""

    def __init__(self, root: Path, *, attestation_type: str = "dcap", quote: Callable[[bytes], bytes] | None = None):
        super().__init__()
        self.root = root
        self.quote = quote or (lambda data: with_report_data(SGX_V3, SGX_REPORT_DATA, data))
        root.mkdir(parents=True)
        (root / "attestation_type").write_text(attestation_type)
        (root / "my_target_info").write_bytes(bytes(512))
        os.mkfifo(root / "user_report_data")
        os.mkfifo(root / "quote")
        self.spawn(self._serve)

    def _serve(self) -> None:
        for data in self.requests(self.root / "user_report_data", self.root.is_dir):
            report_data = data[:64].ljust(64, b"\0")  # Gramine pads short writes, truncates long ones
            self.respond(self.root / "quote", self.quote(report_data), self.root.is_dir)


@pytest.fixture
def fakes() -> Iterator[list[FakeDevice]]:
    started: list[FakeDevice] = []
    yield started
    for fake in started:
        fake.close()


@pytest.fixture
def tsm(tmp_path: Path, fakes: list[FakeDevice]) -> Callable[..., FakeTsm]:
    def make(provider: str = "tdx_guest", **options: object) -> FakeTsm:
        fake = FakeTsm(tmp_path / "tsm" / "report", provider, **options)  # type: ignore[arg-type]
        fakes.append(fake)
        return fake

    return make


@pytest.fixture
def gramine(tmp_path: Path, fakes: list[FakeDevice]) -> Callable[..., FakeGramine]:
    def make(**options: object) -> FakeGramine:
        fake = FakeGramine(tmp_path / "attestation", **options)  # type: ignore[arg-type]
        fakes.append(fake)
        return fake

    return make


def roots(tmp_path: Path) -> dict[str, Path]:
    """Where detect_tee / probe_tees look: nothing exists there unless a test creates it."""
    (tmp_path / "dev").mkdir(exist_ok=True)
    return {
        "gramine_root": tmp_path / "attestation",
        "tsm_root": tmp_path / "tsm" / "report",
        "dev_root": tmp_path / "dev",
    }


def sim_tee() -> SimulatedTee:
    return SimulatedTee(SimulationKey.generate(), bytes(range(48)), b"nonce-1")


# -- Gramine ------------------------------------------------------------------------------------


def test_gramine_returns_the_quote_for_the_report_data_written(gramine: Callable[..., FakeGramine]) -> None:
    fake = gramine()
    tee = GramineTee(fake.root)
    assert (tee.name, tee.kind, tee.attestation_type()) == ("gramine", "sgx", "dcap")
    # The vector was made for "Hello, world!": asking for that gives back the vector, byte for byte.
    assert bounded(lambda: tee.evidence(HELLO)) == SGX_V3
    report_data = bytes(range(64))
    quote = bounded(lambda: tee.evidence(report_data))
    assert quote == with_report_data(SGX_V3, SGX_REPORT_DATA, report_data)
    assert parse_quote(quote).body.report_data == report_data


def test_gramine_without_dcap_says_how_to_enable_it(gramine: Callable[..., FakeGramine]) -> None:
    fake = gramine(attestation_type="none\n")
    with pytest.raises(ConfigError) as caught:
        GramineTee(fake.root).evidence(bytes(64))
    assert "attestation_type is 'none', not 'dcap'" in caught.value.what
    assert 'sgx.remote_attestation = "dcap"' in caught.value.hint


def test_gramine_outside_an_enclave_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        GramineTee(tmp_path / "attestation").evidence(bytes(64))
    assert caught.value.what == f"{tmp_path}/attestation/attestation_type: cannot read: no such file"
    assert "gramine-sgx" in caught.value.hint


@pytest.mark.parametrize(("missing", "doing"), [("user_report_data", "write"), ("quote", "read")])
def test_gramine_missing_pseudo_file_is_named(tmp_path: Path, missing: str, doing: str) -> None:
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "attestation_type").write_text("dcap")
    for name in {"user_report_data", "quote"} - {missing}:
        (root / name).write_bytes(SGX_V3 if name == "quote" else bytes(64))
    with pytest.raises(ConfigError) as caught:
        GramineTee(root).evidence(bytes(64))
    assert caught.value.what == f"{root / missing}: cannot {doing}: no such file"


def test_gramine_stale_quote_is_refused(gramine: Callable[..., FakeGramine]) -> None:
    fake = gramine(quote=lambda data: SGX_V3)  # ignores what was written
    with pytest.raises(ConfigError) as caught:
        bounded(lambda: GramineTee(fake.root).evidence(bytes(64)))
    assert "the quote carries report data 48656c6c6f2c2077" in caught.value.what
    assert str(fake.root / "quote") in caught.value.what


def test_gramine_garbage_quote_is_refused(gramine: Callable[..., FakeGramine]) -> None:
    fake = gramine(quote=lambda data: b"\x03\x00garbage")
    with pytest.raises(ConfigError, match="not a DCAP quote"):
        bounded(lambda: GramineTee(fake.root).evidence(bytes(64)))


def test_report_data_must_be_64_bytes(tmp_path: Path) -> None:
    for tee in (GramineTee(tmp_path), ConfigfsTsmTee(tmp_path, provider="tdx_guest"), sim_tee()):
        with pytest.raises(ValueError, match="64 bytes"):
            tee.evidence(b"short")


# -- configfs-tsm -------------------------------------------------------------------------------


def test_tsm_report_follows_the_kernel_protocol(tsm: Callable[..., FakeTsm]) -> None:
    fake = tsm()
    tee = ConfigfsTsmTee(fake.root)
    report_data = bytes(range(64))
    report = bounded(lambda: tee.report(report_data))
    assert report.provider == "tdx_guest"
    assert report.outblob == with_report_data(TDX_V4, TDX_REPORT_DATA, report_data)
    assert parse_quote(report.outblob).body.report_data == report_data
    assert (report.generation, report.attempts, report.auxblob) == (1, 1, None)
    assert fake.inblobs == [report_data]
    assert (tee.name, tee.kind) == ("configfs-tsm", "tdx")
    assert list(fake.root.iterdir()) == []  # the report entry is removed
    assert fake.entries[0].startswith(f"enclaveml-{os.getpid()}-")


def test_tsm_kind_comes_from_the_provider(tsm: Callable[..., FakeTsm]) -> None:
    fake = tsm("sev_guest")
    tee = ConfigfsTsmTee(fake.root)
    assert bounded(lambda: tee.kind) == "snp"
    assert bounded(lambda: tee.evidence(bytes(64))) == b"SNP-REPORT" + bytes(64)
    assert list(fake.root.iterdir()) == []


def test_tsm_unknown_provider_is_an_error(tsm: Callable[..., FakeTsm]) -> None:
    fake = tsm("arm_cca_guest")
    with pytest.raises(ConfigError, match="provider 'arm_cca_guest' is not supported"):
        bounded(lambda: ConfigfsTsmTee(fake.root).kind)


def test_tsm_concurrent_requests_use_their_own_entries(tsm: Callable[..., FakeTsm]) -> None:
    fake = tsm()
    tee = ConfigfsTsmTee(fake.root, provider="tdx_guest")
    results: dict[int, bytes] = {}

    def request(i: int) -> None:
        results[i] = tee.evidence(bytes([i]) * 64)

    def run_all() -> None:
        threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    bounded(run_all)
    assert {i: parse_quote(q).body.report_data for i, q in results.items()} == {i: bytes([i]) * 64 for i in range(4)}
    assert len(set(fake.entries)) == 4
    assert list(fake.root.iterdir()) == []


def test_tsm_generation_race_is_retried(tsm: Callable[..., FakeTsm], caplog: pytest.LogCaptureFixture) -> None:
    fake = tsm(races=1)
    with caplog.at_level(logging.WARNING, "enclaveml.attestation.tee"):
        report = bounded(lambda: ConfigfsTsmTee(fake.root).report(bytes(64)))
    assert report.attempts == 2
    assert report.generation == 3  # ours, the other writer's, ours again
    assert "generation went 0 -> 2, expected 1; retrying" in caplog.text
    assert list(fake.root.iterdir()) == []


def test_tsm_generation_race_every_time_is_an_error(tsm: Callable[..., FakeTsm]) -> None:
    fake = tsm(races=10)
    with pytest.raises(ConfigError) as caught:
        bounded(lambda: ConfigfsTsmTee(fake.root, max_attempts=3).evidence(bytes(64)))
    assert "generation changed by another writer on every one of 3 attempts (0->2, 2->4, 4->6)" in caught.value.what
    assert f"writing to {fake.root}" in caught.value.hint
    assert len(fake.inblobs) == 3
    assert list(fake.root.iterdir()) == []


@pytest.mark.parametrize(("missing", "doing"), [("inblob", "write"), ("outblob", "read")])
def test_tsm_missing_attribute_is_named(tsm: Callable[..., FakeTsm], missing: str, doing: str) -> None:
    fake = tsm(omit=(missing,))
    with pytest.raises(ConfigError) as caught:
        bounded(lambda: ConfigfsTsmTee(fake.root, provider="tdx_guest").evidence(bytes(64)))
    entry = fake.root / fake.entries[0]
    assert caught.value.what == f"{entry / missing}: cannot {doing}: no such file"
    assert list(fake.root.iterdir()) == []


def test_tsm_without_configfs_names_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "tsm" / "report"
    with pytest.raises(ConfigError) as caught:
        ConfigfsTsmTee(root).evidence(bytes(64))
    assert caught.value.what == f"{root}: no such directory: configfs-tsm is not available"
    assert "mount -t configfs" in caught.value.hint


def test_tsm_entry_without_attributes_is_reported_not_awaited_forever(tmp_path: Path) -> None:
    root = tmp_path / "report"
    root.mkdir()  # nothing plays the kernel: mkdir succeeds, no attributes appear
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"/generation: cannot read: no such file"):
        ConfigfsTsmTee(root, attribute_wait_s=0.2).evidence(bytes(64))
    assert time.monotonic() - started < 5
    assert list(root.iterdir()) == []


# -- simulation ---------------------------------------------------------------------------------


def test_simulated_tee_signs_the_report_data() -> None:
    at = datetime(2025, 7, 1, tzinfo=UTC)
    tee = SimulatedTee(SimulationKey.generate(), bytes(48), b"n", clock=lambda: at)
    evidence = tee.evidence(bytes(range(64)))
    claims = verify_sim_evidence(evidence, trusted_keys=[tee.key.public_key], expected_nonce=b"n", now=at)
    assert (tee.kind, claims.report_data, claims.insecure) == ("sim", bytes(range(64)), True)


# -- detection: never a silent simulation -------------------------------------------------------


def test_no_tee_is_an_error_even_with_a_sim_at_hand(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        detect_tee(**roots(tmp_path))
    assert caught.value.what.startswith("no TEE found: sgx: no ")
    assert caught.value.hint == "run `enclaveml doctor`; for development pass --tee sim"
    with pytest.raises(ValueError, match="no SimulatedTee"):
        detect_tee(**roots(tmp_path), allow_sim=True)


def test_sim_only_when_allowed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sim = sim_tee()
    with caplog.at_level(logging.WARNING, "enclaveml.attestation.tee"):
        assert detect_tee(**roots(tmp_path), allow_sim=True, sim=sim) is sim
    assert "INSECURE" in caplog.text
    assert detect_tee(**roots(tmp_path), want="sim", sim=sim) is sim


def test_a_real_tee_wins_over_allowed_simulation(tmp_path: Path, gramine: Callable[..., FakeGramine]) -> None:
    gramine()
    tee: Tee = detect_tee(**roots(tmp_path), allow_sim=True, sim=sim_tee())
    assert isinstance(tee, GramineTee)
    assert bounded(lambda: tee.evidence(HELLO)) == SGX_V3


def test_detects_tdx_and_snp_through_configfs(tmp_path: Path, tsm: Callable[..., FakeTsm]) -> None:
    tsm("tdx_guest")
    tee = bounded(lambda: detect_tee(**roots(tmp_path)))
    assert isinstance(tee, ConfigfsTsmTee)
    assert tee.kind == "tdx"
    with pytest.raises(ConfigError, match=r"^no SGX found: sgx: no "):
        bounded(lambda: detect_tee(**roots(tmp_path), want="sgx"))
    with pytest.raises(ConfigError, match="provider is 'tdx_guest'"):
        bounded(lambda: detect_tee(**roots(tmp_path), want="snp"))


def test_gramine_with_attestation_none_is_not_picked(tmp_path: Path, gramine: Callable[..., FakeGramine]) -> None:
    gramine(attestation_type="none")
    with pytest.raises(ConfigError, match="attestation_type is 'none'"):
        detect_tee(**roots(tmp_path))


# -- probes -------------------------------------------------------------------------------------


def test_probe_nothing_present(tmp_path: Path) -> None:
    probes = probe_tees(**roots(tmp_path), try_evidence=True)
    assert [(p.kind, p.present, p.usable, p.evidence_ok) for p in probes] == [
        ("sgx", False, False, None),
        ("tdx", False, False, None),
        ("snp", False, False, None),
        ("sim", True, True, True),
    ]
    assert all(p.hint for p in probes[:3])
    assert "used only with --tee sim" in probes[3].detail


def test_probe_device_nodes_without_a_usable_interface(tmp_path: Path) -> None:
    where = roots(tmp_path)
    for node in ("sgx_enclave", "sgx_provision", "tdx_guest"):
        (where["dev_root"] / node).touch()
    sgx, tdx, snp, _ = probe_tees(**where)
    assert (sgx.source, sgx.present, sgx.usable) == ("device", True, False)
    assert "not inside a Gramine enclave" in sgx.detail
    assert sgx.hint == "run the workload under gramine-sgx"
    assert (tdx.source, tdx.present, tdx.usable) == ("device", True, False)
    assert "no usable configfs-tsm report" in tdx.detail
    assert "kernel >= 6.7" in tdx.hint
    assert (snp.present, snp.usable) == (False, False)


def test_probe_tries_evidence_from_each_usable_tee(
    tmp_path: Path, gramine: Callable[..., FakeGramine], tsm: Callable[..., FakeTsm]
) -> None:
    gramine()
    tsm("sev_guest")
    sgx, tdx, snp, sim = bounded(lambda: probe_tees(**roots(tmp_path), try_evidence=True))
    assert (sgx.usable, sgx.evidence_ok, sgx.evidence_detail) == (True, True, f"{len(SGX_V3)} bytes from gramine")
    assert sim.evidence_detail.endswith("bytes from sim, signature verified")
    assert (tdx.usable, tdx.evidence_ok) == (False, None)
    assert (snp.usable, snp.evidence_ok, snp.source) == (True, True, "configfs-tsm")
    assert sim.evidence_ok
    assert sgx.paths == (str(tmp_path / "attestation"), str(tmp_path / "dev" / "sgx_enclave"),
                         str(tmp_path / "dev" / "sgx_provision"))  # fmt: skip


def test_probe_reports_failed_evidence(tmp_path: Path, gramine: Callable[..., FakeGramine]) -> None:
    gramine(quote=lambda data: b"")
    sgx = bounded(lambda: probe_tees(**roots(tmp_path), try_evidence=True))[0]
    assert (sgx.usable, sgx.evidence_ok) == (True, False)
    assert sgx.evidence_detail == f"{tmp_path / 'attestation' / 'quote'}: empty quote"
    assert "PCCS reachable" in sgx.hint
