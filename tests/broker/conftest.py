"""Broker store fixtures: every store test runs against SQLite and a real PostgreSQL server.

``store_url`` is parametrised ``sqlite`` / ``postgresql``; the PostgreSQL server is started
once per test session (per xdist worker) by ``pg_server.py``, with a fresh database per test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_testdata import ROOT_KEY
from pg_server import PostgresServer, find_pg_bin, start_postgres

from enclaveml.broker.store import BrokerStore


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; install postgresql-15")
    server = start_postgres(bin_dir)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    database = server.create_database()
    yield server.url(database)
    server.drop_database(database)


@pytest.fixture
def store(store_url: str) -> Iterator[BrokerStore]:
    with BrokerStore(store_url, ROOT_KEY) as opened:
        yield opened
