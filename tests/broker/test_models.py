"""The migrated schema is exactly the models, on SQLite and PostgreSQL, and engines are set up safely."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from broker_testdata import ROOT_KEY
from sqlalchemy import text

from enclaveml.broker._database import create_broker_engine
from enclaveml.broker.migrations import current_revision, head_revision, upgrade_to_head
from enclaveml.broker.models import Base
from enclaveml.broker.store import BrokerStore
from enclaveml.errors import ConfigError, KeyServiceError


def test_the_migrations_build_exactly_the_models(store: BrokerStore) -> None:
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    assert current_revision(store.engine) == head_revision()


def test_upgrading_twice_changes_nothing(store: BrokerStore) -> None:
    store.create_key("customers")
    upgrade_to_head(store.engine)
    assert [k.name for k in store.list_keys()] == ["customers"]


def test_the_sqlite_store_uses_wal_foreign_keys_full_sync_and_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "broker.db"
    with BrokerStore(f"sqlite:///{path}", ROOT_KEY) as store, store.engine.connect() as connection:
        pragmas = {p: connection.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "foreign_keys")}
        assert pragmas == {"journal_mode": "wal", "foreign_keys": 1}
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_foreign_keys_are_enforced(store: BrokerStore) -> None:
    with pytest.raises(Exception, match=r"(?i)foreign key"), store.engine.begin() as connection:
        connection.execute(text("INSERT INTO policy_keys (policy_id, key_id) VALUES ('p-none', 'k-none')"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("mysql://localhost/broker", "unsupported broker database"),
        ("postgresql+asyncpg://localhost/broker", "unsupported PostgreSQL driver"),
        ("not a url", "not a database URL"),
    ],
)
def test_unsupported_databases_are_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_broker_engine(url)


def test_postgres_urls_use_psycopg_and_hide_the_password() -> None:
    engine = create_broker_engine("postgres://broker:s3cret@db.internal:5432/broker")
    assert engine.url.drivername == "postgresql+psycopg"
    assert "s3cret" not in repr(engine)
    engine.dispose()


def test_an_unreachable_database_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyServiceError, match=r"cannot open broker store postgresql://broker:\*\*\*@.*refused"):
        BrokerStore("postgresql://broker:s3cret@127.0.0.1:1/broker", ROOT_KEY)
    (tmp_path / "a-directory.db").mkdir()
    with pytest.raises(KeyServiceError, match=r"cannot open broker store sqlite:.*unable to open"):
        BrokerStore(f"sqlite:///{tmp_path / 'a-directory.db'}", ROOT_KEY)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="cannot create broker store"):
        BrokerStore(f"sqlite:///{tmp_path / 'a-file' / 'broker.db'}", ROOT_KEY)
