"""``enclaveml serve-client``: load a model server over gRPC, as CCZoo's ``resnet_client_grpc.py``.

The single-dash options of that client (``-url -batch -cnum -loop -ca -crt -key``) work
unchanged, so its ``run_inference.sh`` lines run against enclaveml by replacing the
interpreter and script with ``enclaveml serve-client``. Exit codes: 0 every request
answered; 1 some request failed after its retries (the report says which status);
2 usage, connection or metadata errors (nothing measured); 3 RA-TLS attestation refused.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from enclaveml.cli._app import err_console, out_console, progress_bar

if TYPE_CHECKING:
    from enclaveml.serving.load_client import LoadReport, Protocol

__all__ = ["serve_client"]

EXIT_REQUESTS_FAILED = 1
_PATH = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("serve-client")
@click.option("-url", "--url", default="localhost:8500", show_default=True, metavar="HOST:PORT",
              help="gRPC endpoint of the server (or of nginx in front of replicas).")  # fmt: skip
@click.option("-model", "--model", default="resnet50", show_default=True, help="Model name.")
@click.option("--version", "model_version", type=click.IntRange(min=1), help="Model version [default: newest].")
@click.option("-batch", "--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Samples/request.")
@click.option("-cnum", "--cnum", default=16, show_default=True, type=click.IntRange(min=1),
              help="Concurrent gRPC channels (connections).")  # fmt: skip
@click.option("-loop", "--loop", default=200, show_default=True, type=click.IntRange(min=0),
              help="Requests per channel; 0 = until --duration or Ctrl-C.")  # fmt: skip
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="With -loop 0: stop after S seconds.")  # fmt: skip
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0),
              help="Unmeasured requests per channel first (none with -loop 0).")  # fmt: skip
@click.option("--protocol", type=click.Choice(["tfserving", "kserve"]), default="tfserving", show_default=True,
              help="TF Serving PredictionService or KServe v2 GRPCInferenceService.")  # fmt: skip
@click.option("-ca", "--ca", type=_PATH, help="CA certificate (PEM); with -crt/-key: mutual TLS.")
@click.option("-crt", "--crt", type=_PATH, help="Without -ca: the certificate to trust, the server's or its CA's "
              "(one-way TLS); with -ca: the client certificate.")  # fmt: skip
@click.option("-key", "--key", type=_PATH, help="The client's private key (mutual TLS).")
@click.option("--ra-tls", is_flag=True, help="Verify the server's attestation (RA-TLS certificate) against --policy, "
              "then pin its certificate.")  # fmt: skip
@click.option("--policy", "policy_file", type=_PATH, help="Attestation policy (TOML) for --ra-tls.")
@click.option("--collateral", metavar="FILE|DIR", help="--ra-tls: DCAP collateral JSON (offline) for SGX/TDX quotes.")
@click.option("--pccs", metavar="URL", help="--ra-tls: fetch DCAP collateral from this PCCS or Intel PCS.")
@click.option("--trusted-sim-key", "sim_keys", multiple=True, metavar="PEM",
              help="--ra-tls: trusted simulation public key (repeatable) [default: any, with a warning].")  # fmt: skip
@click.option("--server-name", metavar="NAME", help="TLS name to verify instead of the URL's host.")
@click.option("--signature", default="serving_default", show_default=True, help="TF Serving signature name.")
@click.option("--input-name", metavar="NAME", help="Input to fill [default: every input the metadata lists].")
@click.option("--input-shape", metavar="D,D,...", help="Per-sample shape without the batch dim, e.g. 224,224,3.")
@click.option("--input-dtype", default="float32", show_default=True,
              help="Input dtype when --input-name and --input-shape skip the metadata call.")  # fmt: skip
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              metavar="S", help="Deadline of each call.")  # fmt: skip
@click.option("--retries", default=1, show_default=True, type=click.IntRange(min=0),
              help="Retries of a call that failed with UNAVAILABLE (a replica went away).")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random input data.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (no progress bar).")
def serve_client(
    url: str,
    model: str,
    model_version: int | None,
    batch: int,
    cnum: int,
    loop: int,
    duration: float | None,
    warmup: int,
    protocol: str,
    ca: Path | None,
    crt: Path | None,
    key: Path | None,
    ra_tls: bool,
    policy_file: Path | None,
    collateral: str | None,
    pccs: str | None,
    sim_keys: tuple[str, ...],
    server_name: str | None,
    signature: str,
    input_name: str | None,
    input_shape: str | None,
    input_dtype: str,
    timeout: float,
    retries: int,
    seed: int,
    as_json: bool,
) -> None:
    """Send -cnum x -loop inference requests of -batch random samples; report throughput and latency.

    Reads the model's inputs from the server's metadata, builds seeded random data of that
    shape, opens -cnum channels, and each sends --warmup requests, then -loop measured
    ones in sequence. Prints requests, failures by gRPC status, requests/s, samples/s,
    latency p50/p95/p99/mean, and CCZoo's summary line (tps = cnum x loop x batch / e2e).

    \b
    Example:
      enclaveml serve-client -url localhost:8500 --model resnet50 -batch 16 -cnum 4 -loop 200
      enclaveml serve-client -url grpc.example:8500 -crt server.crt -batch 1 -cnum 1 -loop 50
      enclaveml serve-client -url grpc.example:8500 -ca ca.crt -crt client.crt -key client.key
      enclaveml serve-client -url 10.0.0.5:8500 --ra-tls --policy policy.toml --json
      enclaveml serve-client --protocol kserve --model iris -cnum 16 -loop 0 --duration 30
    """
    from enclaveml.errors import ConfigError
    from enclaveml.serving.load_client import LoadConfig, parse_shape, run_load

    if ra_tls != (policy_file is not None):
        raise ConfigError("--ra-tls and --policy go together", "pass --ra-tls --policy policy.toml")
    verifier = None
    if ra_tls:
        from enclaveml.cli.attest_cmds import collateral_source, trusted_sim_public_key
        from enclaveml.serving.ratls import evidence_verifier

        verifier = evidence_verifier(
            sim_trusted_keys=[trusted_sim_public_key(k) for k in sim_keys] or None,
            collateral=collateral_source(collateral, pccs, None, None),
        )
    bar = progress_bar(f"{model} via {url}", cnum * loop or None, unit="requests")
    with contextlib.nullcontext(_ignore) if as_json else bar as advance:

        def on_response(finished: int) -> None:
            advance(1)

        config = LoadConfig(
            url=url,
            model=model,
            version=model_version,
            batch=batch,
            cnum=cnum,
            loop=loop,
            duration=duration,
            warmup=warmup,
            protocol=cast("Protocol", protocol),
            ca=ca,
            crt=crt,
            key=key,
            ra_tls_policy=policy_file,
            ra_tls_verifier=verifier,
            server_name=server_name,
            signature=signature,
            input_name=input_name,
            input_shape=parse_shape(input_shape) if input_shape else None,
            input_dtype=input_dtype,
            timeout=timeout,
            retries=retries,
            seed=seed,
            on_response=on_response,
        )
        report = run_load(config)
    if as_json:
        out_console.print_json(json.dumps(report.as_dict()))
    else:
        _print_report(report)
    if not report.ok:
        raise SystemExit(EXIT_REQUESTS_FAILED)


def _ignore(_n: int) -> None:
    pass


def _print_report(report: LoadReport) -> None:
    inputs = ", ".join(f"{i.name} {i.dtype} {list(i.shape)}" for i in report.inputs)
    lat = report.latency
    lines = [
        f"inputs: {inputs}",
        f"requests: {report.requests} (succeeded {report.succeeded}, failed {report.failed}, "
        f"retried {report.retried}, warm-up failed {report.warmup_failed})",
        f"throughput: {report.requests_per_second:.1f} requests/s, {report.samples_per_second:.1f} samples/s",
        f"latency (ms): p50 {lat.p50_ms:.2f}, p95 {lat.p95_ms:.2f}, p99 {lat.p99_ms:.2f}, "
        f"mean {lat.mean_ms:.2f}, max {lat.max_ms:.2f}",
    ]
    for line in lines:
        out_console.print(line, markup=False)
    if report.errors:
        counts = ", ".join(f"{code} {n}" for code, n in sorted(report.errors.items(), key=lambda item: -item[1]))
        err_console.print(f"errors: {counts}; first: {report.first_error}", markup=False)
    out_console.print(report.summary_line(), markup=False)
