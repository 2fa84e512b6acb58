"""Run inside the TensorFlow venv (.venv/tfclient) by test_runtime_tf.py: a SavedModel sealed, served, attacked.

Usage: ``python tf_savedmodel_check.py SPEC.json``; SPEC holds ``work`` (an empty directory)
and ``rows`` (float32 [n, 4]). It builds a SavedModel with TensorFlow (``scores = x @ W + b``,
``label = argmax``, and an assertion whose failure prints ``x``), seals it with a local KMS
(``publish_savedmodel``) and as a Gramine protected file, serves both through
``ModelRepository`` with ``TfSavedModel``, predicts, and compares with TensorFlow's own
answer. It also serves a tampered file and an authenticated archive that tries to leave its
directory, and prints one JSON line with what it saw; the test asserts on it. The
SavedModel directory stays in ``work/saved`` for the test's own checks in the main venv.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import numpy as np

# enclaveml first: none of it may import TensorFlow until a SavedModel is loaded.
from enclaveml.analytics.ml import SAVEDMODEL_FORMAT, ModelMetadata, read_model_metadata
from enclaveml.crypto import encrypt_bytes
from enclaveml.crypto.gramine_pf import encrypt_pf, new_wrap_key_file
from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.serving.errors import InvalidRequest
from enclaveml.serving.keys import LocalKeys
from enclaveml.serving.repository import ModelRepository, pf_bound_path, publish_savedmodel
from enclaveml.serving.runtime_tf import pack_savedmodel

TF_IMPORTED_BY_ENCLAVEML = "tensorflow" in sys.modules

import tensorflow as tf  # noqa: E402  (after the check above, on purpose)

KEY = "models"


class Linear(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable(tf.random.stateless_normal([4, 3], seed=[7, 1]))
        self.b = tf.Variable([0.5, -0.25, 1.0])

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        tf.debugging.assert_less(x, 1e6, message="inputs are standardised")  # its failure prints x
        scores = tf.matmul(x, self.w) + self.b
        return {"scores": scores, "label": tf.argmax(scores, axis=1)}


def evil_archive(good: bytes) -> bytes:
    """The good archive plus one member named ``../escape``: sealed with the right key, still refused."""
    out = BytesIO()
    with tarfile.open(fileobj=BytesIO(good)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        escape = tarfile.TarInfo("variables/../../escape")
        escape.size = 4
        dst.addfile(escape, BytesIO(b"boom"))
    return out.getvalue()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    work = Path(spec["work"])
    rows = np.asarray(spec["rows"], dtype=np.float32)

    module = Linear()
    saved = work / "saved"
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    direct = tf.saved_model.load(str(saved)).signatures["serving_default"](x=tf.constant(rows))

    kms = LocalKms.init(work / "keystore.json", "tf check passphrase", kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    kms.create_key(KEY)
    new_wrap_key_file(work / "wrap.key")
    models = work / "models"
    sealed = publish_savedmodel(models / "linear", 1, saved, kms, KEY)
    tampered = publish_savedmodel(models / "tampered", 1, saved, kms, KEY)
    data = bytearray(tampered.read_bytes())
    data[-100] ^= 0x01
    tampered.write_bytes(bytes(data))
    (models / "evil" / "1").mkdir(parents=True)
    header = ModelMetadata("evil", 1, (), (), SAVEDMODEL_FORMAT).to_context()
    archive = pack_savedmodel(saved)
    evil = encrypt_bytes(evil_archive(archive), kms, KEY, context=header)
    (models / "evil" / "1" / "model.savedmodel.eml").write_bytes(evil)
    (models / "pf" / "1").mkdir(parents=True)
    wrap_key = (work / "wrap.key").read_bytes()
    bound = pf_bound_path(models / "pf", 1, "model.savedmodel.pf")
    (models / "pf" / "1" / "model.savedmodel.pf").write_bytes(encrypt_pf(archive, wrap_key, bound))

    roots = {name: models / name for name in ("linear", "tampered", "evil", "pf")}
    temp_before = sorted(os.listdir(tempfile.gettempdir()))
    repo = ModelRepository(roots, LocalKeys(kms, pf_wrap_key_file=work / "wrap.key"))
    repo.load_all()
    temp_after = sorted(os.listdir(tempfile.gettempdir()))
    served = repo.get("linear")
    answer = served.runtime.run({"x": rows})
    try:
        served.runtime.run({"x": rows.astype(np.float64)})
        refused = ""
    except InvalidRequest as exc:
        refused = exc.diagnostics()
    try:
        served.runtime.run({"x": np.full_like(rows, 12345678.0)})
        assertion = ""
    except InvalidRequest as exc:
        assertion = exc.diagnostics()
    pf_answer = repo.get("pf").runtime.run({"x": rows}, ["scores"])
    ram_while_served = tf.io.gfile.glob("ram://enclaveml-savedmodel-*")
    ram_files = {path: sorted(tf.io.gfile.listdir(path)) for path in ram_while_served}
    report = {
        "tf_imported_by_enclaveml": TF_IMPORTED_BY_ENCLAVEML,
        "tf_version": tf.__version__,
        "header": {
            "format": read_model_metadata(sealed).format,
            "inputs": [[t.name, t.type, list(t.shape)] for t in read_model_metadata(sealed).inputs],
            "outputs": [[t.name, t.type, list(t.shape)] for t in read_model_metadata(sealed).outputs],
        },
        "ready": repo.ready(),
        "not_ready": repo.not_ready_reasons(),
        "model_format": served.model_format,
        "pf": [repo.get("pf").source_format, repo.get("pf").model_format],
        "inputs": [[t.name, str(t.dtype), list(t.shape)] for t in served.runtime.inputs],
        "outputs": [[t.name, str(t.dtype), list(t.shape)] for t in served.runtime.outputs],
        "scores_diff": float(np.max(np.abs(answer["scores"] - direct["scores"].numpy()))),
        "labels_equal": bool(np.array_equal(answer["label"], direct["label"].numpy())),
        "label_dtype": str(answer["label"].dtype),
        "pf_scores_diff": float(np.max(np.abs(pf_answer["scores"] - direct["scores"].numpy()))),
        "refused": refused,
        "assertion": assertion,
        "load_seconds": served.load_seconds,
        "temp_files_written": sorted(set(temp_after) - set(temp_before)),
        "ram_files_while_served": sorted(name for names in ram_files.values() for name in names),
        "ram_dirs_while_served": len(ram_while_served),
        "repr": repr(served.runtime),
    }
    repo.close()
    del served, answer, pf_answer
    gc.collect()  # the runtimes' finalizers delete what is left of their ram:// files
    report["ram_dirs_after_close"] = len(tf.io.gfile.glob("ram://enclaveml-savedmodel-*"))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
