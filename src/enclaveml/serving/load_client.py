"""The load client: CCZoo's ``resnet_client_grpc.py`` as a library, with retries and full statistics.

``run_load(LoadConfig) -> LoadReport`` opens ``cnum`` ``grpc.aio`` channels (each its own
TCP/TLS connection: a local subchannel pool, so a proxy sees ``cnum`` clients), reads the
model's inputs from the server's metadata (TF Serving ``GetModelMetadata`` or KServe
``ModelMetadata``) unless ``input_name`` and ``input_shape`` are given, builds one request of
``batch`` seeded random samples per channel, and then each channel sends ``warmup`` requests
followed by ``loop`` measured requests, one after the other. What is measured:

- ``e2e_seconds``: from the end of every channel's warm-up to the last measured response
  (CCZoo also counts channel set-up; connections and TLS handshakes are excluded here);
- per-request latency, first attempt to final response (``LatencySummary``);
- throughput: ``requests_per_second`` and ``samples_per_second`` (CCZoo's ``tps`` =
  cnum · loop · batch / e2e when nothing fails);
- failures by gRPC status name. A call failing with ``UNAVAILABLE`` (a replica went away
  behind a load balancer) is retried up to ``retries`` times as a fresh call; a request
  that needed a retry counts in ``retried``, one that fails after its retries in ``failed``.

Channel credentials follow CCZoo (``serving.tls.channel_credentials``): root = ``ca`` if
given else ``crt``; chain = ``crt`` only with ``ca``; neither = an insecure channel. With
``ra_tls_policy`` the server's RA-TLS certificate is fetched and verified against the
attestation policy first, then pinned as the only trusted root.

``loop=0`` runs until ``duration`` seconds pass or SIGINT (CCZoo: "0 = infinite").
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc
import grpc.aio

from enclaveml.errors import ConfigError, PolicyError
from enclaveml.serving.latency import LatencySummary
from enclaveml.serving.load_requests import InputSpec, Wire, parse_dtype, random_feeds, wire_for

if TYPE_CHECKING:
    from enclaveml.attestation.ratls import EvidenceVerifier

__all__ = ["LoadConfig", "LoadReport", "Protocol", "parse_shape", "run_load"]

Protocol = Literal["tfserving", "kserve"]
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_RETRY_BACKOFF_SECONDS = 0.05
_URL = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


@dataclass(frozen=True)
class LoadConfig:
    """What to send, how hard, and how to connect. Defaults are CCZoo's (``-cnum 16 -loop 200``).

    ``url``            ``host:port`` of the gRPC endpoint
    ``model``          model name; ``version`` None = the server's newest
    ``batch``          samples per request; ``cnum`` concurrent channels; ``loop`` requests per
                       channel (0 = until ``duration`` or SIGINT); ``warmup`` unmeasured first
                       requests per channel
    ``protocol``       ``tfserving`` (``PredictionService``) or ``kserve`` (``GRPCInferenceService``)
    ``ca/crt/key``     PEM files, CCZoo's meaning; ``ra_tls_policy`` an attestation policy file,
                       ``ra_tls_verifier`` how the evidence is checked (``ratls.evidence_verifier``:
                       DCAP collateral, trusted simulation keys; default: simulated evidence only)
    ``server_name``    TLS name to verify instead of the host in ``url``
    ``input_name``     input to fill (and, with ``input_shape``, skip the metadata call)
    ``input_shape``    per-sample shape (batch dim excluded), e.g. ``(224, 224, 3)``
    ``input_dtype``    numpy name of the input dtype when the metadata call is skipped
    ``signature``      TF Serving signature; ``timeout`` seconds per call; ``retries`` on UNAVAILABLE
    ``seed``           random data seed (channel i uses ``seed + i``)
    ``on_response``    called in the client's event loop after each measured request with the
                       number finished so far (progress bars; tests use it to act mid-run)
    """

    url: str = "localhost:8500"
    model: str = "resnet50"
    batch: int = 1
    cnum: int = 16
    loop: int = 200
    warmup: int = 5
    protocol: Protocol = "tfserving"
    version: int | None = None
    ca: Path | None = None
    crt: Path | None = None
    key: Path | None = None
    ra_tls_policy: Path | None = None
    server_name: str | None = None
    input_name: str | None = None
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    signature: str = "serving_default"
    timeout: float = 30.0
    retries: int = 1
    seed: int = 0
    duration: float | None = None
    ra_tls_verifier: EvidenceVerifier | None = field(default=None, compare=False, repr=False)
    on_response: Callable[[int], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("batch", "cnum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("loop", "warmup", "retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, not {self.timeout}")
        if self.ra_tls_policy is not None and (self.ca is not None or self.crt is not None):
            raise ConfigError("RA-TLS pins the attested server certificate", "drop --ca / --crt with --ra-tls")
        if self.input_shape is not None and any(d < 1 for d in self.input_shape):
            raise ConfigError(f"input shape {list(self.input_shape)} has a dimension below 1")
        _split_url(self.url)


@dataclass(frozen=True)
class LoadReport:
    """The outcome of ``run_load``. ``requests`` counts measured requests only (not warm-up)."""

    cnum: int
    batch: int
    requests: int
    succeeded: int
    failed: int
    retried: int
    errors: dict[str, int]
    e2e_seconds: float
    latency: LatencySummary
    warmup_failed: int = 0
    first_error: str | None = None
    inputs: tuple[InputSpec, ...] = ()

    @property
    def requests_per_second(self) -> float:
        return self.succeeded / self.e2e_seconds if self.e2e_seconds > 0 else 0.0

    @property
    def samples_per_second(self) -> float:
        """CCZoo's ``tps``: samples answered per second of e2e time."""
        return self.succeeded * self.batch / self.e2e_seconds if self.e2e_seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.warmup_failed == 0

    def summary_line(self) -> str:
        """The last line CCZoo's client prints, same fields and order (its ``tps:`` spelling)."""
        return (
            f"summary: cnum {self.cnum}, batch {self.batch}, e2e time(s) {self.e2e_seconds:.4f}, "
            f"average latency(ms) {self.latency.mean_ms:.3f}, tps: {self.samples_per_second:.2f}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "cnum": self.cnum,
            "batch": self.batch,
            "requests": self.requests,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "retried": self.retried,
            "warmup_failed": self.warmup_failed,
            "errors": dict(self.errors),
            "first_error": self.first_error,
            "e2e_seconds": round(self.e2e_seconds, 4),
            "requests_per_second": round(self.requests_per_second, 2),
            "samples_per_second": round(self.samples_per_second, 2),
            "latency": self.latency.as_dict(),
            "inputs": [{"name": i.name, "dtype": str(i.dtype), "shape": list(i.shape)} for i in self.inputs],
        }


def run_load(config: LoadConfig) -> LoadReport:
    """Run the load described by ``config`` (blocking; an asyncio loop of its own) and report.

    Raises ``ConfigError`` when the server cannot be reached or the model's metadata cannot be
    read (nothing was measured then); ``AttestationError`` / ``PolicyError`` from RA-TLS.
    Failures *during* the load are counted in the report, never raised.
    """
    credentials, options = _channel_settings(config)
    return asyncio.run(_LoadRun(config, credentials, options).run())


# -- connection ------------------------------------------------------------------------------


def _split_url(url: str) -> tuple[str, int]:
    match = _URL.fullmatch(url)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"url {url!r} is not HOST:PORT", "e.g. localhost:8500 (no scheme)")
    return match.group(1).strip("[]"), int(match.group(2))


def _read_pem(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def _channel_settings(config: LoadConfig) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),  # one connection per channel, as cnum clients
    ]
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    if config.ra_tls_policy is not None:
        from enclaveml.attestation.policy import Policy
        from enclaveml.serving.ratls import fetch_verified_server_certificate, pinned_channel_options
        from enclaveml.serving.tls import channel_credentials

        host, port = _split_url(config.url)
        try:
            policy = Policy.load(config.ra_tls_policy)
        except PolicyError as exc:  # a broken policy file is a usage error, not a refusal
            raise ConfigError(exc.what, exc.hint) from None
        pinned = fetch_verified_server_certificate(
            host, port, policy, now=datetime.now(UTC), verifier=config.ra_tls_verifier, server_name=config.server_name
        )
        if not config.server_name:
            options.extend(pinned_channel_options(pinned, host))
        return channel_credentials(ca=None, crt=pinned, key=None), options
    ca, crt, key = (_read_pem(config.ca, "CA"), _read_pem(config.crt, "certificate"), _read_pem(config.key, "key"))
    if ca is None and crt is None:
        if key is not None:
            raise ConfigError("a client key without certificates", "pass -ca and -crt with -key, or drop -key")
        return None, options
    from enclaveml.serving.tls import channel_credentials

    return channel_credentials(ca=ca, crt=crt, key=key), options


# -- the run ---------------------------------------------------------------------------------


class _Tally:
    """Counts shared by the channels' coroutines (one event loop: no locks needed)."""

    def __init__(self, on_response: Callable[[int], None] | None) -> None:
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.failed = 0
        self.retried = 0
        self.finished = 0
        self.warmup_failed = 0
        self.first_error: str | None = None
        self._on_response = on_response

    def note(self, code: str, details: str) -> None:
        if self.first_error is None:
            self.first_error = f"{code}: {details}" if details else code

    def failure(self, code: str, details: str) -> None:
        """A measured request that failed after its retries."""
        self.failed += 1
        self.errors[code] += 1
        self.note(code, details)

    def done(self) -> None:
        self.finished += 1
        if self._on_response is not None:
            self._on_response(self.finished)


class _LoadRun:
    def __init__(
        self, config: LoadConfig, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.options = options
        self.wire: Wire = wire_for(config.protocol)
        self.tally = _Tally(config.on_response)
        self.stop = asyncio.Event()

    def _channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.config.url, options=self.options)
        return grpc.aio.secure_channel(self.config.url, self.credentials, options=self.options)

    async def run(self) -> LoadReport:
        config = self.config
        channels = [self._channel() for _ in range(config.cnum)]
        try:
            inputs = await self._inputs(channels[0])
            requests = [
                self.wire.predict_request(
                    config.model,
                    config.version,
                    config.signature,
                    random_feeds(inputs, config.batch, seed=config.seed + i, sample_shape=config.input_shape),
                )
                for i in range(config.cnum)
            ]
            calls = [ch.unary_unary(self.wire.predict_method) for ch in channels]
            await asyncio.gather(*(self._warm_up(call, request) for call, request in zip(calls, requests, strict=True)))
            self._arm_stop()
            started = time.perf_counter()
            await asyncio.gather(*(self._drive(call, request) for call, request in zip(calls, requests, strict=True)))
            e2e = time.perf_counter() - started
        finally:
            self._disarm_stop()
            await asyncio.gather(*(ch.close() for ch in channels))
        tally = self.tally
        return LoadReport(
            cnum=config.cnum,
            batch=config.batch,
            requests=tally.finished,
            succeeded=len(tally.latencies),
            failed=tally.failed,
            retried=tally.retried,
            errors=dict(tally.errors),
            e2e_seconds=e2e,
            latency=LatencySummary.from_seconds(tally.latencies),
            warmup_failed=tally.warmup_failed,
            first_error=tally.first_error,
            inputs=tuple(inputs),
        )

    async def _inputs(self, channel: grpc.aio.Channel) -> list[InputSpec]:
        config = self.config
        if config.input_name is not None and config.input_shape is not None:
            return [InputSpec(config.input_name, parse_dtype(config.input_dtype), (-1, *config.input_shape))]
        call = channel.unary_unary(self.wire.metadata_method)
        try:
            response = await call(self.wire.metadata_request(config.model, config.version), timeout=config.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _metadata_error(config, exc) from None
        inputs = self.wire.inputs_from_metadata(response, config.signature)
        if config.input_name is not None:
            inputs = [i for i in inputs if i.name == config.input_name]
            if not inputs:
                raise ConfigError(f"the model {config.model!r} has no input {config.input_name!r}")
        if not inputs:
            raise ConfigError(f"the model {config.model!r} declares no inputs", "give --input-name and --input-shape")
        return inputs

    async def _warm_up(self, call: grpc.aio.UnaryUnaryMultiCallable[Any, Any], request: bytes) -> None:
        for _ in range(self.config.warmup if self.config.loop != 0 else 0):
            failure = await self._request(call, request)
            if failure is not None:
                self.tally.warmup_failed += 1
                self.tally.note(*failure)

    async def _drive(self, call: grpc.aio.UnaryUnaryMultiCallable[Any, Any], request: bytes) -> None:
        remaining = self.config.loop if self.config.loop else None
        while (remaining is None or remaining > 0) and not self.stop.is_set():
            started = time.perf_counter()
            failure = await self._request(call, request)
            if failure is None:
                self.tally.latencies.append(time.perf_counter() - started)
            else:
                self.tally.failure(*failure)
            self.tally.done()
            if remaining is not None:
                remaining -= 1

    async def _request(
        self, call: grpc.aio.UnaryUnaryMultiCallable[Any, Any], request: bytes
    ) -> tuple[str, str] | None:
        """One logical request with its retries; None on success, else (status name, details)."""
        for attempt in range(self.config.retries + 1):
            try:
                response = await call(request, timeout=self.config.timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.config.retries:
                    if attempt == 0:
                        self.tally.retried += 1
                    await asyncio.sleep(_RETRY_BACKOFF_SECONDS * (attempt + 1))
                    continue
                return str(code.name), exc.details() or ""
            try:
                self.wire.check_response(response)
            except Exception as exc:  # protobuf's DecodeError or ours: the server answered nonsense
                return "INVALID_RESPONSE", str(exc)
            return None
        raise AssertionError("unreachable: the last attempt returns")

    def _arm_stop(self) -> None:
        if self.config.loop != 0:
            return
        loop = asyncio.get_running_loop()
        if self.config.duration is not None:
            loop.call_later(self.config.duration, self.stop.set)
        if threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGINT, self.stop.set)

    def _disarm_stop(self) -> None:
        if self.config.loop == 0 and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)


def _metadata_error(config: LoadConfig, exc: grpc.aio.AioRpcError) -> ConfigError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return ConfigError(f"the server at {config.url} has no model {config.model!r}: {details}", "check --model")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return ConfigError(
            f"the server at {config.url} does not implement the {config.protocol} metadata call",
            "check --protocol, or give --input-name and --input-shape",
        )
    hint = "check --url, that the server runs, and the TLS options (--ca / --crt / --key)"
    return ConfigError(f"cannot read the model metadata from {config.url}: {code.name}: {details}", hint)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"224,224,3"`` -> ``(224, 224, 3)`` (``--input-shape``)."""
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"input shape {text!r} is not comma-separated integers", "e.g. 224,224,3") from None
    if not dims:
        raise ConfigError("the input shape is empty", "e.g. 224,224,3")
    return dims
