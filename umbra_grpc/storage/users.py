"""Users and their settings: the SQL behind AccountService and the caller check."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Row, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from umbra_grpc.domain.models import (
    SHAREABLE_FIELDS,
    NtfySettings,
    Profile,
    User,
    UserSettings,
)
from umbra_grpc.storage.tables import Settings as SettingsTable
from umbra_grpc.storage.tables import User as UserTable
from umbra_grpc.storage.tables import table

USERS_CHANNEL = "umbra_users"
HANDLE_INDEX = "uq_users_umbral_name_lower"

_users = table(UserTable)
_settings = table(SettingsTable)

_user_with_settings = select(
    _users,
    *(c for c in _settings.c if c.name not in ("user_id", "updated_at", "ntfy_auth_token")),
    (_settings.c.ntfy_auth_token.is_not(None)).label("has_auth_token"),
).select_from(_users.join(_settings, _settings.c.user_id == _users.c.id))


async def upsert(
    conn: AsyncConnection,
    *,
    user_id: int,
    umbral_name: str,
    is_active: bool,
    profile: Mapping[str, Any],
) -> None:
    """Creates the user (with default settings) or replaces handle, flag and profile."""
    values = {"id": user_id, "umbral_name": umbral_name, "is_active": is_active, **profile}
    statement = insert(_users).values(values)
    statement = statement.on_conflict_do_update(
        index_elements=[_users.c.id],
        set_={
            **{key: statement.excluded[key] for key in values if key != "id"},
            "updated_at": func.now(),
        },
    )
    await conn.execute(statement)
    await conn.execute(
        insert(_settings).values(user_id=user_id).on_conflict_do_nothing(index_elements=["user_id"])
    )


async def update_settings(conn: AsyncConnection, user_id: int, columns: Mapping[str, Any]) -> bool:
    """Writes the given settings columns; False when the user does not exist."""
    result = await conn.execute(
        update(_settings)
        .where(_settings.c.user_id == user_id)
        .values(**columns, updated_at=func.now())
        .returning(_settings.c.user_id)
    )
    return result.first() is not None


async def get(conn: AsyncConnection, user_id: int) -> User | None:
    """The user with their settings (the ntfy token left out), or None."""
    row = (await conn.execute(_user_with_settings.where(_users.c.id == user_id))).first()
    return _to_user(row) if row is not None else None


async def is_active(conn: AsyncConnection, user_id: int) -> bool:
    """Whether the user exists and is active."""
    result = await conn.execute(select(_users.c.is_active).where(_users.c.id == user_id))
    return bool(result.scalar())


async def announce_change(conn: AsyncConnection, user_id: int) -> None:
    """Tells every replica (LISTEN umbra_users) to forget what it cached about the user."""
    await conn.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": USERS_CHANNEL, "payload": str(user_id)},
    )


def _to_user(row: Row[Any]) -> User:
    birthday: dt.date | None = row.birthday
    return User(
        id=row.id,
        umbral_name=row.umbral_name,
        is_active=row.is_active,
        profile=Profile(
            email=row.email,
            phone=row.phone,
            mobile=row.mobile,
            address=row.address,
            company=row.company,
            job_title=row.job_title,
            birthday=birthday.isoformat() if birthday else None,
        ),
        settings=UserSettings(
            accept_connections=row.accept_connections,
            preferred_name=row.preferred_name,
            sharing_defaults={field: getattr(row, f"share_{field}") for field in SHAREABLE_FIELDS},
            ntfy=NtfySettings(
                enabled=row.ntfy_enabled,
                server_url=row.ntfy_server_url,
                topic=row.ntfy_topic,
                connections_enabled=row.ntfy_connections_enabled,
                has_auth_token=row.has_auth_token,
            ),
        ),
        create_time=row.created_at,
        update_time=row.updated_at,
    )
