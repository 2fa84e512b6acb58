"""``enclaveml enclave ...``: the enclave signing key, SIGSTRUCT signing and inspection."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path

import click

from enclaveml._atomic import atomic_output
from enclaveml.attestation.sigstruct import (
    DEFAULT_ATTRIBUTES,
    DEFAULT_ATTRIBUTES_MASK,
    AttributeFlag,
    Sigstruct,
    attribute_flag_names,
    build_sigstruct,
    enclave_key_to_pem,
    generate_enclave_key,
    load_enclave_key_pem,
    load_enclave_signing_key_pem,
    mrsigner_of,
    parse_sigstruct,
    verify_sigstruct,
)
from enclaveml.cli._app import err_console, out_console
from enclaveml.errors import AttestationError, ConfigError

__all__ = ["enclave"]


def _hex_bytes(size: int) -> Callable[[click.Context, click.Parameter, str], bytes]:
    """A click callback: exactly ``size`` bytes written as hex (an optional ``0x`` is allowed)."""

    def convert(ctx: click.Context, param: click.Parameter, value: str) -> bytes:
        try:
            decoded = bytes.fromhex(value.strip().lower().removeprefix("0x"))
        except ValueError:
            raise click.BadParameter(f"{value!r} is not hex", ctx, param) from None
        if len(decoded) != size:
            raise click.BadParameter(f"needs {size} bytes ({2 * size} hex digits), got {len(decoded)}", ctx, param)
        return decoded

    return convert


@click.group()
def enclave() -> None:
    """Sign SGX enclaves: the enclave key, MRSIGNER, SIGSTRUCT (.sig) files.

    Run these in the secured build environment that holds the enclave key; only the .sig
    file and the printed mr_enclave / mr_signer leave it.

    \b
    Example:
      enclaveml enclave keygen -o enclave-key.pem
      enclaveml enclave mrsigner enclave-key.pem
      enclaveml enclave sign --key enclave-key.pem --isv-prod-id 1 --isv-svn 3 -o app.sig \\
          --mr-enclave 33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb
      enclaveml enclave sig-info app.sig
    """


@enclave.command("keygen")
@click.option(
    "-o", "--output", default="enclave-key.pem", show_default=True, metavar="FILE", help="Where to write the key."
)
def keygen(output: str) -> None:
    """Create an enclave signing key (RSA-3072, e=3) as PEM, mode 0600; print its MRSIGNER.

    Refuses to overwrite an existing file: losing the key changes MRSIGNER.

    \b
    Example:
      enclaveml enclave keygen -o enclave-key.pem
    """
    key = generate_enclave_key()
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"{output} already exists; not overwriting an enclave key",
            "choose another -o path, or remove the old key if you really mean to replace it",
        ) from None
    try:
        os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
        with os.fdopen(fd, "wb") as out:
            out.write(enclave_key_to_pem(key))
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(output)
        raise
    out_console.print(f"mr_signer  {mrsigner_of(key).hex()}", markup=False)
    err_console.print(f"wrote {output} (RSA-3072, e=3, mode 0600); keep it in the secured build environment")


@enclave.command("mrsigner")
@click.argument("key_file", metavar="KEY.pem", type=click.Path(dir_okay=False))
def mrsigner(key_file: str) -> None:
    """Print the MRSIGNER (SHA-256 of the LE modulus) of a private or public enclave key.

    \b
    Example:
      enclaveml enclave mrsigner enclave-key.pem
      openssl rsa -in enclave-key.pem -pubout -out enclave-pub.pem
      enclaveml enclave mrsigner enclave-pub.pem
    """
    try:
        key = load_enclave_key_pem(Path(key_file).read_bytes())
    except ConfigError as exc:
        raise exc.about(key_file) from None
    out_console.print(mrsigner_of(key).hex(), markup=False)


@enclave.command("sign")
@click.option("--key", "key_file", required=True, metavar="KEY.pem", help="Enclave private key (RSA-3072, e=3).")
@click.option(
    "--mr-enclave",
    required=True,
    metavar="HEX",
    callback=_hex_bytes(32),
    help="The enclave measurement (64 hex digits).",
)
@click.option("--isv-prod-id", required=True, type=click.IntRange(0, 0xFFFF), help="ISVPRODID (0..65535).")
@click.option("--isv-svn", required=True, type=click.IntRange(0, 0xFFFF), help="ISVSVN, the security version.")
@click.option(
    "--attributes",
    metavar="HEX",
    callback=_hex_bytes(16),
    default=DEFAULT_ATTRIBUTES.hex(),
    show_default=True,
    help="ATTRIBUTES as stored: FLAGS u64 LE then XFRM u64 LE (32 hex digits).",
)
@click.option(
    "--attributes-mask",
    metavar="HEX",
    callback=_hex_bytes(16),
    default=DEFAULT_ATTRIBUTES_MASK.hex(),
    show_default=True,
    help="ATTRIBUTEMASK as stored (32 hex digits).",
)
@click.option("--debug", "debug_enclave", is_flag=True, help="Set the DEBUG flag: the host can read the enclave.")
@click.option(
    "--date", "signed_on", type=click.DateTime(["%Y%m%d"]), metavar="YYYYMMDD", help="Signing date [default: today]."
)
@click.option("-o", "--output", required=True, metavar="FILE", help="Where to write the SIGSTRUCT (.sig).")
def sign(
    key_file: str,
    mr_enclave: bytes,
    isv_prod_id: int,
    isv_svn: int,
    attributes: bytes,
    attributes_mask: bytes,
    debug_enclave: bool,
    signed_on: dt.datetime | None,
    output: str,
) -> None:
    """Sign an enclave measurement into a SIGSTRUCT (.sig, Gramine compatible).

    Prints the mr_enclave and mr_signer to register in a policy.

    \b
    Example:
      enclaveml enclave sign --key enclave-key.pem \\
          --mr-enclave 33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb \\
          --isv-prod-id 1 --isv-svn 3 -o app.sig
    """
    try:
        key = load_enclave_signing_key_pem(Path(key_file).read_bytes())
    except ConfigError as exc:
        raise exc.about(key_file) from None
    if debug_enclave:
        flags = int.from_bytes(attributes[:8], "little") | AttributeFlag.DEBUG
        attributes = flags.to_bytes(8, "little") + attributes[8:]
    signed = build_sigstruct(
        mr_enclave,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        date=(signed_on or dt.datetime.now(dt.UTC)).date(),
        key=key,
        attributes=attributes,
        attributes_mask=attributes_mask,
    )
    with atomic_output(output, mode=0o644) as out:
        out.write(signed)
    sigstruct = parse_sigstruct(signed)
    out_console.print(f"mr_enclave  {sigstruct.mr_enclave.hex()}", markup=False)
    out_console.print(f"mr_signer   {sigstruct.mr_signer.hex()}", markup=False)
    flags_text = ", ".join(attribute_flag_names(sigstruct.attribute_flags))
    err_console.print(f"wrote {output} (SIGSTRUCT, 1808 bytes; {flags_text})", markup=False)
    if sigstruct.debug:
        err_console.print("warning: DEBUG enclave: the host can read its memory; policies reject it by default")


@enclave.command("sig-info")
@click.argument("sig_file", metavar="FILE.sig", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sig_info(sig_file: str, as_json: bool) -> None:
    """Show a SIGSTRUCT (.sig) and check its RSA signature and Q1/Q2. Exit 3 if they fail.

    Works on any SGX SIGSTRUCT, including Gramine's .sig files.

    \b
    Example:
      enclaveml enclave sig-info app.sig
      enclaveml enclave sig-info app.sig --json
    """
    data = Path(sig_file).read_bytes()
    try:
        sigstruct = parse_sigstruct(data)
    except AttestationError as exc:
        raise exc.about(sig_file) from None
    failure: AttestationError | None = None
    try:
        verify_sigstruct(data)
    except AttestationError as exc:
        failure = exc
    _show(sig_file, sigstruct, failure, as_json)
    if failure is not None:
        raise failure.about(sig_file)


def _show(path: str, sigstruct: Sigstruct, failure: AttestationError | None, as_json: bool) -> None:
    fields: dict[str, object] = {"file": path, **sigstruct.to_json()}
    fields["signature_valid"] = failure is None
    fields["failure"] = None if failure is None else {"reason": failure.reason, "what": failure.what}
    if as_json:
        out_console.print_json(json.dumps(fields))
        return
    text = dict(fields)
    text["attribute_flags"] = ", ".join(attribute_flag_names(sigstruct.attribute_flags)) or "-"
    text["debug"] = "yes (the host can read enclave memory)" if sigstruct.debug else "no"
    text["signature_valid"] = "yes (RSA-3072 e=3, PKCS#1 v1.5 SHA-256; Q1/Q2 match)" if failure is None else "NO"
    if failure is None:
        del text["failure"]
    else:
        text["failure"] = f"{failure.reason}: {failure.what}"
    for name, value in text.items():
        out_console.print(f"{name:<16} {value}", markup=False)
