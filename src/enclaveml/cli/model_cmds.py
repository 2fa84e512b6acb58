"""``enclaveml model encrypt | wrap-key | inspect | decrypt``: model files for serving.

Two sealed formats, one per server: an EML model file (our container, ONNX inside, model
metadata in the header, data key wrapped by a KMS key) for ``enclaveml serve``, and a
Gramine protected file (``crypto/gramine_pf.py``, a 16-byte wrap key the enclave gets by
secret provisioning) for a server that Gramine runs, such as CCZoo's TF Serving.

A SavedModel directory given to ``encrypt`` is packed into one archive in memory
(``serving/runtime_tf.py``) and sealed whole: an EML file with ``format=tf-savedmodel``, or
a protected file holding the archive. No TensorFlow is needed to seal it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from enclaveml._atomic import atomic_output
from enclaveml.cli._app import App, err_console, kms_backend_option, out_console, pass_app
from enclaveml.crypto._format import MAGIC
from enclaveml.crypto.gramine_pf import (
    PF_NODE_SIZE,
    describe_pf,
    encrypt_pf,
    encrypt_pf_file,
    gramine_path,
    is_pf,
    new_wrap_key_file,
    read_pf_file,
    read_wrap_key_file,
)
from enclaveml.errors import ConfigError, EnclaveMLError, FormatError

__all__ = ["model"]

EML, PF = "eml", "gramine-pf"


@click.group()
def model() -> None:
    """Seal models for serving: EML model files (KMS key) or Gramine protected files (wrap key).

    \b
    Example:
      enclaveml model encrypt iris.onnx -o models/iris/1/model.onnx.eml --key models
      enclaveml model inspect models/iris/1/model.onnx.eml
    """


def _name_and_version(output: str, name: str | None, version: int | None) -> tuple[str, int]:
    """``--name`` / ``--version``, else from a TF Serving layout ``.../<name>/<version>/<file>``."""
    parent = Path(output).parent
    laid_out = parent.name.isdigit() and int(parent.name) >= 1 and parent.parent.name not in ("", ".", "..")
    if laid_out:
        version = int(parent.name) if version is None else version
        name = parent.parent.name if name is None else name
    if name is None or version is None:
        raise ConfigError(
            f"cannot tell the model name and version from {output}",
            "lay it out like TF Serving, MODELS/<name>/<version>/model.onnx.eml, or give --name and --version",
        )
    return name, version


def _manifest_path(bound: str) -> str:
    return bound if bound.startswith("/") else "/" + bound


@model.command("encrypt")
@kms_backend_option("--kms")
@click.argument("source", type=click.Path(exists=True))
@click.option("--output", "-o", required=True, help="The sealed model file to write (replaced atomically).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice([EML, PF]),
    default=EML,
    show_default=True,
    help="eml: for enclaveml serve (ONNX, KMS key); gramine-pf: for a server run by Gramine (any file, wrap key).",
)
@click.option("--key", "-k", help="eml: the KMS primary key that wraps the model's data key.")
@click.option("--name", help="eml: model name [default: from OUTPUT laid out as .../<name>/<version>/file].")
@click.option(
    "--version", "model_version", type=click.IntRange(min=1), help="eml: model version [default: from OUTPUT]."
)
@click.option("--wrap-key", type=click.Path(exists=True, dir_okay=False), help="gramine-pf: the 16-byte wrap key file.")
@click.option("--pf-path", help="gramine-pf: the path the file is bound to [default: OUTPUT as given, normalised].")
@click.option(
    "--pf-version",
    type=click.Choice(["1", "2"]),
    default="2",
    show_default=True,
    help="gramine-pf: 2 for Gramine >= 1.9; 1 for every Gramine (<= 1.8 reads only 1, e.g. CCZoo's 1.3.1).",
)
@pass_app
def encrypt_model(
    app: App,
    source: str,
    output: str,
    fmt: str,
    key: str | None,
    name: str | None,
    model_version: int | None,
    wrap_key: str | None,
    pf_path: str | None,
    pf_version: str,
) -> None:
    """Seal the model SOURCE into OUTPUT; no plaintext byte is written.

    eml: SOURCE must be ONNX, or a TensorFlow SavedModel directory (packed whole, served
    where TensorFlow is installed); the inputs and outputs go into the header with the model
    name and version (for a SavedModel: its serving_default signature, when the TF protos
    are installed to read it, else recorded as unknown). gramine-pf: SOURCE is any file (a
    TF saved_model.pb, ssl.cfg) or a SavedModel directory (packed); the file is bound to
    --pf-path, which must be the manifest uri without "file:", exactly.

    \b
    Example:
      enclaveml model encrypt iris.onnx -o models/iris/1/model.onnx.eml --key models
      enclaveml model encrypt export/ -o models/tfm/1/model.savedmodel.eml --key models
      enclaveml model wrap-key -o wrap.key
      enclaveml model encrypt saved_model.pb -o models/resnet50/1/saved_model.pb \\
          --format gramine-pf --wrap-key wrap.key --pf-version 1
    """
    if fmt == PF:
        if wrap_key is None:
            raise ConfigError("--format gramine-pf needs --wrap-key", "make one with `enclaveml model wrap-key -o KEY`")
        if key is not None or name is not None or model_version is not None:
            raise ConfigError("--key, --name and --version are for --format eml", "gramine-pf uses --wrap-key only")
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        pf_key, what = read_wrap_key_file(wrap_key), f"Gramine protected file v{pf_version}"
        if Path(source).is_dir():
            bound = _encrypt_savedmodel_pf(source, output, pf_key, pf_path, int(pf_version))
            what += " holding a SavedModel archive"
        else:
            bound = encrypt_pf_file(source, output, pf_key, pf_path, int(pf_version))
        err_console.print(f"encrypted {source} -> {output}: {what}, bound to path {bound!r}", markup=False)
        err_console.print("mount it in the Gramine manifest (fs.mounts) with:", markup=False)
        out_console.print(
            f'{{ path = "{_manifest_path(bound)}", uri = "file:{bound}", type = "encrypted" }}', markup=False
        )
        return
    if key is None:
        raise ConfigError("--format eml needs --key", "name the KMS primary key, e.g. --key models")
    if wrap_key is not None or pf_path is not None:
        raise ConfigError("--wrap-key and --pf-path are for --format gramine-pf")
    from enclaveml.analytics.ml import ModelMetadata, save_encrypted_model

    model_name, version = _name_and_version(output, name, model_version)
    if Path(source).is_dir():
        _encrypt_savedmodel_eml(app, source, output, key, model_name, version)
        return
    onnx_bytes = Path(source).read_bytes()
    metadata = ModelMetadata.from_onnx(onnx_bytes, name=model_name, version=version)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_encrypted_model(onnx_bytes, output, app.open_kms(), key, metadata=metadata)
    err_console.print(
        f"encrypted {source} -> {output}: model {model_name} version {version}, key {key}, "
        f"{len(metadata.inputs)} inputs, {len(metadata.outputs)} outputs",
        markup=False,
    )


def _encrypt_savedmodel_pf(source: str, output: str, wrap_key: bytes, pf_path: str | None, pf_version: int) -> str:
    from enclaveml.serving.runtime_tf import pack_savedmodel

    bound = gramine_path(output) if pf_path is None else pf_path
    sealed = encrypt_pf(pack_savedmodel(source), wrap_key, bound, version=pf_version)
    with atomic_output(output, mode=0o600) as out:
        out.write(sealed)
    return bound


def _encrypt_savedmodel_eml(app: App, source: str, output: str, key: str, name: str, version: int) -> None:
    from enclaveml.serving.runtime_tf import save_encrypted_savedmodel

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    metadata = save_encrypted_savedmodel(source, output, app.open_kms(), key, name=name, version=version)
    tensors = (
        f"{len(metadata.inputs)} inputs, {len(metadata.outputs)} outputs (signature serving_default)"
        if metadata.signature_known
        else "inputs and outputs unknown (saved_model.pb unreadable here or too large a signature; the server reads it)"
    )
    err_console.print(
        f"encrypted {source} -> {output}: TensorFlow SavedModel, model {name} version {version}, key {key}, {tensors}",
        markup=False,
    )


@model.command("wrap-key")
@click.option("--output", "-o", required=True, help="The key file to create; never overwritten.")
def wrap_key_cmd(output: str) -> None:
    """Create a new random 16-byte Gramine wrap key file (mode 0600).

    Whoever holds it decrypts every file sealed with it: keep it with the secret
    provisioning server (or key broker) that releases it to attested enclaves only.

    \b
    Example:
      enclaveml model wrap-key -o wrap.key
    """
    new_wrap_key_file(output)
    err_console.print(f"wrote a new 16-byte wrap key to {output} (mode 0600)", markup=False)


def _describe(path: str) -> dict[str, object]:
    with open(path, "rb") as src:
        prefix = src.read(PF_NODE_SIZE)
    size = Path(path).stat().st_size
    if is_pf(prefix):
        info = describe_pf(prefix, size)
        return {
            "file": path,
            "format": f"gramine-pf v{info.version}",
            "readers": "Gramine >= 1.9" if info.version == 2 else "every Gramine version",
            "file_size": size,
            "nodes": info.nodes,
            "plaintext_size": f"{info.plaintext_size_min}..{info.plaintext_size_max} (exact size is encrypted)",
            "pending_write": info.pending_write,
            "note": "the bound path and the contents are encrypted: decrypt needs the wrap key and the path",
        }
    if not prefix.startswith(MAGIC):
        raise FormatError("neither an EML model file nor a Gramine protected file", "check the file name")
    from enclaveml.analytics.ml import ModelMetadata
    from enclaveml.crypto import describe_file

    header = describe_file(path).header
    meta = ModelMetadata.from_context(header.bound.context_dict())
    known = meta.signature_known
    return {
        "file": path,
        "format": "eml",
        "model_format": meta.format,
        "model_name": meta.name,
        "model_version": meta.version,
        "inputs": [{"name": t.name, "type": t.type, "shape": list(t.shape)} for t in meta.inputs] if known else None,
        "outputs": [{"name": t.name, "type": t.type, "shape": list(t.shape)} for t in meta.outputs] if known else None,
        "kms": header.bound.kms_name,
        "key_id": header.bound.key_id,
        "key_version": header.envelope.key_version,
        "file_size": size,
        "note": "header metadata, unauthenticated here: it is verified when the model is loaded",
    }


@model.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_model(path: str, as_json: bool) -> None:
    """Show a sealed model's format and what its header says; needs no key.

    \b
    Example:
      enclaveml model inspect models/iris/1/model.onnx.eml
      enclaveml model inspect models/resnet50/1/saved_model.pb --json
    """
    try:
        fields = _describe(path)
    except EnclaveMLError as exc:
        raise exc.about(path) from None
    if as_json:
        out_console.print_json(json.dumps(fields))
        return
    for name, value in fields.items():
        if name in ("inputs", "outputs") and value is None:
            value = "unknown (sealed without reading the signature; the server reads it from the model)"
        elif name in ("inputs", "outputs"):
            value = ", ".join(f"{t['name']} {t['type']} {t['shape']}" for t in value)  # type: ignore[attr-defined]
        out_console.print(f"{name:<15} {value}", markup=False)


@model.command("decrypt")
@kms_backend_option("--kms")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", required=True, help="The plaintext model to write (0600, only once verified).")
@click.option("--key-from-kms", is_flag=True, help="eml: unwrap the file's data key with the KMS key it names.")
@click.option("--wrap-key", type=click.Path(exists=True, dir_okay=False), help="gramine-pf: the 16-byte wrap key file.")
@click.option("--pf-path", help="gramine-pf: the path the file is bound to [default: SOURCE as given, normalised].")
@pass_app
def decrypt_model(
    app: App, source: str, output: str, key_from_kms: bool, wrap_key: str | None, pf_path: str | None
) -> None:
    """Verify and decrypt a sealed model, for its owner; OUTPUT appears only if every byte verified.

    A sealed SavedModel comes back as its archive: `tar -x -C DIR -f OUTPUT` restores it.

    \b
    Example:
      enclaveml model decrypt models/iris/1/model.onnx.eml -o iris.onnx --key-from-kms
      enclaveml model decrypt models/resnet50/1/saved_model.pb -o saved_model.pb \\
          --wrap-key wrap.key --pf-path models/resnet50/1/saved_model.pb
    """
    with open(source, "rb") as src:
        prefix = src.read(len(MAGIC))
    if is_pf(prefix):
        if wrap_key is None or key_from_kms:
            raise ConfigError(f"{source} is a Gramine protected file", "decrypt it with --wrap-key (and --pf-path)")
        bound = gramine_path(source) if pf_path is None else pf_path
        plaintext = read_pf_file(source, read_wrap_key_file(wrap_key), bound)
    elif prefix == MAGIC:
        if not key_from_kms or wrap_key is not None or pf_path is not None:
            raise ConfigError(f"{source} is an EML model file", "decrypt it with --key-from-kms")
        from enclaveml.analytics.ml import MODEL_FORMATS, load_encrypted_model

        # A SavedModel comes back as its archive: `tar -x -C DIR -f OUTPUT` restores the directory.
        plaintext = load_encrypted_model(source, app.open_kms(), formats=MODEL_FORMATS)
    else:
        raise FormatError(f"{source}: neither an EML model file nor a Gramine protected file", "check the file name")
    with atomic_output(output, mode=0o600) as out:
        out.write(plaintext)
    err_console.print(f"decrypted {source} -> {output}: {len(plaintext):,} bytes verified", markup=False)
