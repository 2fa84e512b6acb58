"""What every command shares: the enclaveml home, the passphrase, progress bars, output.

The only place the CLI reads the environment (``ENCLAVEML_HOME``, ``ENCLAVEML_PASSPHRASE``,
and for the key broker ``ENCLAVEML_KMS``, ``ENCLAVEML_BROKER_URL``, ``ENCLAVEML_APP_ID``,
``ENCLAVEML_API_KEY``, ``ENCLAVEML_BROKER_CA``, ``ENCLAVEML_BROKER_PASSPHRASE``);
everything below it receives values as arguments.

KMS backend: ``local`` (the embedded key store, default) or ``broker`` (the key broker's
API as the app ``ENCLAVEML_APP_ID`` with ``ENCLAVEML_API_KEY``), chosen by
``--backend``/``--kms`` (``kms_backend``) or ``ENCLAVEML_KMS``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from enclaveml.errors import ConfigError
from enclaveml.kms import LocalKms

if TYPE_CHECKING:  # imported where used: they bring httpx, which most commands do not need
    from enclaveml.broker.client import BrokerClient
    from enclaveml.kms.broker import BrokerKms

__all__ = ["App", "err_console", "out_console", "parse_context", "pass_app", "progress_bar"]

STORE_FILE = "keystore.json"
BROKER_DIR = "broker"
DEFAULT_BROKER_URL = "https://127.0.0.1:8443"
KMS_BACKENDS = ("local", "broker")
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)


@dataclass
class App:
    home: Path
    debug: bool
    kms_backend: str | None = None

    @classmethod
    def from_options(cls, home: str | None, debug: bool) -> App:
        chosen = home or os.environ.get("ENCLAVEML_HOME") or str(Path.home() / ".enclaveml")
        return cls(Path(chosen).expanduser(), debug)

    @property
    def store_path(self) -> Path:
        return self.home / STORE_FILE

    def passphrase(self, *, confirm: bool = False) -> str:
        """From ``ENCLAVEML_PASSPHRASE``, else a prompt on the terminal (never echoed)."""
        value = os.environ.get("ENCLAVEML_PASSPHRASE")
        if value:
            return value
        if not sys.stdin.isatty():
            raise ConfigError(
                "no passphrase for the key store",
                "set ENCLAVEML_PASSPHRASE or run the command in a terminal to be prompted",
            )
        first = getpass.getpass("key store passphrase: ")
        if confirm and getpass.getpass("repeat passphrase: ") != first:
            raise ConfigError("the passphrases do not match", "run the command again")
        if not first:
            raise ConfigError("the passphrase is empty", "choose a passphrase")
        return first

    @property
    def broker_home(self) -> Path:
        """The key broker's files: store, admin credentials, self-signed TLS certificate."""
        return self.home / BROKER_DIR

    def broker_url(self, url: str | None = None) -> str:
        return url or os.environ.get("ENCLAVEML_BROKER_URL") or DEFAULT_BROKER_URL

    def broker_ca(self) -> str | None:
        """``ENCLAVEML_BROKER_CA``, else the self-signed certificate of ``broker serve --self-signed``."""
        ca = os.environ.get("ENCLAVEML_BROKER_CA")
        if ca:
            return ca
        own = self.broker_home / "tls" / "cert.pem"
        return str(own) if own.exists() else None

    def client_cert(self) -> tuple[str, str] | None:
        """``(ENCLAVEML_CLIENT_CERT, ENCLAVEML_CLIENT_KEY)`` for a broker with mutual TLS, else None."""
        cert, key = os.environ.get("ENCLAVEML_CLIENT_CERT", ""), os.environ.get("ENCLAVEML_CLIENT_KEY", "")
        if bool(cert) != bool(key):
            raise ConfigError("set both ENCLAVEML_CLIENT_CERT and ENCLAVEML_CLIENT_KEY, or neither")
        return (cert, key) if cert else None

    def broker_client(self, url: str | None = None, *, credentials: tuple[str, str] | None = None) -> BrokerClient:
        """A signed-request client with ``credentials`` or those of ``ENCLAVEML_APP_ID`` / ``ENCLAVEML_API_KEY``."""
        from enclaveml.broker.client import BrokerClient

        app_id, api_key = credentials or self._broker_credentials()
        return BrokerClient(self.broker_url(url), app_id, api_key, ca=self.broker_ca(), client_cert=self.client_cert())

    def _broker_credentials(self) -> tuple[str, str]:
        app_id, api_key = os.environ.get("ENCLAVEML_APP_ID", ""), os.environ.get("ENCLAVEML_API_KEY", "")
        if not app_id or not api_key:
            raise ConfigError(
                "no key broker credentials",
                "set ENCLAVEML_APP_ID and ENCLAVEML_API_KEY to an app enrolled with `enclaveml broker enroll`",
            )
        return app_id, api_key

    def open_kms(self) -> LocalKms | BrokerKms:
        """The KMS backend chosen by ``--backend``/``--kms`` or ``ENCLAVEML_KMS`` (default ``local``)."""
        backend = self.kms_backend or os.environ.get("ENCLAVEML_KMS") or "local"
        if backend not in KMS_BACKENDS:
            raise ConfigError(f"unknown KMS backend {backend!r}", "use local or broker (ENCLAVEML_KMS)")
        if backend == "broker":
            from enclaveml.kms.broker import BrokerKms

            app_id, api_key = self._broker_credentials()
            return BrokerKms(self.broker_url(), app_id, api_key, ca=self.broker_ca(), client_cert=self.client_cert())
        if not self.store_path.exists():
            raise ConfigError(
                f"no key store at {self.store_path}",
                "run `enclaveml kms init` first, or set ENCLAVEML_HOME / --home to the right directory",
            )
        return LocalKms(self.store_path, self.passphrase())


pass_app = click.make_pass_decorator(App)


def parse_context(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("tenant=acme", ...)`` -> ``{"tenant": "acme"}``; each key once."""
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--context {pair!r} is not KEY=VALUE", "write it like --context tenant=acme")
        if key in context:
            raise ConfigError(f"--context key {key!r} is given twice", "give each key once")
        context[key] = value
    return context


@contextlib.contextmanager
def progress_bar(label: str, total: int | None, *, unit: str = "bytes") -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (only on a terminal); yields ``advance(n)``.

    ``unit="bytes"`` shows sizes and speed; ``unit="rows"`` shows a count.
    """
    counters = (
        (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(), TextColumn(unit))
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        *counters,
        TimeRemainingColumn(),
        console=err_console,
        disable=not err_console.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def instant_option(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """A click callback for ``--at``-style options: ISO 8601, UTC when no zone is given."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not ISO 8601, e.g. 2025-07-01T12:00:00Z", ctx, param) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _set_backend(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        app = ctx.find_object(App)
        if app is not None:
            app.kms_backend = value


def kms_backend_option(flag: str) -> Callable[[click.decorators.FC], click.decorators.FC]:
    """``--backend`` / ``--kms local|broker``: sets ``App.kms_backend`` before the command runs."""
    return click.option(
        flag,
        "kms_backend",
        type=click.Choice(KMS_BACKENDS),
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_set_backend,
        help="Key management backend [default: $ENCLAVEML_KMS or local]; broker uses "
        "ENCLAVEML_BROKER_URL, ENCLAVEML_APP_ID, ENCLAVEML_API_KEY, ENCLAVEML_BROKER_CA.",
    )
