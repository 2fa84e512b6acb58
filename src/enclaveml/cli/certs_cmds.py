"""``enclaveml certs ...``: a CA and TLS certificates for serving (one-way and mutual TLS)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import click

from enclaveml.cli._app import out_console
from enclaveml.serving.certs import DEFAULT_DAYS, CertPaths, KeyType, issue_oneway, issue_twoway

__all__ = ["certs"]


def _common_options(function: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option("--cn", required=True, metavar="HOST", help="The server's host name (subject CN and SAN)."),
        click.option("-o", "--out-dir", required=True, metavar="DIR", help="Where to write the files."),
        click.option(
            "--san",
            multiple=True,
            metavar="NAME",
            help="Another server name: DNS:name, IP:address or a bare one (repeatable).",
        ),
        click.option(
            "--days",
            type=click.IntRange(min=1),
            default=DEFAULT_DAYS,
            show_default=True,
            help="Validity of every certificate.",
        ),
        click.option(
            "--key-type",
            type=click.Choice(["ec", "rsa"]),
            default="ec",
            show_default=True,
            help="ECDSA P-256 (fast) or RSA-2048 (as CCZoo).",
        ),
        click.option("--force", is_flag=True, help="Replace existing files (clients must trust the new ca.crt)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group()
def certs() -> None:
    """Certificates for serving over TLS: a private CA, the server's and a client's certificate.

    Every file is PEM with mode 0600; ssl.cfg is TF Serving's --ssl_config_file.

    \b
    Example:
      enclaveml certs oneway --cn serving.example.com -o certs/
      enclaveml certs twoway --cn serving.example.com --client-cn analyst -o certs/
    """


@certs.command("oneway")
@_common_options
def oneway(cn: str, out_dir: str, san: tuple[str, ...], days: int, key_type: KeyType, force: bool) -> None:
    """One-way TLS: ca.crt ca.key server.crt server.key ssl.cfg.

    Clients trust ca.crt; the server presents server.crt (SAN: the CN, localhost, 127.0.0.1
    and every --san).

    \b
    Example:
      enclaveml certs oneway --cn serving.example.com -o certs/
      enclaveml certs oneway --cn serving.example.com --san IP:10.0.0.5 --key-type rsa -o certs/
    """
    paths = issue_oneway(cn, out_dir, sans=san, days=days, key_type=key_type, now=datetime.now(UTC), force=force)
    _report(paths, "one-way TLS")


@certs.command("twoway")
@_common_options
@click.option("--client-cn", default="client", show_default=True, metavar="NAME", help="The client certificate's CN.")
def twoway(
    cn: str, out_dir: str, san: tuple[str, ...], days: int, key_type: KeyType, force: bool, client_cn: str
) -> None:
    """Mutual TLS: the one-way files plus client.crt client.key; the server requires client certificates.

    \b
    Example:
      enclaveml certs twoway --cn serving.example.com --client-cn analyst -o certs/
    """
    paths = issue_twoway(
        cn, out_dir, client_cn=client_cn, sans=san, days=days, key_type=key_type, now=datetime.now(UTC), force=force
    )
    _report(paths, "mutual TLS")


def _report(paths: CertPaths, mode: str) -> None:
    out_console.print(f"wrote {mode} certificates to {paths.directory}/ (mode 0600):", markup=False)
    for path in paths.files():
        out_console.print(f"  {path.name}", markup=False)
    out_console.print(f"keep {paths.ca_key.name} offline; the server needs {paths.ssl_config.name}", markup=False)
