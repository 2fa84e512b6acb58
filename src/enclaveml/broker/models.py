"""The broker's tables (SQLAlchemy 2 typed ORM) and the records the store hands out.

The schema is created and changed only by the Alembic migrations in ``migrations/``; a
test holds the migrated schema equal to these models. ``docs/broker-store.md`` describes
every table. Timestamps are timezone-aware UTC in Python, ``timestamptz`` on PostgreSQL and
naive UTC text on SQLite (:class:`UtcDateTime`), so comparisons work the same on both.

Nothing here holds key material in the clear: ``key_versions.sealed_material`` and
``apps.sealed_signing_key`` are sealed by the root key (``root_key.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "App",
    "AppRow",
    "AuditRow",
    "Base",
    "EnrolledApp",
    "IssuedNonce",
    "KeyRow",
    "KeyVersionRow",
    "MetaRow",
    "NonceRow",
    "PolicyKeyRow",
    "PolicyRecord",
    "PolicyRow",
    "Role",
    "UtcDateTime",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Role(enum.StrEnum):
    ADMIN = "admin"
    OWNER = "owner"
    WORKLOAD = "workload"


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; naive values are refused (they hide bugs)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the broker store takes timezone-aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MetaRow(Base):
    """Store-wide settings: ``root_check`` (always), ``root_kdf`` (passphrase stores)."""

    __tablename__ = "broker_meta"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class AppRow(Base):
    __tablename__ = "apps"
    __table_args__ = (CheckConstraint("role IN ('admin', 'owner', 'workload')", name="role"),)

    app_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    api_key_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    sealed_signing_key: Mapped[bytes] = mapped_column(LargeBinary(64))
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)


class KeyRow(Base):
    __tablename__ = "keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    versions: Mapped[list[KeyVersionRow]] = relationship(
        back_populates="key", order_by="KeyVersionRow.version", lazy="selectin"
    )


class KeyVersionRow(Base):
    __tablename__ = "key_versions"
    __table_args__ = (CheckConstraint("state IN ('enabled', 'destroyed')", name="state"),)

    key_id: Mapped[str] = mapped_column(ForeignKey("keys.key_id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    state: Mapped[str] = mapped_column(String(16))
    sealed_material: Mapped[bytes | None] = mapped_column(LargeBinary(64))
    key: Mapped[KeyRow] = relationship(back_populates="versions")


class PolicyRow(Base):
    __tablename__ = "policies"

    policy_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    document: Mapped[str] = mapped_column(Text)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class PolicyKeyRow(Base):
    """Which policy may receive which key."""

    __tablename__ = "policy_keys"

    policy_id: Mapped[str] = mapped_column(ForeignKey("policies.policy_id"), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("keys.key_id"), primary_key=True, index=True)


class NonceRow(Base):
    """Attestation nonces (issued, consumed once) and request nonces (remembered against replay)."""

    __tablename__ = "nonces"

    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(128), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    used: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditRow(Base):
    """One hash-chained audit entry (``audit.py`` has the formula)."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    event: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(128))
    subject: Mapped[str] = mapped_column(String(256))
    detail: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    seal: Mapped[str] = mapped_column(String(64))


# -- records handed out by the store (never hold key material) ----------------------------


@dataclass(frozen=True)
class App:
    app_id: str
    name: str
    role: Role
    created: datetime
    disabled: bool


@dataclass(frozen=True)
class EnrolledApp:
    """The answer to an enrollment: the api key exists only here, shown once."""

    app: App
    api_key: bytes

    def __repr__(self) -> str:
        return f"EnrolledApp(app={self.app!r}, api_key=<secret>)"


@dataclass(frozen=True)
class PolicyRecord:
    policy_id: str
    name: str
    document: str  # the policy's TOML text, as registered
    revoked: bool
    created: datetime
    key_ids: tuple[str, ...]


@dataclass(frozen=True)
class IssuedNonce:
    value: str
    purpose: str
    expires_at: datetime
