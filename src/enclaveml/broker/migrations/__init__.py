"""The broker schema's Alembic migrations, run from this package (no ``alembic.ini``).

``upgrade_to_head(engine)`` brings a database to the newest schema. It is idempotent and
safe when several broker processes start at once: the whole upgrade runs in one
transaction that first takes the store's write lock (SQLite ``BEGIN IMMEDIATE``,
PostgreSQL ``pg_advisory_xact_lock``), and both databases have transactional DDL.

A schema change is a new script ``versions/vNNNN_<what>.py`` (``script.py.mako`` is the
template) whose ``down_revision`` names the previous one; ``tests/broker/test_models.py``
fails until the migrated schema equals ``models.py`` again.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine, text

from enclaveml.broker._database import WRITE_OPTION
from enclaveml.errors import ConfigError

__all__ = ["current_revision", "head_revision", "upgrade_to_head"]

_HERE = Path(__file__).resolve().parent
_MIGRATION_LOCK_ID = 0x656E636D_6D696772  # "encm" "migr": any constant distinct from the audit lock


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Apply every migration the database lacks, in one locked transaction."""
    config = _config()
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, "head")
        except CommandError as exc:
            raise ConfigError(
                f"cannot migrate the broker store: {exc}",
                "the store was written by a newer enclaveml; upgrade enclaveml",
            ) from None
