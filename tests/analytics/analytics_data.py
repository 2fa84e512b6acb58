"""Helpers for the analytics tests; import as ``from analytics_data import ...``."""

from __future__ import annotations

from pathlib import Path

PEOPLE_ROWS = 20_000
# Strings every plaintext copy of people.csv (or of an answer about it) contains.
PLAINTEXT_MARKERS = (b"salary", b"Accountant", b"Developer")


def assert_no_plaintext(*directories: Path) -> None:
    """No file under ``directories`` holds a recognisable piece of people.csv in the clear."""
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                leaked = [m.decode() for m in PLAINTEXT_MARKERS if m in data]
                assert not leaked, f"{path} holds plaintext ({leaked})"
