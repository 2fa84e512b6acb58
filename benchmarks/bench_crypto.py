"""Throughput and memory benchmark of the EML v1 container (``make bench``; not a test).

From one run on one machine it prints:

1. In memory, pinned to one core: the container over a ``--mem-mib`` buffer
   (``seal_buffer`` / ``open_buffer``, the core of ``encrypt_bytes`` / ``decrypt_bytes``,
   with a prepared cipher: the one KMS wrap is left out) into a preallocated output, against
   two baselines: ONE raw ``cryptography`` AESGCM ``encrypt_into`` / ``decrypt_into`` call
   over the same whole buffer into a preallocated output (both read and write DRAM), and
   ``openssl speed -evp aes-256-gcm`` at the segment size. The faster baseline is the
   limit. References only: raw calls repeated on one cache-hot segment-sized buffer, the
   stream path (``encrypt_stream`` / ``decrypt_stream`` from a ``BytesIO``, what files
   use), and the public ``encrypt_bytes`` / ``decrypt_bytes`` calls. The sweep over 16 KiB
   to 1 MiB segments backs or corrects the default segment size.
2. File to file: ``encrypt_file`` / ``decrypt_file`` of a ``--size-mib`` file against a
   plain ``cp`` of it, each in a fresh process so that its peak RSS is its own; once into
   the page cache ("cached") and once including an fsync of the output ("durable"). Each
   round runs every operation ``--file-reps`` times and keeps its fastest run: page-cache
   writes in these VMs now and then take several times longer.
3. Peak RSS on a 64 MiB file too, to show that it does not grow with the file size.

These machines change speed by up to 2x within minutes, so baseline and candidate runs
alternate within every round (their order changes from round to round), and each ratio is
the median of the per-round ratios. GB/s means 10^9 bytes per second of plaintext.
Exit status is 0 whether goals are met or not; it is 1 only if a round trip is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import cryptography
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclaveml.crypto import DEFAULT_SEGMENT_SIZE, BoundHeader, decrypt_bytes, encrypt_bytes
from enclaveml.crypto._format import TAG_SIZE
from enclaveml.crypto._stream import (
    SegmentCipher,
    decrypt_stream,
    encrypt_stream,
    open_buffer,
    seal_buffer,
    sealed_size,
)
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms

KIB = 1024
MIB = 1024 * KIB
SWEEP = (16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB)
GOAL_MEMORY = 0.85  # of the faster baseline
GOAL_FILE = 0.80  # of cp
GOAL_RSS_MIB = 64
RSS_SMALL_MIB = 64
RSS_SLACK_MIB = 2  # "independent of size": peak RSS at --size-mib within this of the 64 MiB file
PASSPHRASE = "bench"  # noqa: S105 (a throwaway key store in a temporary directory)
KEY = "bench"
REPO = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter per file operation, importing only what the CLI would, so
# that its peak RSS (its own VmHWM) is the operation's. The key store is unlocked before
# the clock starts; the clock covers the operation and, for "durable", the output's fsync.
CHILD = """
import json, os, sys, time
from pathlib import Path
from enclaveml.crypto import decrypt_file, encrypt_file
from enclaveml.kms import LocalKms
op, src, dst, store, passphrase, key, durable = sys.argv[1:8]
kms = LocalKms(Path(store), passphrase)
kms.describe_key(key)
start = time.perf_counter()
if op == "encrypt":
    encrypt_file(src, dst, kms, key)
else:
    decrypt_file(src, dst, kms)
if durable == "1":
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
seconds = time.perf_counter() - start
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "vmhwm_kib": peak}))
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def gbps(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e9:6.2f}"


def size_name(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------------------
# Machine


def caches() -> str:
    """Data and unified cache sizes of cpu0, e.g. ``L1 48K, L2 1024K, L3 32768K``."""
    found = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "type").read_text().strip() != "Instruction":
                found.append(f"L{(index / 'level').read_text().strip()} {(index / 'size').read_text().strip()}")
        except OSError:
            continue
    return ", ".join(found) or "unknown"


def machine() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    openssl = shutil.which("openssl")
    system_openssl = "missing"
    if openssl:
        system_openssl = subprocess.run([openssl, "version"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": fields.get("model name") or platform.processor() or "unknown",
        "cpu_id": f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}",
        "cpus": f"{os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable",
        "caches": caches(),
        "isa": ", ".join(
            f"{name} {'yes' if flag in flags else 'no'}"
            for name, flag in (("AVX-512F", "avx512f"), ("VAES", "vaes"), ("VPCLMULQDQ", "vpclmulqdq"))
        ),
        "python": platform.python_version(),
        "cryptography": f"{cryptography.__version__} ({openssl_backend.openssl_version_text()})",
        "system_openssl": system_openssl,
    }


# ---------------------------------------------------------------------------------------
# In memory


class Discard:
    """A sink that drops what it is given (the stream path's output)."""

    def write(self, data: memoryview) -> int:
        return len(data)


def rate(run: Callable[[], object], nbytes: int, min_time: float) -> float:
    """Call ``run`` (which processes ``nbytes``) until ``min_time`` passed; bytes per second."""
    calls = 0
    start = time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return calls * nbytes / elapsed


def openssl_speed(segment: int, decrypt: bool) -> float | None:
    """``openssl speed -evp aes-256-gcm`` at ``-bytes segment``: bytes per second, or None."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cmd = [openssl, "speed", "-evp", "aes-256-gcm", "-bytes", str(segment), "-seconds", "1"]
    if decrypt:
        cmd.append("-decrypt")
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].endswith("k"):
        return None
    return float(lines[-1].split()[-1][:-1]) * 1000  # "AES-256-GCM  5088215.04k": 1000s of bytes/s


def repeat(
    call: Callable[..., object], nonce: bytes, buf: bytes | bytearray, aad: bytes, out: bytearray, calls: int
) -> None:
    """``calls`` raw calls on the same (cache-hot) segment-sized buffer."""
    for _ in range(calls):
        call(nonce, buf, aad, out)


def stream_encrypt(cipher: SegmentCipher, data: bytes) -> None:
    encrypt_stream(cipher, io.BytesIO(data), Discard())  # type: ignore[arg-type]


def stream_decrypt(cipher: SegmentCipher, sealed: bytes) -> None:
    decrypt_stream(cipher, io.BytesIO(sealed), Discard())  # type: ignore[arg-type]


Series = dict[str, list[float]]  # measurement name -> one value per round
Job = tuple[str, Callable[[], float | None]]


def bench_memory(data: bytes, rounds: int, min_time: float, workdir: Path) -> dict[int, Series]:
    """Per segment size and round: the container, its baselines and references, both ways.

    All buffers are allocated (and so faulted in) before the clock starts. ``whole`` and
    ``EML`` read the same ``data`` and write into the same output buffers.
    """
    n = len(data)
    key = os.urandom(32)
    aead = AESGCM(key)
    source = memoryview(data)
    sealed_out = bytearray(sealed_size(min(SWEEP), n))  # the largest payload of the sweep
    plain_out = bytearray(n)
    nonce = os.urandom(12)
    whole_aad = os.urandom(64)  # about the size of a bound header
    whole_sealed = aead.encrypt(nonce, source, whole_aad)  # the input of the one-call decrypt baseline
    jobs: dict[int, list[Job]] = {}
    for segment in SWEEP:
        header = BoundHeader.create(
            segment_size=segment, nonce_prefix=os.urandom(7), kms_name="local", key_id="k-0123456789abcdef", context={}
        )
        cipher, aad = SegmentCipher(key, header), header.raw
        eml_out = memoryview(sealed_out)[: sealed_size(segment, n)]
        seal_buffer(cipher, source, eml_out)
        sealed = bytes(eml_out)
        collect = io.BytesIO()
        encrypt_stream(cipher, io.BytesIO(data), collect)
        open_buffer(cipher, memoryview(sealed), memoryview(plain_out))
        if collect.getvalue() != sealed or plain_out != data:
            raise SystemExit(f"in-memory round trip failed at segment size {segment}")
        del collect
        hot_in = bytearray(data[:segment])
        hot_out = bytearray(segment + TAG_SIZE)
        hot_plain = bytearray(segment)
        hot_sealed = aead.encrypt(nonce, hot_in, aad)
        whole_out = memoryview(sealed_out)[: n + TAG_SIZE]
        calls = n // segment
        jobs[segment] = [
            ("openssl enc", partial(openssl_speed, segment, False)),
            ("whole enc", partial(rate, partial(aead.encrypt_into, nonce, source, whole_aad, whole_out), n, min_time)),
            (
                "hot enc",
                partial(rate, partial(repeat, aead.encrypt_into, nonce, hot_in, aad, hot_out, calls), n, min_time),
            ),
            ("EML enc", partial(rate, partial(seal_buffer, cipher, source, eml_out), n, min_time)),
            ("stream enc", partial(rate, partial(stream_encrypt, cipher, data), n, min_time)),
            ("openssl dec", partial(openssl_speed, segment, True)),
            (
                "whole dec",
                partial(rate, partial(aead.decrypt_into, nonce, whole_sealed, whole_aad, plain_out), n, min_time),
            ),
            (
                "hot dec",
                partial(
                    rate, partial(repeat, aead.decrypt_into, nonce, hot_sealed, aad, hot_plain, calls), n, min_time
                ),
            ),
            (
                "EML dec",
                partial(rate, partial(open_buffer, cipher, memoryview(sealed), memoryview(plain_out)), n, min_time),
            ),
            ("stream dec", partial(rate, partial(stream_decrypt, cipher, sealed), n, min_time)),
        ]
    # The public calls, at the default segment size: also one KMS wrap or unwrap, and a new output each time;
    # next to them, one raw encrypt / decrypt over the whole buffer, which also returns a new output.
    kms = LocalKms.init(workdir / "keystore.json", PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS)
    kms.create_key(KEY)
    blob = encrypt_bytes(data, kms, KEY)
    if decrypt_bytes(blob, kms) != data:
        raise SystemExit("encrypt_bytes / decrypt_bytes round trip failed")
    jobs[DEFAULT_SEGMENT_SIZE] += [
        ("API enc", partial(rate, partial(encrypt_bytes, data, kms, KEY), n, min_time)),
        ("API dec", partial(rate, partial(decrypt_bytes, blob, kms), n, min_time)),
        ("fresh enc", partial(rate, partial(aead.encrypt, nonce, source, whole_aad), n, min_time)),
        ("fresh dec", partial(rate, partial(aead.decrypt, nonce, whole_sealed, whole_aad), n, min_time)),
    ]
    results: dict[int, Series] = {segment: {name: [] for name, _ in jobs[segment]} for segment in SWEEP}
    for round_no in range(rounds):
        for segment in SWEEP:
            order = jobs[segment] if round_no % 2 == 0 else jobs[segment][::-1]
            for name, job in order:
                value = job()
                results[segment][name].append(float("nan") if value is None else value)
            r = {name: gbps(values[-1]).strip() for name, values in results[segment].items()}
            say(
                f"  round {round_no + 1}/{rounds} {size_name(segment):>7}: EML enc {r['EML enc']}, dec {r['EML dec']};"
                f" whole enc {r['whole enc']}, dec {r['whole dec']}; openssl enc {r['openssl enc']},"
                f" dec {r['openssl dec']} GB/s"
            )
    return results


def best(*series: list[float]) -> list[float]:
    """Per round, the fastest of several baselines (NaN, a missing baseline, is skipped)."""
    return [max((v for v in values if v == v), default=float("nan")) for values in zip(*series, strict=True)]


def ratios(candidate: list[float], baseline: list[float]) -> float:
    """Median of per-round ratios."""
    return median([c / b for c, b in zip(candidate, baseline, strict=True)])


def ratio_text(value: float) -> str:
    return f"{value:.3f}" if value == value else "n/a"


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        say(" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


def report_memory(results: dict[int, Series], mem_mib: int, rounds: int, cpu: int) -> dict[str, float]:
    say(f"\n== In memory: one core (cpu {cpu}), {mem_mib} MiB buffer, {rounds} rounds ==")
    say("GB/s: medians over rounds; ratios: medians of per-round ratios")
    summary: dict[str, float] = {}
    for op in ("enc", "dec"):
        say(f"\n{'encrypt' if op == 'enc' else 'decrypt'}:")
        rows = []
        for segment in SWEEP:
            r = results[segment]
            limit = best(r[f"whole {op}"], r[f"openssl {op}"])
            for name, series in (("EML", r[f"EML {op}"]), ("stream", r[f"stream {op}"])):
                summary[f"{op} {segment} {name} vs limit"] = ratios(series, limit)
                for base in ("whole", "openssl", "hot"):
                    summary[f"{op} {segment} {name} vs {base}"] = ratios(series, r[f"{base} {op}"])
            rows.append(
                [
                    size_name(segment),
                    *(gbps(median(r[f"{name} {op}"])) for name in ("openssl", "whole", "hot", "EML")),
                    *(ratio_text(summary[f"{op} {segment} EML vs {b}"]) for b in ("limit", "whole", "openssl", "hot")),
                    gbps(median(r[f"stream {op}"])),
                    ratio_text(summary[f"{op} {segment} stream vs limit"]),
                ]
            )
        header = ["segment", "openssl", "whole", "hot", "EML", "EML/limit", "EML/whole", "EML/openssl", "EML/hot"]
        table([*header, "stream", "stream/limit"], rows)
    say(
        "\nEML: seal_buffer / open_buffer (the core of encrypt_bytes / decrypt_bytes) with a prepared cipher,"
        "\nfrom the big buffer into a preallocated output. whole: ONE raw AESGCM encrypt_into / decrypt_into"
        "\nover that same whole buffer (for decrypt: its one-call sealing) into a preallocated output. openssl:"
        "\n`openssl speed -evp aes-256-gcm -bytes S -seconds 1` (system OpenSSL). limit: per round, the faster"
        "\nof whole and openssl."
        "\nReferences, not baselines: hot = raw *_into calls repeated on one S-byte buffer that stays in cache;"
        "\nstream = encrypt_stream / decrypt_stream from a BytesIO into a discarding sink (what files use)."
    )
    say(
        "\nSegment-size sweep (speed at S relative to the same path at the 256 KiB default;"
        " medians of per-round ratios):"
    )
    rows = []
    for segment in SWEEP:
        r, d = results[segment], results[DEFAULT_SEGMENT_SIZE]
        cells = [size_name(segment)]
        for op in ("enc", "dec"):
            for name in ("EML", "stream"):
                cells += [gbps(median(r[f"{name} {op}"])), f"{ratios(r[f'{name} {op}'], d[f'{name} {op}']):.3f}"]
        rows.append(cells)
    header = ["segment", "EML enc", "vs 256K", "stream enc", "vs 256K", "EML dec", "vs 256K", "stream dec", "vs 256K"]
    table(header, rows)
    d = results[DEFAULT_SEGMENT_SIZE]
    say(
        "\nPublic calls at 256 KiB, each returning a new output buffer (so paying its page faults), against one"
        "\nraw AESGCM encrypt / decrypt over the whole buffer, which does too:"
    )
    rows = [
        [
            "encrypt" if op == "enc" else "decrypt",
            gbps(median(d[f"API {op}"])),
            gbps(median(d[f"fresh {op}"])),
            f"{ratios(d[f'API {op}'], d[f'fresh {op}']):.3f}",
        ]
        for op in ("enc", "dec")
    ]
    table(["operation", "encrypt_bytes / decrypt_bytes", "raw call, new output", "ratio"], rows)
    return summary


# ---------------------------------------------------------------------------------------
# File to file


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MIB))
            out.write(chunk)
            left -= len(chunk)


def vmhwm_kib(status_path: str) -> int | None:
    """Peak RSS (VmHWM, KiB) from a /proc status file; None once the process is gone."""
    try:
        with open(status_path) as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), None)
    except (OSError, ValueError):
        return None


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.store = workdir / "keystore.json"
        LocalKms.init(self.store, PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS).create_key(KEY)

    def prepare(self, size: int, tag: str) -> tuple[Path, Path]:
        """A random file of ``size`` bytes and its encryption (made once, untimed)."""
        plain, sealed = self.workdir / f"{tag}.bin", self.workdir / f"{tag}.eml"
        random_file(plain, size)
        self.run("encrypt", plain, sealed, durable=False)
        return plain, sealed

    def run(
        self, op: str, src: Path, dst: Path, *, durable: bool, watch: bool = False
    ) -> tuple[float, float, int | None]:
        """One operation in a fresh process, after a sync: (seconds, whole-process seconds, peak RSS KiB).

        Our child times the library call (plus the fsync for ``durable``), after interpreter
        start-up and key-store unlock; the whole-process time includes those. ``cp`` is timed
        from spawn to exit (plus the fsync), so its two times are the same.

        Peak RSS is the process's VmHWM: our child reads its own at the end; ``cp`` is sampled
        every 2 ms, and only when ``watch`` is set (never in timed runs). The kernel's
        ``ru_maxrss`` is no use here: a child spawned with vfork inherits the parent's peak.
        """
        dst.unlink(missing_ok=True)
        os.sync()
        if op == "cp":
            peak = 0
            start = time.perf_counter()
            pid = os.posix_spawnp("cp", ["cp", str(src), str(dst)], os.environ)
            while watch:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                peak = max(peak, vmhwm_kib(f"/proc/{pid}/status") or 0)
                time.sleep(0.002)
            else:
                _, status = os.waitpid(pid, 0)
            if durable:
                fsync_path(dst)
            seconds = time.perf_counter() - start
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"cp failed with status {status}")
            return seconds, seconds, peak if watch else None
        args = [op, str(src), str(dst), str(self.store), PASSPHRASE, KEY, "1" if durable else "0"]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{op} failed with exit code {done.returncode}")
        result = json.loads(done.stdout)
        return float(result["seconds"]), wall, int(result["vmhwm_kib"])


def bench_files(
    bench: FileBench, size: int, rounds: int, reps: int
) -> tuple[dict[str, Series], dict[str, Series], dict[str, int]]:
    """Per mode and round, each operation's best time of ``reps`` interleaved runs."""
    plain, sealed = bench.prepare(size, "big")
    paths = {
        "cp": (plain, bench.workdir / "out-cp.bin"),
        "encrypt": (plain, bench.workdir / "out-encrypt.eml"),
        "decrypt": (sealed, bench.workdir / "out-decrypt.bin"),
    }
    seconds: dict[str, Series] = {mode: {op: [] for op in paths} for mode in ("cached", "durable")}
    walls: dict[str, Series] = {mode: {op: [] for op in paths} for mode in ("cached", "durable")}
    rss = dict.fromkeys(paths, 0)
    ops = list(paths)
    for round_no in range(rounds):
        order = ops[round_no % 3 :] + ops[: round_no % 3]
        for mode in ("cached", "durable") if round_no % 2 == 0 else ("durable", "cached"):
            times: dict[str, list[tuple[float, float]]] = {op: [] for op in ops}
            line = []
            for _ in range(reps):
                for op in order:
                    took, wall, peak = bench.run(op, *paths[op], durable=mode == "durable")
                    times[op].append((took, wall))
                    rss[op] = max(rss[op], peak or 0)
                    line.append(f"{op} {gbps(size / took).strip()}")
            for op in ops:
                seconds[mode][op].append(min(took for took, _ in times[op]))
                walls[mode][op].append(min(wall for _, wall in times[op]))
            say(f"  round {round_no + 1}/{rounds} {mode:>7}: " + ", ".join(line) + " GB/s")
    if not filecmp.cmp(plain, paths["decrypt"][1], shallow=False):
        say("ERROR: the decrypted file differs from the original")
        raise SystemExit(1)
    rss["cp"] = bench.run("cp", *paths["cp"], durable=False, watch=True)[2] or 0
    for path in (plain, sealed, *(dst for _, dst in paths.values())):
        path.unlink(missing_ok=True)
    return seconds, walls, rss


def bench_rss_small(bench: FileBench) -> dict[str, int]:
    plain, sealed = bench.prepare(RSS_SMALL_MIB * MIB, "small")
    rss = {}
    for op, src, dst in (
        ("cp", plain, bench.workdir / "small-cp.bin"),
        ("encrypt", plain, bench.workdir / "small-out.eml"),
        ("decrypt", sealed, bench.workdir / "small-out.bin"),
    ):
        rss[op] = max(bench.run(op, src, dst, durable=False, watch=True)[2] or 0 for _ in range(2))
    return rss


def report_files(
    seconds: dict[str, Series],
    walls: dict[str, Series],
    rss: dict[str, int],
    rss_small: dict[str, int],
    size: int,
    rounds: int,
    reps: int,
) -> dict[str, float]:
    say(f"\n== File to file: {size_name(size)} file, {rounds} rounds of {reps} interleaved runs per operation ==")
    say("Each run: a fresh process after a sync. GB/s: median over rounds of each round's best run;")
    say("vs cp: median of per-round ratios.")
    summary: dict[str, float] = {}
    rows = []
    for mode, per_op in seconds.items():
        for op, times in per_op.items():
            summary[f"{mode} {op}"] = ratios(seconds[mode]["cp"], times)  # time ratio = throughput ratio
            whole = walls[mode][op]
            rows.append(
                [
                    mode,
                    op,
                    gbps(size / median(times)),
                    f"{summary[f'{mode} {op}']:.3f}",
                    gbps(size / median(whole)),
                    f"{ratios(walls[mode]['cp'], whole):.3f}",
                ]
            )
    table(["mode", "operation", "GB/s", "vs cp", "whole process GB/s", "vs cp"], rows)
    say(
        "cached: the output goes to the page cache; durable: the clock also covers an fsync of the output."
        "\nThe source file is in the page cache. GB/s: encrypt_file / decrypt_file alone; whole process: also"
        "\nPython start-up, imports and key-store unlock (test-strength scrypt). cp: its whole process either way."
    )
    say("\nPeak RSS (VmHWM, MiB, max over runs; cp sampled every 2 ms in untimed runs):")
    rows = [[op, f"{rss[op] / 1024:.1f}", f"{rss_small[op] / 1024:.1f}"] for op in rss]
    table(["operation", f"{size_name(size)} file", f"{RSS_SMALL_MIB} MiB file"], rows)
    return summary


# ---------------------------------------------------------------------------------------
# Gramine protected files

PF_NODE = 4096


def pf_raw_encrypt(keys: list[bytes], source: memoryview, sealed: memoryview) -> None:
    """The cipher work of a PF file and nothing else: one new AES-128-GCM key per 4 KiB node, all-zero IV."""
    iv = bytes(12)
    step = PF_NODE + TAG_SIZE
    for i, key in enumerate(keys):
        AESGCM(key).encrypt_into(iv, source[i * PF_NODE : (i + 1) * PF_NODE], None, sealed[i * step : (i + 1) * step])


def pf_raw_decrypt(keys: list[bytes], sealed: memoryview, out: memoryview) -> None:
    iv = bytes(12)
    step = PF_NODE + TAG_SIZE
    for i, key in enumerate(keys):
        AESGCM(key).decrypt_into(iv, sealed[i * step : (i + 1) * step], None, out[i * PF_NODE : (i + 1) * PF_NODE])


def bench_pf(data: bytes, rounds: int, min_time: float) -> Series:
    """Per round: ``encrypt_pf`` / ``decrypt_pf`` and the raw per-node AESGCM loop, order alternating."""
    from enclaveml.crypto.gramine_pf import decrypt_pf, encrypt_pf

    n = len(data)
    kdk, path = os.urandom(16), "models/bench/1/model.pb"
    nodes = -(-n // PF_NODE)
    keys = [os.urandom(16) for _ in range(nodes)]
    source = memoryview(data)
    raw_sealed = bytearray(nodes * (PF_NODE + TAG_SIZE))
    raw_plain = bytearray(nodes * PF_NODE)
    pf_raw_encrypt(keys, source, memoryview(raw_sealed))
    pf_raw_decrypt(keys, memoryview(raw_sealed), memoryview(raw_plain))
    sealed = encrypt_pf(data, kdk, path)
    if decrypt_pf(sealed, kdk, path) != data or raw_plain[:n] != data:
        raise SystemExit("Gramine protected file round trip failed")
    jobs: list[Job] = [
        ("PF enc", partial(rate, partial(encrypt_pf, data, kdk, path), n, min_time)),
        ("raw enc", partial(rate, partial(pf_raw_encrypt, keys, source, memoryview(raw_sealed)), n, min_time)),
        ("PF dec", partial(rate, partial(decrypt_pf, sealed, kdk, path), n, min_time)),
        (
            "raw dec",
            partial(rate, partial(pf_raw_decrypt, keys, memoryview(raw_sealed), memoryview(raw_plain)), n, min_time),
        ),
    ]
    results: Series = {name: [] for name, _ in jobs}
    for round_no in range(rounds):
        for name, job in jobs if round_no % 2 == 0 else jobs[::-1]:
            results[name].append(job() or float("nan"))
        r = {name: gbps(values[-1]).strip() for name, values in results.items()}
        say(
            f"  round {round_no + 1}/{rounds}: PF enc {r['PF enc']}, raw enc {r['raw enc']};"
            f" PF dec {r['PF dec']}, raw dec {r['raw dec']} GB/s"
        )
    return results


def report_pf(results: Series, mib: int, rounds: int) -> None:
    say(f"\n== Gramine protected files: {mib} MiB buffer, {rounds} rounds ==")
    say("GB/s: medians over rounds; ratio: median of per-round ratios (PF / raw)")
    rows = [
        [
            "encrypt" if op == "enc" else "decrypt",
            gbps(median(results[f"PF {op}"])),
            gbps(median(results[f"raw {op}"])),
            ratio_text(ratios(results[f"PF {op}"], results[f"raw {op}"])),
        ]
        for op in ("enc", "dec")
    ]
    table(["operation", "encrypt_pf / decrypt_pf", "raw AESGCM per 4 KiB node", "ratio"], rows)
    say(
        "PF: the public calls (file layout, MHT nodes, tags out of band, a new output each call)."
        "\nraw: the same number of 4 KiB AES-128-GCM calls, a new key per node, into preallocated buffers with"
        "\neach tag beside its node: the cipher work a PF file cannot avoid. MiB of plaintext; GB/s = 10^9 B/s."
    )


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="file size for file-to-file runs (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--file-reps", type=int, default=2, help="runs of each file operation per round, fastest kept (default 2)"
    )
    parser.add_argument("--mem-mib", type=int, default=256, help="in-memory buffer size (default 256)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per in-memory measurement (default 0.5)")
    parser.add_argument("--cpu", type=int, default=None, help="core for the in-memory part (default: lowest usable)")
    parser.add_argument("--part", choices=("all", "memory", "files", "pf"), default="all")
    parser.add_argument("--pf-mib", type=int, default=100, help="Gramine protected file buffer size (default 100)")
    args = parser.parse_args(argv)
    if min(args.mem_mib, args.size_mib, args.rounds, args.file_reps) < 1:
        parser.error("--mem-mib, --size-mib, --rounds and --file-reps must be at least 1")
    if args.mem_mib >= 2048:
        parser.error("--mem-mib must be below 2048: one AESGCM call takes at most 2^31 - 1 bytes")

    info = machine()
    say("== Machine ==")
    say(f"CPU: {info['cpu']} ({info['cpu_id']}), {info['cpus']}; {info['isa']}; caches {info['caches']}")
    say(f"Python {info['python']}; cryptography {info['cryptography']}; system {info['system_openssl']}")
    say(f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; command: {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    if shutil.which("openssl") is None:
        say("openssl not found: the `openssl speed` baseline is skipped")

    goals: list[str] = []
    if args.part in ("all", "memory"):
        allowed = os.sched_getaffinity(0)
        cpu = min(allowed) if args.cpu is None else args.cpu
        os.sched_setaffinity(0, {cpu})
        say(f"\nIn memory ({args.rounds} rounds x {len(SWEEP)} segment sizes)...")
        data = os.urandom(args.mem_mib * MIB)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                results = bench_memory(data, args.rounds, args.min_time, Path(tmp))
        finally:
            os.sched_setaffinity(0, allowed)
        del data
        mem = report_memory(results, args.mem_mib, args.rounds, cpu)
        for op in ("enc", "dec"):
            value = mem[f"{op} {DEFAULT_SEGMENT_SIZE} EML vs limit"]
            goals.append(
                f"{verdict(value >= GOAL_MEMORY)}  in-memory {'encrypt' if op == 'enc' else 'decrypt'} at 256 KiB:"
                f" {value:.3f} of the faster of one raw call over the whole buffer and openssl speed"
                f" (goal >= {GOAL_MEMORY})"
            )

    if args.part in ("all", "files"):
        size = args.size_mib * MIB
        root = REPO / "bench-out"
        root.mkdir(exist_ok=True)
        workdir = root / f"bench-crypto-{os.getpid()}"
        need = 5 * size + 5 * RSS_SMALL_MIB * MIB
        if shutil.disk_usage(root).free < need + 1024 * MIB:
            say(f"\nFile to file skipped: {root} needs {need // MIB} MiB free")
        else:
            workdir.mkdir()
            try:
                bench = FileBench(workdir)
                say(f"\nFile to file ({size_name(size)}, {args.rounds} rounds) in {workdir.relative_to(REPO)}...")
                seconds, walls, rss = bench_files(bench, size, args.rounds, args.file_reps)
                rss_small = bench_rss_small(bench)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    root.rmdir()  # only if empty
            files = report_files(seconds, walls, rss, rss_small, size, args.rounds, args.file_reps)
            for mode in ("cached", "durable"):
                for op in ("encrypt", "decrypt"):
                    value = files[f"{mode} {op}"]
                    goals.append(
                        f"{verdict(value >= GOAL_FILE)}  file-to-file {op} ({mode}):"
                        f" {value:.3f}x cp (goal >= {GOAL_FILE})"
                    )
            for op in ("encrypt", "decrypt"):
                peak, small = rss[op] / 1024, rss_small[op] / 1024
                ok = peak <= GOAL_RSS_MIB and small <= GOAL_RSS_MIB and abs(peak - small) <= RSS_SLACK_MIB
                goals.append(
                    f"{verdict(ok)}  peak RSS {op}: {peak:.1f} MiB ({size_name(size)} file) vs {small:.1f} MiB"
                    f" ({RSS_SMALL_MIB} MiB file) (goal <= {GOAL_RSS_MIB} MiB, independent of size)"
                )

    if args.part in ("all", "pf"):
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(allowed) if args.cpu is None else args.cpu})
        say(f"\nGramine protected files ({args.pf_mib} MiB, {args.rounds} rounds)...")
        try:
            pf_results = bench_pf(os.urandom(args.pf_mib * MIB), args.rounds, args.min_time)
        finally:
            os.sched_setaffinity(0, allowed)
        report_pf(pf_results, args.pf_mib, args.rounds)

    say("\n== Goals ==")
    for line in goals:
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
