"""Initial broker schema: apps, keys, policies, nonces, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "broker_meta",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_broker_meta"),
    )
    op.create_table(
        "apps",
        sa.Column("app_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("api_key_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("sealed_signing_key", sa.LargeBinary(64), nullable=False),
        sa.Column("created", _TIME, nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.CheckConstraint("role IN ('admin', 'owner', 'workload')", name="ck_apps_role"),
        sa.PrimaryKeyConstraint("app_id", name="pk_apps"),
        sa.UniqueConstraint("name", name="uq_apps_name"),
    )
    op.create_table(
        "keys",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("key_id", name="pk_keys"),
        sa.UniqueConstraint("name", name="uq_keys_name"),
    )
    op.create_table(
        "key_versions",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("created", _TIME, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("sealed_material", sa.LargeBinary(64), nullable=True),
        sa.CheckConstraint("state IN ('enabled', 'destroyed')", name="ck_key_versions_state"),
        sa.ForeignKeyConstraint(["key_id"], ["keys.key_id"], name="fk_key_versions_key_id_keys"),
        sa.PrimaryKeyConstraint("key_id", "version", name="pk_key_versions"),
    )
    op.create_table(
        "policies",
        sa.Column("policy_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("created", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("policy_id", name="pk_policies"),
    )
    op.create_table(
        "policy_keys",
        sa.Column("policy_id", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.ForeignKeyConstraint(["policy_id"], ["policies.policy_id"], name="fk_policy_keys_policy_id_policies"),
        sa.ForeignKeyConstraint(["key_id"], ["keys.key_id"], name="fk_policy_keys_key_id_keys"),
        sa.PrimaryKeyConstraint("policy_id", "key_id", name="pk_policy_keys"),
    )
    op.create_index("ix_policy_keys_key_id", "policy_keys", ["key_id"])
    op.create_table(
        "nonces",
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("used", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("purpose", "value", name="pk_nonces"),
    )
    op.create_index("ix_nonces_expires_at", "nonces", ["expires_at"])
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("seal", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_log"),
    )


def downgrade() -> None:
    for table in ("audit_log", "nonces", "policy_keys", "policies", "key_versions", "keys", "apps", "broker_meta"):
        op.drop_table(table)
