"""Encrypting and decrypting whole directory trees, file by file, in EML v1.

``encrypt_tree(DIR, OUTDIR)`` mirrors DIR under OUTDIR with ``.eml`` appended to every file
name; ``decrypt_tree`` mirrors back, stripping ``.eml`` and skipping other files. Each file
is a separate container with its own data key, written atomically; a failure names the
file and stops, leaving the files already verified in place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from enclaveml.crypto._envelope import KeyWrapper, decrypt_file, encrypt_file
from enclaveml.crypto._format import DEFAULT_SEGMENT_SIZE
from enclaveml.crypto._stream import Progress
from enclaveml.errors import ConfigError, EnclaveMLError

__all__ = ["SUFFIX", "decrypt_tree", "encrypt_tree", "tree_size"]

SUFFIX = ".eml"


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def tree_size(root: Path) -> int:
    """Total bytes of the regular files under ``root`` (what a progress bar counts)."""
    return sum(path.stat().st_size for path in _files(root))


def _check_roots(source: Path, destination: Path) -> None:
    if not source.is_dir():
        raise ConfigError(f"{source} is not a directory")
    if destination.resolve().is_relative_to(source.resolve()):
        raise ConfigError(
            f"output directory {destination} is inside input directory {source}",
            "choose an output directory outside the input",
        )


def encrypt_tree(
    source: Path,
    destination: Path,
    kms: KeyWrapper,
    key: str,
    *,
    context: Mapping[str, str] | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    progress: Progress | None = None,
) -> list[Path]:
    """Encrypt every regular file under ``source``; returns the files written."""
    _check_roots(source, destination)
    written = []
    for path in _files(source):
        target = destination / path.relative_to(source).with_name(path.name + SUFFIX)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            encrypt_file(path, target, kms, key, context=context, segment_size=segment_size, progress=progress)
        except EnclaveMLError as exc:
            raise exc.about(path) from None
        written.append(target)
    return written


def decrypt_tree(
    source: Path,
    destination: Path,
    kms: KeyWrapper,
    *,
    context: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    """Decrypt every ``*.eml`` file under ``source``; returns the files written."""
    _check_roots(source, destination)
    written = []
    for path in _files(source):
        if path.suffix != SUFFIX:
            continue
        target = destination / path.relative_to(source).with_suffix("")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            decrypt_file(path, target, kms, context=context, progress=progress)
        except EnclaveMLError as exc:
            raise exc.about(path) from None
        written.append(target)
    return written
