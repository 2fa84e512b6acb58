"""The committed known-answer vectors (docs/vectors/) against the spec and the code."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from enclaveml.crypto import decrypt_file
from enclaveml.errors import ContextMismatch, FormatError, IntegrityError

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "docs" / "vectors"
MANIFEST = json.loads((VECTORS / "vectors.json").read_text())


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_eml_vectors", ROOT / "scripts" / "make_eml_vectors.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


GEN = _generator()
EXPECTED_ERROR = {"format": FormatError, "integrity": IntegrityError, "context": ContextMismatch}


def test_committed_vectors_are_exactly_what_the_spec_parameters_produce() -> None:
    files, manifest = GEN.build_vectors()
    assert manifest == MANIFEST["vectors"]
    for name, data in files.items():
        assert (VECTORS / name).read_bytes() == data, name
    assert sorted(p.name for p in VECTORS.glob("*.eml")) == sorted(files)


@pytest.mark.parametrize("vector", MANIFEST["vectors"], ids=lambda v: v["file"])
def test_vector(vector: dict[str, object]) -> None:
    out = io.BytesIO()
    source = VECTORS / str(vector["file"])
    context = vector["context"]
    assert isinstance(context, dict)
    if vector["expect"] == "ok":
        decrypt_file(source, out, GEN.FixedKek(), context=context)
        assert len(out.getvalue()) == vector["plaintext_length"]
        assert hashlib.sha256(out.getvalue()).hexdigest() == vector["plaintext_sha256"]
        return
    error = EXPECTED_ERROR[str(vector["expect"])]
    with pytest.raises(error) as caught:
        decrypt_file(source, out, GEN.FixedKek(), context=context)
    if error is IntegrityError:  # the subclasses are other rules: the exact class must match
        assert type(caught.value) is IntegrityError
    assert GEN.DATA_KEY.hex() not in caught.value.diagnostics()
