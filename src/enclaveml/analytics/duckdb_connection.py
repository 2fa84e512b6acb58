"""A DuckDB connection that cannot leak plaintext to disk by spilling.

DuckDB writes intermediate data to ``temp_directory`` when a query outgrows memory. Its own
``temp_file_encryption`` setting only applies to encrypted database files (``ATTACH ...
(ENCRYPTION_KEY ...)``), not to the in-memory database a ``TrustedContext`` uses, so we
cannot make spilled blocks encrypted. Instead:

* ``temp_directory`` is a fresh private directory (mode 0700) that the context removes on
  close, so even DuckDB's bookkeeping files are invisible to other users;
* ``max_temp_directory_size = '0B'`` turns spilling off: a query that does not fit in
  ``memory_limit`` fails with DuckDB's out-of-memory error instead of writing plaintext;
* extensions are never downloaded (``autoinstall_known_extensions = false``, no community or
  unsigned extensions); the Parquet bridge loads ``httpfs`` from its signed wheel when a
  DuckDB-flavour file is read (``LOAD`` still works once the configuration is locked);
* ``lock_configuration = true`` after setup: the job's own SQL cannot turn spilling back on.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb

__all__ = ["HARDENED_SETTINGS", "connect_hardened", "private_temp_directory"]

#: Settings applied to every connection (besides ``temp_directory``), in the order set.
HARDENED_SETTINGS: dict[str, str | bool] = {
    "max_temp_directory_size": "0B",
    "autoinstall_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
}


def private_temp_directory(parent: str | os.PathLike[str] | None = None) -> Path:
    """A new directory only this user can enter (``mkdtemp`` creates it 0700)."""
    return Path(tempfile.mkdtemp(prefix="enclaveml-duckdb-", dir=parent))


def connect_hardened(
    temp_directory: Path, *, memory_limit: str | None = None, threads: int | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the settings in the module docstring, locked."""
    import duckdb

    config: dict[str, str | bool | int | float | list[str]] = {
        "temp_directory": str(temp_directory),
        **HARDENED_SETTINGS,
    }
    if memory_limit is not None:
        config["memory_limit"] = memory_limit
    if threads is not None:
        config["threads"] = threads
    con = duckdb.connect(":memory:", config=config)
    con.execute("SET lock_configuration = true")
    return con
