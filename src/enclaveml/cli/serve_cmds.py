"""``enclaveml serve``: the model server (TF Serving gRPC, KServe v2 gRPC + REST) over encrypted models.

Key sources (``--keys-from``, repeatable: one for EML files, one for Gramine protected files)::

    local                 the KMS of ``--kms`` / ENCLAVEML_KMS (default: the local key store)
    session               the keys ``enclaveml run`` released to this process
    broker=URL            the server attests to the key broker itself (--key NAME, --tee)
    secret-prov=HOST:PORT Gramine secret provisioning delivers the PF wrap key (--tee)
    wrap-key=FILE         a raw 16-byte PF wrap key file (development)

``KIND ARG`` (one argument with a space) is read as ``KIND=ARG``. Attested sources are made
in each worker process (each attests); the others are made once and handed to the workers.
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from enclaveml.cli._app import App, err_console, kms_backend_option, pass_app
from enclaveml.errors import ConfigError

if TYPE_CHECKING:
    from enclaveml.attestation.tee import Tee
    from enclaveml.serving.keys import KeySource
    from enclaveml.serving.tls import ServerTls

# The serving stack (grpc, onnxruntime, uvicorn) is imported when `serve` runs, not when `enclaveml` starts.

__all__ = ["serve"]

SIM_KEY_FILE = "sim-key.pem"
KEY_SOURCES = ("local", "session", "broker", "secret-prov", "wrap-key")
_NEEDS_ARG = {"broker": "URL", "secret-prov": "HOST:PORT", "wrap-key": "FILE"}
_SIM_WARNING = (
    "simulated TEE (--tee sim): its evidence is signed by a key on this host and proves nothing about "
    "the host; for development only"
)


@dataclass(frozen=True)
class _TeeSpec:
    kind: str  # auto | sgx | tdx | snp | sim
    sim_key: str  # the simulation key file (used with sim only)


@dataclass(frozen=True)
class _AttestedSpec:
    kind: str  # broker | secret-prov
    target: str
    keys: tuple[str, ...]
    ca: str | None
    tee: _TeeSpec


def _make_tee(spec: _TeeSpec) -> Tee:
    from enclaveml.attestation.tee import SimulatedTee, TeeKind, detect_tee
    from enclaveml.runtime.run import load_or_create_sim_key

    if spec.kind != "sim":
        return detect_tee(want=cast(TeeKind, spec.kind))
    key, _created = load_or_create_sim_key(Path(spec.sim_key))
    return SimulatedTee(key, _sim_measurement(), b"")


def _sim_measurement() -> bytes:
    """The simulated MR_ENCLAVE of ``enclaveml serve``: over the installed package (a changed server differs)."""
    from enclaveml.runtime.run import sim_measurement

    package = Path(__file__).resolve().parent.parent
    return sim_measurement(["enclaveml", "serve"], measure=[package], root=package.parent)


def _attested_source(spec: _AttestedSpec) -> KeySource:
    """Made in every process that loads models (picklable spec, no live objects)."""
    from enclaveml.serving.keys import BrokerKeys, SecretProvKeys

    tee = _make_tee(spec.tee)
    if spec.kind == "broker":
        return BrokerKeys(spec.target, list(spec.keys), tee=tee, ca=spec.ca)
    host, _sep, port = spec.target.rpartition(":")
    return SecretProvKeys(host, int(port), tee=tee, ca=spec.ca)


def _combined(eml: Any, pf: Any) -> KeySource:
    from enclaveml.serving.keys import CombinedKeys

    def made(source: Any) -> KeySource:
        return cast("KeySource", source if hasattr(source, "key_wrapper_for_eml") else source())

    return CombinedKeys(made(eml), made(pf))


def _parse_key_source(text: str) -> tuple[str, str]:
    kind, sep, arg = text.partition("=")
    if not sep:
        kind, _space, arg = text.strip().partition(" ")
    kind, arg = kind.strip(), arg.strip()
    if kind not in KEY_SOURCES:
        raise ConfigError(f"unknown key source {text!r}", f"use one of {', '.join(KEY_SOURCES)}")
    if kind in _NEEDS_ARG and not arg:
        raise ConfigError(f"--keys-from {kind} needs {_NEEDS_ARG[kind]}", f"write it like {kind}={_NEEDS_ARG[kind]}")
    if kind == "secret-prov" and not arg.rpartition(":")[2].isdigit():
        raise ConfigError(f"--keys-from secret-prov={arg}: not HOST:PORT", "write it like secret-prov=127.0.0.1:4433")
    return kind, arg


def _key_source(app: App, sources: tuple[str, ...], keys: tuple[str, ...], ca: str | None, tee: _TeeSpec) -> Any:
    """A ``KeySource`` (or a picklable factory of one) from the ``--keys-from`` values."""
    from enclaveml.serving.keys import LocalKeys, SessionKeys, WrapKeyFile

    if len(sources) > 2:
        raise ConfigError("at most two --keys-from: one for EML model files, one for protected files")
    made: dict[str, Any] = {}  # "eml" / "pf" -> source or factory
    for text in sources or ("local",):
        kind, arg = _parse_key_source(text)
        role = "pf" if kind in ("secret-prov", "wrap-key") else "eml"
        if role in made:
            raise ConfigError(f"two --keys-from for {role.upper()} files", "give one for EML and one for PF files")
        if kind == "local":
            made[role] = LocalKeys(app.open_kms())
        elif kind == "session":
            from enclaveml.runtime.session import session

            made[role] = SessionKeys(session())
        elif kind == "wrap-key":
            made[role] = WrapKeyFile(arg)
        else:
            if kind == "broker" and not keys:
                raise ConfigError("--keys-from broker needs the keys to receive", "add --key NAME (repeatable)")
            made[role] = functools.partial(_attested_source, _AttestedSpec(kind, arg, keys, ca, tee))
    if len(made) == 2:
        return functools.partial(_combined, made["eml"], made["pf"])
    return next(iter(made.values()))


def _server_tls(
    tls_cert: str | None, tls_key: str | None, client_ca: str | None, ssl_config: str | None, ra_tls: bool
) -> ServerTls | None:
    from enclaveml.serving.tls import ServerTls

    if ssl_config is not None:
        if tls_cert or tls_key or client_ca or ra_tls:
            raise ConfigError("--ssl-config-file replaces --tls-cert/--tls-key/--client-ca/--ra-tls", "give one")
        return ServerTls.from_ssl_config(ssl_config)
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("give both --tls-cert and --tls-key, or neither")
    if ra_tls:
        if tls_cert:
            raise ConfigError("--ra-tls makes the server's certificate itself", "drop --tls-cert/--tls-key")
        return None
    if client_ca and not tls_cert:
        raise ConfigError("mutual TLS (--client-ca) needs the server's own certificate", "add --tls-cert/--tls-key")
    return ServerTls.from_files(tls_cert, tls_key, client_ca) if tls_cert and tls_key else None


def _models(values: tuple[str, ...]) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {value!r} is not NAME=PATH", "write it like --model iris=models/iris")
        if name in models:
            raise ConfigError(f"model {name!r} is given twice")
        models[name] = Path(path)
    return models


def _log_to_stderr() -> None:
    """Model load lines (the repository's INFO log) on stderr, one line each."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    serving = logging.getLogger("enclaveml.serving")
    serving.addHandler(handler)
    serving.setLevel(logging.INFO)
    serving.propagate = False


@click.command("serve")
@click.option("--model", "model_specs", multiple=True, metavar="NAME=PATH",
              help="A model and its root (numbered version directories); repeatable.")  # fmt: skip
@click.option("--grpc-port", default=8500, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port: TF Serving PredictionService / ModelService and KServe v2 (0 = any free).")  # fmt: skip
@click.option("--rest-port", default=8501, show_default=True, type=click.IntRange(0, 65535),
              help="REST port: KServe v2, TF Serving REST, health, /metrics (0 = any free).")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--tls-cert", metavar="PEM", help="Server certificate (chain).")
@click.option("--tls-key", metavar="PEM", help="Private key of --tls-cert.")
@click.option("--client-ca", metavar="PEM", help="Require mutual TLS: client certificates issued by this CA.")
@click.option("--ssl-config-file", metavar="FILE", help="TF Serving's SSLConfig text proto (ssl.cfg) instead.")
@click.option("--ra-tls", is_flag=True, help="Serve a fresh RA-TLS certificate carrying evidence from --tee.")
@click.option(
    "--keys-from",
    "key_sources",
    multiple=True,
    metavar="SOURCE",
    help="local | session | broker=URL | secret-prov=HOST:PORT | wrap-key=FILE [default: local].",
)
@click.option("--key", "key_names", multiple=True, metavar="NAME", help="With broker=URL: a key to receive.")
@click.option("--ca", metavar="PEM", help="CA of the broker's / secret provisioning server's certificate.")
@click.option("--tee", type=click.Choice(["auto", "sgx", "tdx", "snp", "sim"]), default="auto", show_default=True,
              help="Evidence for --ra-tls and attested key sources (sim: development only).")  # fmt: skip
@click.option("--sim-key", metavar="PEM", help="With --tee sim: the simulation key [default: HOME/sim-key.pem].")
@click.option("--enable-batching", is_flag=True, help="Group concurrent requests for a model into one run.")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1), help="Rows per batched run.")
@click.option("--batch-timeout-ms", default=2.0, show_default=True, type=click.FloatRange(0),
              help="Longest a request waits for others to join its batch.")  # fmt: skip
@click.option("--max-request-bytes", default=64 << 20, show_default=True, type=click.IntRange(1024),
              help="Largest request: message, body and decoded tensors.")  # fmt: skip
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes sharing the ports (SO_REUSEPORT), each loading the models.")  # fmt: skip
@click.option("--poll-seconds", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Look for new model versions this often (hot reload).")  # fmt: skip
@click.option("--print-measurement", is_flag=True,
              help="With --tee sim: print this server's simulated MR_ENCLAVE (for a policy) and exit.")  # fmt: skip
@kms_backend_option("--kms")
@pass_app
def serve(
    app: App,
    model_specs: tuple[str, ...],
    grpc_port: int,
    rest_port: int,
    host: str,
    tls_cert: str | None,
    tls_key: str | None,
    client_ca: str | None,
    ssl_config_file: str | None,
    ra_tls: bool,
    key_sources: tuple[str, ...],
    key_names: tuple[str, ...],
    ca: str | None,
    tee: str,
    sim_key: str | None,
    enable_batching: bool,
    max_batch_size: int,
    batch_timeout_ms: float,
    max_request_bytes: int,
    workers: int,
    poll_seconds: float | None,
    print_measurement: bool,
) -> None:
    """Serve encrypted models over gRPC and REST until SIGINT / SIGTERM.

    Each model root holds numbered version directories with one encrypted model file
    (model.onnx.eml or model.onnx.pf); the newest version is served. Both ports listen
    before the models load: /v2/health/ready answers 503 with the reason until every model
    is loaded. Prints one line when listening and one per model loaded (or why not).

    \b
    Example:
      enclaveml serve --model iris=models/iris
      enclaveml serve --model resnet50=models/resnet50 --ssl-config-file ssl.cfg --workers 2
      enclaveml serve --model iris=models/iris --keys-from broker=https://broker:8443 --key models \\
          --tee sim --ra-tls --enable-batching
      enclaveml serve --tee sim --print-measurement      # the mr_enclave for the policy
    """
    from enclaveml.serving.server import ModelServer, ServeConfig

    if print_measurement:
        if tee != "sim":
            raise ConfigError("--print-measurement is for --tee sim", "on hardware: the signed enclave's measurement")
        click.echo(_sim_measurement().hex())
        return
    if not model_specs:
        raise ConfigError("no models to serve", "give --model NAME=PATH")

    tls = _server_tls(tls_cert, tls_key, client_ca, ssl_config_file, ra_tls)
    tee_spec = _TeeSpec(tee, sim_key or str(app.home / SIM_KEY_FILE))
    uses_tee = ra_tls or any(_parse_key_source(s)[0] in ("broker", "secret-prov") for s in key_sources)
    if tee == "sim" and uses_tee:
        err_console.print(f"WARNING: {_SIM_WARNING}", markup=False)
    ra_tls_ca = Path(client_ca).read_bytes() if ra_tls and client_ca else None
    config = ServeConfig(
        models=_models(model_specs),
        keys=_key_source(app, key_sources, key_names, ca, tee_spec),
        host=host,
        grpc_port=grpc_port,
        rest_port=rest_port,
        tls=tls,
        ra_tls=ra_tls,
        tee=_make_tee(tee_spec) if ra_tls else None,
        ra_tls_client_ca_pem=ra_tls_ca,
        enable_batching=enable_batching,
        max_batch_size=max_batch_size,
        batch_timeout_ms=batch_timeout_ms,
        max_request_bytes=max_request_bytes,
        workers=workers,
        poll_seconds=poll_seconds,
    )
    _log_to_stderr()
    server = ModelServer(config)
    previous: dict[signal.Signals, Callable[..., Any] | int | None] = {}
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        previous[stop_signal] = signal.signal(stop_signal, lambda *_: server.request_stop())
    try:
        server.start()
        scheme = "http" if config.tls_mode == "plaintext" else "https"
        batching = f"; batching up to {max_batch_size} rows / {batch_timeout_ms:g} ms" if enable_batching else ""
        plural = f"; {workers} workers" if workers > 1 else ""
        err_console.print(
            f"serving {', '.join(config.models)}: gRPC {host}:{server.grpc_port}, "
            f"REST {scheme}://{host}:{server.rest_port} ({config.tls_mode}{plural}{batching})",
            markup=False,
        )
        server.wait()
    finally:
        server.stop()
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)
