"""``enclaveml convert``: re-encrypt a Parquet file into the other flavour (docs/parquet.md, "Converting")."""

from __future__ import annotations

import time

import click

from enclaveml.cli._app import App, err_console, kms_backend_option, pass_app

__all__ = ["convert"]


@click.command()
@kms_backend_option("--kms")
@click.argument("source", metavar="SRC")
@click.argument("destination", metavar="DST")
@click.option(
    "--to",
    "flavour",
    type=click.Choice(["duckdb", "standard"]),
    required=True,
    help="duckdb: DuckDB's fast path; standard: readable by pyarrow and Spark.",
)
@click.option("--key", "-k", required=True, metavar="NAME", help="KMS key that wraps DST's data key.")
@pass_app
def convert(app: App, source: str, destination: str, flavour: str, key: str) -> None:
    """Re-encrypt the encrypted Parquet file SRC (either flavour) into DST of flavour --to.

    SRC is decrypted and authenticated in memory only; DST appears complete or not at all.

    \b
    Example:
      enclaveml convert people.duck.parquet people.parquet --to standard --key customers
      enclaveml convert people.parquet people.duck.parquet --to duckdb --key customers --kms broker
    """
    from enclaveml.crypto.parquet import convert_parquet

    kms = app.open_kms()
    started = time.perf_counter()
    convert_parquet(source, destination, kms, key, to="duckdb" if flavour == "duckdb" else "standard")
    err_console.print(
        f"converted {source} to {destination} ({flavour} flavour, key {key}) in {time.perf_counter() - started:.2f} s"
    )
