"""A throwaway PostgreSQL server for the broker tests: initdb, pg_ctl start, one database per test.

``initdb`` refuses to run as root, so as root every server command runs as ``nobody``
(``runuser``, or ``setpriv`` where runuser is missing) in a temporary directory owned by
that user. The server listens on 127.0.0.1 at a free port (and a unix socket in the
temporary directory), trusts every local connection, and skips fsync: it only has to
survive a killed *client*, which it does regardless.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

SUPERUSER = "postgres"


def find_pg_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres (PostgreSQL 15 preferred), or None."""
    candidates = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for directory in candidates:
        if all((directory / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _as_unprivileged(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--", *command]
    user = pwd.getpwnam("nobody")
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *command]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    bin_dir: Path
    base: Path
    port: int = 0

    @property
    def data(self) -> Path:
        return self.base / "data"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            _as_unprivileged([str(self.bin_dir / args[0]), *args[1:]]),
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            log = (self.base / "server.log").read_text() if (self.base / "server.log").exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}{log}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8")
        for _attempt in range(3):  # another process may take the free port first
            self.port = _free_port()
            options = (
                f"-p {self.port} -h 127.0.0.1 -k {self.base} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=300"
            )
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-w", "-t", "30",
                          "-o", options, "start")  # fmt: skip
                return
            except RuntimeError:
                continue
        raise RuntimeError("PostgreSQL did not start; see " + str(self.base / "server.log"))

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True)

    def create_database(self) -> str:
        name = "broker_" + secrets.token_hex(6)
        with self._admin() as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        with self._admin() as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def start_postgres(bin_dir: Path) -> PostgresServer:
    base = Path(tempfile.mkdtemp(prefix="enclaveml-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        os.chown(base, user.pw_uid, user.pw_gid)
    server = PostgresServer(bin_dir, base)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return server
