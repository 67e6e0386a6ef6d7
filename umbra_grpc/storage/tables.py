"""The schema: SQLAlchemy 2 models of every table, and what the database itself enforces.

These models describe the tables for Alembic (`alembic check` compares them with the database).
The repositories do not go through SQLAlchemy: they send their SQL with asyncpg (see
`storage.database`), so these models are the schema's one description, not a query layer.

Invariants held by PostgreSQL, not by Python (SPEC 2):
- I1: `uq_connection_requests_pending_pair`, a unique index on the *unordered* pair of a
  pending request (least/greatest of the two ids), so A->B and B->A cannot both be pending.
- I2: `uq_user_connections_pair` makes directed rows unique, and the deferred foreign key
  `fk_user_connections_reverse` makes every row A->B need its mirror B->A at commit.
- I4: `ck_connection_requests_resolved_at`: a request leaves pending exactly when resolved_at
  is set; resolving is a conditional UPDATE on status = 'pending'.
- Blocks (SPEC 11): a blocked pair never holds a pending request or a connection. Triggers
  of migration 0004 (`umbra_guard_pair`) take a lock on the unordered pair whenever a block,
  a pending request or a connection row is inserted, and then look, in a snapshot taken
  after the lock, for what the other two kinds would clash with: a clash raises a
  serialization failure, and the unit of work runs the whole RPC again.
- handles are stored lower-cased (`ck_users_umbral_name_format`) and unique case-insensitively
  (`uq_users_umbral_name_lower`).
Every timestamp is `timestamptz`, written by the database clock.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import INET, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

REQUEST_STATUSES = ("pending", "accepted", "rejected", "cancelled", "expired")
MAX_REQUEST_MESSAGE = 280
OUTBOX_STATUSES = ("pending", "sent", "skipped", "failed")
SHAREABLE_FIELDS = ("email", "phone", "mobile", "address", "company", "job_title", "birthday")


def _created() -> Mapped[dt.datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def _user_fk(*, nullable: bool = False) -> Mapped[Any]:
    return mapped_column(BigInteger, ForeignKey("users.id"), nullable=nullable)


class Base(DeclarativeBase):
    """Declarative base with constraint names Alembic and the error mapping can rely on."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """A person known to the service; the id is the backend's."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint(r"umbral_name ~ '^[a-z0-9_.\-]{3,50}$'", name="umbral_name_format"),
        Index("uq_users_umbral_name_lower", func.lower(text("umbral_name")), unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    umbral_name: Mapped[str] = mapped_column(Text, nullable=False)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    email: Mapped[str | None] = mapped_column(Text)
    phone: Mapped[str | None] = mapped_column(Text)
    mobile: Mapped[str | None] = mapped_column(Text)
    address: Mapped[str | None] = mapped_column(Text)
    company: Mapped[str | None] = mapped_column(Text)
    job_title: Mapped[str | None] = mapped_column(Text)
    birthday: Mapped[dt.date | None] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _created()


class Settings(Base):
    """One row per user, created with the user."""

    __tablename__ = "settings"

    user_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    accept_connections: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    preferred_name: Mapped[str | None] = mapped_column(Text)
    share_email: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    share_phone: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    share_mobile: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    share_address: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    share_company: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    share_job_title: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    share_birthday: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    ntfy_enabled: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    ntfy_server_url: Mapped[str | None] = mapped_column(Text)
    ntfy_topic: Mapped[str | None] = mapped_column(Text)
    ntfy_auth_token: Mapped[str | None] = mapped_column(Text)
    ntfy_connections_enabled: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("true")
    )
    updated_at: Mapped[dt.datetime] = _created()


class ConnectionRequest(Base):
    """A request from sender to receiver; resolved at most once."""

    __tablename__ = "connection_requests"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'accepted', 'rejected', 'cancelled', 'expired')", name="status"
        ),
        CheckConstraint("sender_id <> receiver_id", name="not_self"),
        CheckConstraint(f"char_length(message) <= {MAX_REQUEST_MESSAGE}", name="message_length"),
        CheckConstraint("(status = 'pending') = (resolved_at IS NULL)", name="resolved_at"),
        Index(
            "uq_connection_requests_pending_pair",
            func.least(text("sender_id"), text("receiver_id")),
            func.greatest(text("sender_id"), text("receiver_id")),
            unique=True,
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_connection_requests_incoming",
            "receiver_id",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_connection_requests_outgoing",
            "sender_id",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text("status = 'pending'"),
        ),
        # I3 counts a receiver's pending and cancelled requests within the window.
        Index(
            "ix_connection_requests_recent",
            "receiver_id",
            "created_at",
            postgresql_where=text("status IN ('pending', 'cancelled')"),
        ),
        # The resend cooldown: this sender's latest cancel to this receiver.
        Index(
            "ix_connection_requests_cancelled",
            "sender_id",
            "receiver_id",
            "resolved_at",
            postgresql_where=text("status = 'cancelled'"),
        ),
        # Retention: resolved requests, oldest first.
        Index(
            "ix_connection_requests_resolved",
            "resolved_at",
            postgresql_where=text("status <> 'pending'"),
        ),
        # The expiry sweeper: pending requests, oldest first.
        Index(
            "ix_connection_requests_pending_age",
            "created_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    sender_id: Mapped[int] = _user_fk()
    receiver_id: Mapped[int] = _user_fk()
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'pending'"))
    created_at: Mapped[dt.datetime] = _created()
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The sender's note: shown to the receiver only.
    message: Mapped[str | None] = mapped_column(Text)
    # Cancelled because its receiver blocked its sender: to the sender it must look like a
    # silent reject, so it neither starts the resend cooldown nor counts toward the cap.
    cancelled_by_receiver: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )


class UserBlock(Base):
    """`blocker_id` blocks `blocked_id`; no pending request or connection may join them."""

    __tablename__ = "user_blocks"
    __table_args__ = (
        UniqueConstraint("blocker_id", "blocked_id", name="uq_user_blocks_pair"),
        CheckConstraint("blocker_id <> blocked_id", name="not_self"),
        Index("ix_user_blocks_listing", "blocker_id", text("created_at DESC"), text("id DESC")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    blocker_id: Mapped[int] = _user_fk()
    blocked_id: Mapped[int] = _user_fk()
    created_at: Mapped[dt.datetime] = _created()


class IdempotencyKey(Base):
    """The outcome of a write RPC called with an `idempotency-key` header (SPEC 11).

    Keyed by the caller (the token's `sub`), the method and the key. `fingerprint` is the
    SHA-256 of the request, `ok` says whether `outcome` is the serialized response or a
    serialized `google.rpc.Status`. Written in the transaction of the write it records;
    honoured for 24 hours, then pruned by the retention job.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    caller: Mapped[str] = mapped_column(Text, primary_key=True)
    method: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    ok: Mapped[bool] = mapped_column(Boolean, nullable=False)
    outcome: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[dt.datetime] = _created()


class Person(Base):
    """A contact card owned by a user; linked to the other user while they are connected."""

    __tablename__ = "persons"
    __table_args__ = (Index("ix_persons_owner_user_id", "owner_user_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    owner_user_id: Mapped[int] = _user_fk()
    linked_user_id: Mapped[int | None] = _user_fk(nullable=True)
    is_umbral_contact: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )
    display_name: Mapped[str] = mapped_column(Text, nullable=False)
    email: Mapped[str | None] = mapped_column(Text)
    phone: Mapped[str | None] = mapped_column(Text)
    mobile: Mapped[str | None] = mapped_column(Text)
    address: Mapped[str | None] = mapped_column(Text)
    company: Mapped[str | None] = mapped_column(Text)
    job_title: Mapped[str | None] = mapped_column(Text)
    birthday: Mapped[dt.date | None] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = _created()
    updated_at: Mapped[dt.datetime] = _created()


class UserConnection(Base):
    """One direction of a connection; its mirror row must exist (I2)."""

    __tablename__ = "user_connections"
    __table_args__ = (
        UniqueConstraint("user_id", "connected_user_id", name="uq_user_connections_pair"),
        CheckConstraint("user_id <> connected_user_id", name="not_self"),
        ForeignKeyConstraint(
            ["connected_user_id", "user_id"],
            ["user_connections.user_id", "user_connections.connected_user_id"],
            name="fk_user_connections_reverse",
            deferrable=True,
            initially="DEFERRED",
        ),
        Index("ix_user_connections_listing", "user_id", text("created_at DESC"), text("id DESC")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int] = _user_fk()
    connected_user_id: Mapped[int] = _user_fk()
    person_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("persons.id"), nullable=False)
    sharing_overrides: Mapped[dict[str, bool] | None] = mapped_column(JSONB)
    created_at: Mapped[dt.datetime] = _created()


class Notification(Base):
    """An in-app notification for one user."""

    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_listing", "user_id", text("created_at DESC"), text("id DESC")),
        Index(
            "ix_notifications_unread",
            "user_id",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text("NOT read"),
        ),
        # A request's notification, withdrawn when the request is cancelled.
        Index(
            "ix_notifications_request",
            "source_id",
            postgresql_where=text("source_type = 'connection_request'"),
        ),
        # Retention: read notifications, oldest first.
        Index("ix_notifications_read", "created_at", postgresql_where=text("read")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int] = _user_fk()
    type: Mapped[str] = mapped_column(Text, nullable=False)
    title: Mapped[str] = mapped_column(Text, nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    data: Mapped[dict[str, str]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    source_type: Mapped[str | None] = mapped_column(Text)
    source_id: Mapped[int | None] = mapped_column(BigInteger)
    read: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    created_at: Mapped[dt.datetime] = _created()


class AuditLog(Base):
    """One row per successful mutation, written in the mutation's transaction (I5)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_actor", "actor_id", "created_at"),
        Index("ix_audit_log_created_at", "created_at"),  # retention, oldest first
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    action: Mapped[str] = mapped_column(Text, nullable=False)
    actor_id: Mapped[int | None] = mapped_column(BigInteger)
    target_id: Mapped[int | None] = mapped_column(BigInteger)
    detail: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    ip: Mapped[str | None] = mapped_column(INET)
    created_at: Mapped[dt.datetime] = _created()


class Outbox(Base):
    """A push notification waiting to be delivered (SPEC 6); never holds the ntfy token.

    `request_id` names the request a push is about, so that cancelling the request can skip
    its push while it is unsent. It is a plain reference, not a foreign key: retention
    deletes requests and pushes on their own schedules, and a foreign key would make every
    deleted request probe the outbox.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'sent', 'skipped', 'failed')", name="status"),
        Index("ix_outbox_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
        Index("ix_outbox_request", "request_id", postgresql_where=text("status = 'pending'")),
        # Retention: completed rows by outcome, oldest first.
        Index(
            "ix_outbox_completed",
            "status",
            "completed_at",
            postgresql_where=text("status IN ('sent', 'skipped', 'failed')"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    user_id: Mapped[int] = _user_fk()
    request_id: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    display_name: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    next_attempt_at: Mapped[dt.datetime] = _created()
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = _created()
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The writing RPC's W3C traceparent while tracing, from the transaction's setting
    # (migration 0005, `Database.tag_transactions`); NULL otherwise.
    traceparent: Mapped[str | None] = mapped_column(
        Text,
        # As PostgreSQL prints it back, so `alembic check` compares the text as is.
        server_default=text("NULLIF(current_setting('umbra.traceparent'::text, true), ''::text)"),
    )
