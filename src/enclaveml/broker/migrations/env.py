"""Alembic environment: always online, on the connection ``upgrade_to_head`` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from enclaveml.broker.models import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run broker migrations through enclaveml.broker.migrations.upgrade_to_head(engine)")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
