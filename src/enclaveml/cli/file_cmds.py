"""``enclaveml encrypt | decrypt | inspect | rewrap``: EML v1 files and directories."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import click

from enclaveml.cli._app import (
    App,
    err_console,
    kms_backend_option,
    out_console,
    parse_context,
    pass_app,
    progress_bar,
)
from enclaveml.crypto import (
    DEFAULT_SEGMENT_SIZE,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    decrypt_file,
    describe_file,
    encrypt_file,
    rewrap_file,
)
from enclaveml.crypto._tree import SUFFIX, decrypt_tree, encrypt_tree, tree_size
from enclaveml.errors import ConfigError, EnclaveMLError

__all__ = ["decrypt", "encrypt", "inspect", "rewrap"]

STDIO = "-"
_context_option = click.option(
    "--context",
    "context_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Encryption context, authenticated in the header; decrypt needs exactly the same pairs.",
)


def _rate(size: int, seconds: float) -> str:
    return f"{size / 1e6:,.1f} MB in {seconds:.2f} s ({size / 1e6 / max(seconds, 1e-9):,.0f} MB/s)"


def _size_of(path: str) -> int | None:
    return None if path == STDIO else Path(path).stat().st_size


def _segment_size(text: str) -> int:
    units = {"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
    lowered = text.strip().lower()
    for suffix in sorted(units, key=len, reverse=True):
        if lowered.endswith(suffix):
            value = int(lowered[: -len(suffix)]) * units[suffix]
            break
    else:
        value = int(lowered)
    if not MIN_SEGMENT_SIZE <= value <= MAX_SEGMENT_SIZE:
        raise ConfigError(f"--segment-size {text} is out of range", "use 1KiB to 16MiB, e.g. 256KiB")
    return value


@click.command()
@kms_backend_option("--kms")
@click.argument("source")
@click.argument("destination", required=False)
@click.option("--key", "-k", required=True, help="Primary key name or id that wraps the data key.")
@_context_option
@click.option(
    "--segment-size",
    default=f"{DEFAULT_SEGMENT_SIZE >> 10}KiB",
    show_default=True,
    help="Plaintext bytes per authenticated segment (1KiB..16MiB).",
)
@pass_app
def encrypt(
    app: App,
    source: str,
    destination: str | None,
    key: str,
    context_pairs: tuple[str, ...],
    segment_size: str,
) -> None:
    """Encrypt a file, a directory (recursively) or stdin (-) into EML v1.

    DESTINATION defaults to SOURCE.eml; for a directory, files are mirrored with .eml added.

    \b
    Example:
      enclaveml encrypt people.csv people.csv.eml --key customers --context tenant=acme
      enclaveml encrypt data/ encrypted/ --key customers
      cat people.csv | enclaveml encrypt - - --key customers > people.csv.eml
    """
    context = parse_context(context_pairs)
    seg = _segment_size(segment_size)
    target = destination or (STDIO if source == STDIO else source.rstrip("/") + SUFFIX)
    kms = app.open_kms()
    started = time.perf_counter()
    if source != STDIO and Path(source).is_dir():
        with progress_bar("encrypting", tree_size(Path(source))) as advance:
            files = encrypt_tree(
                Path(source), Path(target), kms, key, context=context, segment_size=seg, progress=advance
            )
        err_console.print(f"encrypted {len(files)} files into {target} in {time.perf_counter() - started:.2f} s")
        return
    with progress_bar("encrypting", _size_of(source)) as advance:
        header = encrypt_file(
            sys.stdin.buffer if source == STDIO else source,
            sys.stdout.buffer if target == STDIO else target,
            kms,
            key,
            context=context,
            segment_size=seg,
            progress=advance,
        )
    if target != STDIO:
        size = Path(target).stat().st_size
        err_console.print(
            f"encrypted {source} -> {target}: key {key} v{header.envelope.key_version}, "
            f"{_rate(size, time.perf_counter() - started)}"
        )


@click.command()
@kms_backend_option("--kms")
@click.argument("source")
@click.argument("destination", required=False)
@_context_option
@pass_app
def decrypt(app: App, source: str, destination: str | None, context_pairs: tuple[str, ...]) -> None:
    """Verify and decrypt an EML file, a directory of them, or stdin (-).

    Output to a file appears only after every segment verified; nothing is left behind on
    failure. Output to stdout (-) is released segment by segment: if a later segment fails,
    the command exits non-zero and what was already printed is unauthenticated.

    \b
    Example:
      enclaveml decrypt people.csv.eml people.csv --context tenant=acme
      enclaveml decrypt encrypted/ plain/
      enclaveml decrypt people.csv.eml - | head
    """
    context = parse_context(context_pairs)
    if destination is None:
        if not source.endswith(SUFFIX):
            raise ConfigError(f"cannot derive an output name from {source}", "give DESTINATION explicitly")
        destination = source[: -len(SUFFIX)]
    kms = app.open_kms()
    started = time.perf_counter()
    if source != STDIO and Path(source).is_dir():
        with progress_bar("decrypting", tree_size(Path(source))) as advance:
            files = decrypt_tree(Path(source), Path(destination), kms, context=context, progress=advance)
        err_console.print(f"decrypted {len(files)} files into {destination} in {time.perf_counter() - started:.2f} s")
        return
    try:
        with progress_bar("decrypting", _size_of(source)) as advance:
            decrypt_file(
                sys.stdin.buffer if source == STDIO else source,
                sys.stdout.buffer if destination == STDIO else destination,
                kms,
                context=context,
                progress=advance,
            )
    except EnclaveMLError as exc:
        if destination == STDIO:
            exc.hint = "output already written to stdout is unauthenticated: discard it"
        raise exc.about(source) from None
    if destination != STDIO:
        elapsed = time.perf_counter() - started
        err_console.print(f"decrypted {source} -> {destination}: {_rate(Path(destination).stat().st_size, elapsed)}")


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(path: str, as_json: bool) -> None:
    """Show an EML file's header: format, key reference, sizes, context. Needs no key.

    Sizes come from the file length and are only authenticated by decryption.

    \b
    Example:
      enclaveml inspect people.csv.eml --json
    """
    info = describe_file(path)
    header = info.header
    fields: dict[str, object] = {
        "file": path,
        "format": "EML v1",
        "algorithm": "AES-256-GCM STREAM",
        "kms": header.bound.kms_name,
        "key_id": header.bound.key_id,
        "key_version": header.envelope.key_version,
        "segment_size": header.bound.segment_size,
        "segments": info.layout.segments,
        "file_size": info.file_size,
        "plaintext_size": info.layout.plaintext_size,
        "header_size": header.size,
        "context": header.bound.context_dict(),
        "wrapped_key": {
            "bytes": len(header.envelope.wrapped_key),
            "sha256_prefix": hashlib.sha256(header.envelope.wrapped_key).hexdigest()[:16],
        },
    }
    if as_json:
        out_console.print_json(json.dumps(fields))
        return
    for name, value in fields.items():
        if name == "context":
            value = ", ".join(f"{k}={v}" for k, v in header.bound.context) or "(none)"
        elif name == "wrapped_key":
            value = f"{len(header.envelope.wrapped_key)} bytes, sha256 {fields['wrapped_key']['sha256_prefix']}…"  # type: ignore[index]
        out_console.print(f"{name:<15} {value}", markup=False)


@click.command()
@kms_backend_option("--kms")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "-k", default=None, help="Key name or id (must be the files' key); default: each file's own.")
@pass_app
def rewrap(app: App, paths: tuple[str, ...], key: str | None) -> None:
    """Re-wrap files' data keys with the key's newest version; the payload is not touched.

    \b
    Example:
      enclaveml kms rotate customers
      enclaveml rewrap people.csv.eml --key customers
    """
    kms = app.open_kms()
    for path in paths:
        try:
            old, new = rewrap_file(path, kms, key)
        except EnclaveMLError as exc:
            raise exc.about(path) from None
        out_console.print(
            f"rewrapped {path}: key {new.bound.key_id} v{old.envelope.key_version} -> v{new.envelope.key_version}",
            markup=False,
        )
