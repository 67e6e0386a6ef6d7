"""AccountService rules: backend services keep users, profiles and settings current.

An ntfy server URL is checked against the SSRF rule before it is saved
(`umbra_grpc.destinations`: NTFY_URL_FORBIDDEN), and a new URL sent without a token clears the
stored token, so a token never follows its URL to another host (SPEC 10.4).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable, Mapping
from typing import Any

from umbra_grpc.destinations import Destinations, ForbiddenDestination
from umbra_grpc.domain.errors import HandleTaken, InvalidField, NtfyUrlForbidden, UserNotFound
from umbra_grpc.domain.handles import normalize_handle
from umbra_grpc.domain.ids import check_id
from umbra_grpc.domain.text import clean_text
from umbra_grpc.records import SHAREABLE_FIELDS, Profile, User, UserSettings
from umbra_grpc.storage import audit, users
from umbra_grpc.storage.database import Conn, Database

MAX_TEXT = 500
MAX_PREFERRED_NAME = 100
_TOPIC = re.compile(r"[A-Za-z0-9_\-]{1,64}", re.ASCII)
_BIRTHDAY = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)

# Settings a patch may name, each with the check its value must pass.
SETTINGS_COLUMNS: tuple[str, ...] = (
    "accept_connections",
    "preferred_name",
    *(f"share_{field}" for field in SHAREABLE_FIELDS),
    "ntfy_enabled",
    "ntfy_server_url",
    "ntfy_topic",
    "ntfy_auth_token",
    "ntfy_connections_enabled",
)


@dataclasses.dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for a change, for the audit row: a service name and its address."""

    name: str
    ip: str | None


class Accounts:
    """Creates, reads and updates users and settings; every change is audited."""

    def __init__(
        self, db: Database, on_user_changed: Callable[[int], None], destinations: Destinations
    ) -> None:
        self._db = db
        self._on_user_changed = on_user_changed
        self._destinations = destinations

    async def upsert_user(
        self, *, user_id: int, umbral_name: str, is_active: bool, profile: Profile, actor: Actor
    ) -> User:
        """Creates the user or replaces handle, active flag and profile."""
        check_id(user_id, "user.id")
        handle = normalize_handle(umbral_name)
        columns = _profile_columns(profile)

        async def work(conn: Conn) -> User:
            await users.upsert(
                conn, user_id=user_id, umbral_name=handle, is_active=is_active, profile=columns
            )
            await audit.record(
                conn,
                action="account.user_upserted",
                actor_id=None,
                target_id=user_id,
                detail={"service": actor.name, "is_active": is_active},
                ip=actor.ip,
            )
            await users.announce_change(conn, user_id)
            return await _must_get(conn, user_id)

        user = await self._db.transaction(work, constraint_errors={users.HANDLE_INDEX: HandleTaken})
        self._on_user_changed(user_id)
        return user

    async def get_user(self, user_id: int) -> User:
        """The user with settings, or `UserNotFound`."""
        check_id(user_id, "user_id")
        return await self._db.read(lambda conn: _must_get(conn, user_id))

    async def update_settings(
        self, user_id: int, patch: Mapping[str, Any], actor: Actor
    ) -> UserSettings:
        """Writes the settings columns in `patch` (see SETTINGS_COLUMNS); returns them all."""
        check_id(user_id, "user_id")
        columns = _settings_columns(patch)
        server_url = columns.get("ntfy_server_url")
        if server_url is not None:
            try:
                await self._destinations.check_for_saving(server_url)
            except ForbiddenDestination as error:
                raise NtfyUrlForbidden(f"ntfy.server_url {error}") from None

        async def work(conn: Conn) -> UserSettings:
            if columns and not await users.update_settings(conn, user_id, columns):
                raise UserNotFound
            await audit.record(
                conn,
                action="account.settings_updated",
                actor_id=None,
                target_id=user_id,
                # Names of what changed only: values may be secrets (the ntfy token).
                detail={"service": actor.name, "fields": sorted(columns)},
                ip=actor.ip,
            )
            await users.announce_change(conn, user_id)
            return (await _must_get(conn, user_id)).settings

        settings = await self._db.transaction(work)
        self._on_user_changed(user_id)
        return settings


async def _must_get(conn: Conn, user_id: int) -> User:
    user = await users.get(conn, user_id)
    if user is None:
        raise UserNotFound
    return user


def _profile_columns(profile: Profile) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    for field in SHAREABLE_FIELDS:
        value = _text(getattr(profile, field), f"profile.{field}", MAX_TEXT)
        columns[field] = _birthday(value) if field == "birthday" and value else value
    return columns


def _birthday(value: str) -> dt.date:
    if _BIRTHDAY.fullmatch(value):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise InvalidField("profile.birthday must be a date as YYYY-MM-DD")


def _settings_columns(patch: Mapping[str, Any]) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    for column, value in patch.items():
        if column not in SETTINGS_COLUMNS:
            raise InvalidField(f"unknown settings field {column}")
        if column == "preferred_name":
            # Empty means unset; anything else is shown to other people.
            columns[column] = (
                clean_text(value, "preferred_name", limit=MAX_PREFERRED_NAME) if value else None
            )
        elif column == "ntfy_server_url":
            # Its form and addresses are judged by `Destinations` (NTFY_URL_FORBIDDEN).
            url = _text(value, "ntfy.server_url", MAX_TEXT)
            columns[column] = url.rstrip("/") if url else None
        elif column == "ntfy_topic":
            topic = _text(value, "ntfy.topic", 64)
            if topic is not None and not _TOPIC.fullmatch(topic):
                raise InvalidField("ntfy.topic must be 1-64 characters of A-Z a-z 0-9 _ -")
            columns[column] = topic
        elif column == "ntfy_auth_token":
            columns[column] = _text(value, "ntfy.auth_token", MAX_TEXT)
        else:
            columns[column] = bool(value)
    return columns


def _text(value: str | None, field: str, limit: int) -> str | None:
    """Empty means unset; control characters and overlong values are refused."""
    if not value:
        return None
    if len(value) > limit:
        raise InvalidField(f"{field} is longer than {limit} characters")
    if any(ord(char) < 32 for char in value):
        raise InvalidField(f"{field} contains control characters")
    return value
