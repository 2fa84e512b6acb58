"""Documented examples must work: every policy shown in the docs loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from enclaveml.attestation.policy import Policy

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = [
    (path.name, block)
    for path in sorted([DOCS / "attestation.md", *(DOCS / "attestation").glob("*.md")])
    for block in re.findall(r"```toml\n(.*?)```", path.read_text(), re.S)
]


@pytest.mark.parametrize(("doc", "block"), BLOCKS, ids=[f"{d}-{i}" for i, (d, _) in enumerate(BLOCKS)])
def test_documented_policy_loads(doc: str, block: str) -> None:
    assert Policy.from_text(block).name
