"""``enclaveml kms ...``: the embedded key store."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from enclaveml.cli._app import App, err_console, kms_backend_option, out_console, pass_app
from enclaveml.errors import ConfigError
from enclaveml.kms import SCRYPT_DEFAULT, KeyInfo, LocalKms, ScryptParams

__all__ = ["kms"]


def _key_json(info: KeyInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "key_id": info.key_id,
        "kms": info.kms,
        "created": info.created.isoformat(),
        "primary_version": info.primary_version,
        "versions": [{"version": v.version, "created": v.created.isoformat(), "state": v.state} for v in info.versions],
    }


def _key_line(info: KeyInfo) -> str:
    states = ", ".join(f"v{v.version} {v.state}" for v in info.versions)
    return f"{info.name}  id={info.key_id}  primary=v{info.primary_version}  ({states})"


@click.group()
@kms_backend_option("--backend")
def kms() -> None:
    """Manage primary keys in the embedded key store (sealed by a passphrase).

    \b
    Example:
      export ENCLAVEML_PASSPHRASE='a long passphrase'   # or be prompted
      enclaveml kms init
      enclaveml kms create-key customers
      enclaveml kms rotate customers
    """


@kms.command("init")
@click.option(
    "--scrypt-log-n",
    type=click.IntRange(12, 22),
    default=SCRYPT_DEFAULT.log_n,
    show_default=True,
    help="scrypt cost: N = 2**value (17 uses 128 MiB per unlock; lower only for tests).",
)
@pass_app
def init(app: App, scrypt_log_n: int) -> None:
    """Create the key store, sealed by a passphrase (scrypt + AES-256-GCM).

    \b
    Example:
      enclaveml --home ./keys kms init
    """
    params = ScryptParams(scrypt_log_n, SCRYPT_DEFAULT.r, SCRYPT_DEFAULT.p)
    if app.store_path.exists():
        raise ConfigError(
            f"a key store already exists at {app.store_path}",
            "use it, or choose another directory with --home / ENCLAVEML_HOME",
        )
    LocalKms.init(app.store_path, app.passphrase(confirm=True), kdf=params, now=datetime.now(UTC))
    err_console.print(f"created key store {app.store_path} (scrypt N=2^{scrypt_log_n}, mode 0600)")


@kms.command("create-key")
@click.argument("name")
@pass_app
def create_key(app: App, name: str) -> None:
    """Create a primary key (AES-256, version 1).

    \b
    Example:
      enclaveml kms create-key customers
    """
    info = app.open_kms().create_key(name)
    out_console.print(f"created {_key_line(info)}")


@kms.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def list_keys(app: App, as_json: bool) -> None:
    """List primary keys and their versions (never key material).

    \b
    Example:
      enclaveml kms list --json
    """
    keys = app.open_kms().list_keys()
    if as_json:
        out_console.print_json(json.dumps([_key_json(k) for k in keys]))
        return
    for info in keys:
        out_console.print(_key_line(info))
    if not keys:
        err_console.print("no keys yet (create one with `enclaveml kms create-key NAME`)")


@kms.command("describe")
@click.argument("name")
@pass_app
def describe(app: App, name: str) -> None:
    """Show one key (by name or id) as JSON.

    \b
    Example:
      enclaveml kms describe customers
    """
    out_console.print_json(json.dumps(_key_json(app.open_kms().describe_key(name))))


@kms.command("rotate")
@click.argument("name")
@pass_app
def rotate(app: App, name: str) -> None:
    """Add a new version of a key; new files use it, old files still decrypt.

    \b
    Example:
      enclaveml kms rotate customers
      enclaveml rewrap data/*.eml --key customers    # move old files to the new version
    """
    info = app.open_kms().rotate_key(name)
    out_console.print(f"rotated {_key_line(info)}")


@kms.command("gramine-pf-key")
@click.argument("name")
@click.option("-o", "--output", required=True, metavar="FILE", help="The wrap key file (0600, never replaced).")
@click.option("--version", type=click.IntRange(min=1), help="Derive from this key version [default: the primary].")
@pass_app
def gramine_pf_key(app: App, name: str, output: str, version: int | None) -> None:
    """Write the Gramine protected-files wrap key derived from a key (16 bytes, secret).

    The key broker's secret provisioning sends the same 16 bytes to an attested enclave
    (`broker serve --secret-prov-key NAME`, Gramine's SECRET_PROVISION_SET_KEY), so the
    owner encrypts the model with this file and never ships it. Derived one-way (HKDF): it
    reveals nothing of the key itself. With --kms broker: owner apps only, audited.

    \b
    Example:
      enclaveml kms gramine-pf-key models -o wrap.key
      enclaveml model encrypt saved_model.pb -o models/resnet50/1/saved_model.pb \\
          --format gramine-pf --wrap-key wrap.key
    """
    from enclaveml.crypto.gramine_pf import write_wrap_key_file

    service = app.open_kms()
    derive = getattr(service, "gramine_pf_key", None)
    if derive is None:
        raise ConfigError(f"the {service.kms_name} KMS cannot derive Gramine keys", "use --kms local or --kms broker")
    write_wrap_key_file(output, derive(name, version))
    out_console.print(f"wrote the Gramine wrap key of {name} to {output} (16 bytes, mode 0600; keep it secret)")


@kms.command("destroy-version")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@click.option("--yes", is_flag=True, help="Confirm: files still wrapped by this version become unreadable.")
@pass_app
def destroy_version(app: App, name: str, version: int, yes: bool) -> None:
    """Destroy one key version's material for good (after rewrapping its files).

    \b
    Example:
      enclaveml kms destroy-version customers 1 --yes
    """
    if not yes:
        raise ConfigError(
            f"destroying {name} v{version} makes every file it wrapped unreadable",
            "rewrap those files first, then add --yes",
        )
    info = app.open_kms().destroy_key_version(name, version)
    out_console.print(f"destroyed v{version}: {_key_line(info)}")
