"""Atomic file output: write to a temporary file beside the target, fsync, then rename.

Used wherever a half-written file would be harmful: decrypted output (no unauthenticated
plaintext may be left behind when verification fails) and the key store (a crash must
never lose a key). The temporary file is created with mode 0600 and removed on any error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, mode: int = 0o600, durable: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block exits without error.

    ``durable=True`` also fsyncs the file and its directory, so the new content survives a
    crash (the key store needs this; decrypted output only needs all-or-nothing).
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            if durable:
                os.fsync(out.fileno())
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
