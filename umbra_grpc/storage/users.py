"""Users and their settings: the SQL behind AccountService and the caller check."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from umbra_grpc.records import (
    SHAREABLE_FIELDS,
    NtfySettings,
    Profile,
    User,
    UserSettings,
)
from umbra_grpc.storage.database import Conn, Query, Row
from umbra_grpc.storage.notify import USERS_CHANNEL, user_changed_payload
from umbra_grpc.storage.tables import Settings as SettingsTable

HANDLE_INDEX = "uq_users_umbral_name_lower"

_PROFILE = ", ".join(SHAREABLE_FIELDS)
_SETTINGS_COLUMNS = frozenset(
    column.name for column in SettingsTable.__table__.columns if column.name != "user_id"
)

_UPSERT = Query(
    f"""
    WITH saved AS (
        INSERT INTO users (id, umbral_name, is_active, {_PROFILE})
        VALUES (:id, :umbral_name, :is_active, {", ".join(f":{f}" for f in SHAREABLE_FIELDS)})
        ON CONFLICT (id) DO UPDATE
        SET umbral_name = excluded.umbral_name, is_active = excluded.is_active,
            {", ".join(f"{f} = excluded.{f}" for f in SHAREABLE_FIELDS)},
            updated_at = now()
        RETURNING id
    )
    INSERT INTO settings (user_id) SELECT id FROM saved ON CONFLICT (user_id) DO NOTHING
    """
)


async def upsert(
    conn: Conn,
    *,
    user_id: int,
    umbral_name: str,
    is_active: bool,
    profile: Mapping[str, Any],
) -> None:
    """Creates the user (with default settings) or replaces handle, flag and profile."""
    values = {field: profile.get(field) for field in SHAREABLE_FIELDS}
    await conn.execute(_UPSERT, id=user_id, umbral_name=umbral_name, is_active=is_active, **values)


# A token never follows its URL to another host: a new server URL written without a token
# clears the stored one (compared with the old value in the same UPDATE, so no race).
_FORGET_ON_NEW_URL = (
    "ntfy_auth_token = CASE WHEN ntfy_server_url IS DISTINCT FROM :ntfy_server_url"
    " THEN NULL ELSE ntfy_auth_token END"
)


def _update_settings(columns: frozenset[str]) -> Query:
    # Column names come from SETTINGS_COLUMNS (domain.accounts), never from a request, and
    # are checked against the table once more here.
    unknown = columns - _SETTINGS_COLUMNS
    if unknown:
        raise ValueError(f"not settings columns: {sorted(unknown)}")
    assignments = [f"{column} = :{column}" for column in sorted(columns)]
    if "ntfy_server_url" in columns and "ntfy_auth_token" not in columns:
        assignments.append(_FORGET_ON_NEW_URL)
    return Query(
        f"UPDATE settings SET {', '.join(assignments)}, updated_at = now() WHERE user_id = :user_id"
    )


async def update_settings(conn: Conn, user_id: int, columns: Mapping[str, Any]) -> bool:
    """Writes the given settings columns; False when the user does not exist.

    A changed `ntfy_server_url` without `ntfy_auth_token` among the columns clears the token.
    """
    query = _update_settings(frozenset(columns))
    return await conn.execute(query, user_id=user_id, **columns) == 1


_GET = Query(
    f"""
    SELECT u.id, u.umbral_name, u.is_active, {", ".join(f"u.{f}" for f in SHAREABLE_FIELDS)},
           u.created_at, u.updated_at,
           s.accept_connections, s.preferred_name,
           {", ".join(f"s.share_{f}" for f in SHAREABLE_FIELDS)},
           s.ntfy_enabled, s.ntfy_server_url, s.ntfy_topic, s.ntfy_connections_enabled,
           s.ntfy_auth_token IS NOT NULL AS has_auth_token
    FROM users u JOIN settings s ON s.user_id = u.id
    WHERE u.id = :user_id
    """
)


async def get(conn: Conn, user_id: int) -> User | None:
    """The user with their settings (the ntfy token left out), or None."""
    row = await conn.fetchrow(_GET, user_id=user_id)
    return _to_user(row) if row is not None else None


_IS_ACTIVE = Query("SELECT is_active FROM users WHERE id = :user_id")


async def is_active(conn: Conn, user_id: int) -> bool:
    """Whether the user exists and is active."""
    return bool(await conn.fetchval(_IS_ACTIVE, user_id=user_id))


_ANNOUNCE = Query(f"SELECT pg_notify('{USERS_CHANNEL}', :payload)")


async def announce_change(conn: Conn, user_id: int) -> None:
    """Tells every replica (LISTEN umbra_users) to forget what it cached about the user."""
    await conn.execute(_ANNOUNCE, payload=user_changed_payload(user_id))


def _to_user(row: Row) -> User:
    birthday: dt.date | None = row["birthday"]
    return User(
        id=row["id"],
        umbral_name=row["umbral_name"],
        is_active=row["is_active"],
        profile=Profile(
            email=row["email"],
            phone=row["phone"],
            mobile=row["mobile"],
            address=row["address"],
            company=row["company"],
            job_title=row["job_title"],
            birthday=birthday.isoformat() if birthday else None,
        ),
        settings=UserSettings(
            accept_connections=row["accept_connections"],
            preferred_name=row["preferred_name"],
            sharing_defaults={field: row[f"share_{field}"] for field in SHAREABLE_FIELDS},
            ntfy=NtfySettings(
                enabled=row["ntfy_enabled"],
                server_url=row["ntfy_server_url"],
                topic=row["ntfy_topic"],
                connections_enabled=row["ntfy_connections_enabled"],
                has_auth_token=row["has_auth_token"],
            ),
        ),
        create_time=row["created_at"],
        update_time=row["updated_at"],
    )
