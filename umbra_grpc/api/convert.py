"""Pure protobuf <-> domain conversions (no I/O, no rules beyond field mapping)."""

from __future__ import annotations

from typing import Any

from google.protobuf import field_mask_pb2

from umbra_grpc.domain.errors import InvalidField
from umbra_grpc.domain.models import SHAREABLE_FIELDS, Profile, User, UserSettings
from umbra_grpc.pb import accounts_pb2

_NTFY_COLUMNS = {
    "enabled": "ntfy_enabled",
    "server_url": "ntfy_server_url",
    "topic": "ntfy_topic",
    "auth_token": "ntfy_auth_token",
    "connections_enabled": "ntfy_connections_enabled",
}
# Whole-message paths ("", "sharing_defaults", "ntfy") replace every field but the write-only
# token: a client that reads settings and writes them back must not wipe a stored token. The
# token changes only when sent non-empty or named as `ntfy.auth_token`.
_SETTINGS_PATHS: dict[str, tuple[str, ...]] = {
    "accept_connections": ("accept_connections",),
    "preferred_name": ("preferred_name",),
    **{f"sharing_defaults.{field}": (f"share_{field}",) for field in SHAREABLE_FIELDS},
    "sharing_defaults": tuple(f"share_{field}" for field in SHAREABLE_FIELDS),
    **{f"ntfy.{name}": (column,) for name, column in _NTFY_COLUMNS.items()},
    "ntfy": tuple(c for n, c in _NTFY_COLUMNS.items() if n != "auth_token"),
}
_WHOLE_SETTINGS = ("accept_connections", "preferred_name", "sharing_defaults", "ntfy")


def profile_from_pb(message: accounts_pb2.Profile) -> Profile:
    """Empty strings mean unset."""
    return Profile(**{field: getattr(message, field) or None for field in SHAREABLE_FIELDS})


def user_to_pb(user: User) -> accounts_pb2.User:
    """A user with its settings; unset profile fields stay empty."""
    profile = accounts_pb2.Profile(
        **{field: getattr(user.profile, field) or "" for field in SHAREABLE_FIELDS}
    )
    return accounts_pb2.User(
        id=user.id,
        umbral_name=user.umbral_name,
        is_active=user.is_active,
        profile=profile,
        settings=settings_to_pb(user.settings),
    )


def settings_to_pb(settings: UserSettings) -> accounts_pb2.Settings:
    """Settings as returned: the ntfy token is never included, only whether one is set."""
    ntfy = settings.ntfy
    return accounts_pb2.Settings(
        accept_connections=settings.accept_connections,
        preferred_name=settings.preferred_name or "",
        sharing_defaults=accounts_pb2.SharingDefaults(**settings.sharing_defaults),
        ntfy=accounts_pb2.NtfySettings(
            enabled=ntfy.enabled,
            server_url=ntfy.server_url or "",
            topic=ntfy.topic or "",
            connections_enabled=ntfy.connections_enabled,
            has_auth_token=ntfy.has_auth_token,
        ),
    )


def settings_patch(
    settings: accounts_pb2.Settings, mask: field_mask_pb2.FieldMask
) -> dict[str, Any]:
    """Settings columns to write, from the message and its update mask."""
    paths = list(mask.paths) or list(_WHOLE_SETTINGS)
    patch: dict[str, Any] = {}
    for path in paths:
        columns = _SETTINGS_PATHS.get(path)
        if columns is None:
            raise InvalidField(f"update_mask path {path!r} is not a settings field")
        for column in columns:
            patch[column] = _settings_value(settings, column)
    if {"", "ntfy"} & {*(mask.paths or [""])} and settings.ntfy.auth_token:
        patch["ntfy_auth_token"] = settings.ntfy.auth_token
    return patch


def _settings_value(settings: accounts_pb2.Settings, column: str) -> Any:
    if column.startswith("share_"):
        return getattr(settings.sharing_defaults, column.removeprefix("share_"))
    if column.startswith("ntfy_"):
        return getattr(settings.ntfy, column.removeprefix("ntfy_"))
    return getattr(settings, column)
