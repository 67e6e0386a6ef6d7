"""Pure protobuf <-> domain conversions (no I/O, no rules beyond field mapping)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf import field_mask_pb2, timestamp_pb2

from umbra_grpc.domain.connections import OverridesChange, SharedProfile
from umbra_grpc.domain.errors import InvalidField
from umbra_grpc.domain.notifications import ContactView, NotificationView
from umbra_grpc.domain.watch import Heartbeat, Synced, WatchItem
from umbra_grpc.pb import accounts_pb2, connections_pb2
from umbra_grpc.records import (
    SHAREABLE_FIELDS,
    BlockedUserView,
    ConnectionView,
    Profile,
    Relationship,
    RequestView,
    User,
    UserSettings,
)

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


_REQUEST_STATUS = {
    "pending": connections_pb2.ConnectionRequest.STATUS_PENDING,
    "accepted": connections_pb2.ConnectionRequest.STATUS_ACCEPTED,
    "rejected": connections_pb2.ConnectionRequest.STATUS_REJECTED,
    "cancelled": connections_pb2.ConnectionRequest.STATUS_CANCELLED,
    "expired": connections_pb2.ConnectionRequest.STATUS_EXPIRED,
}
_RELATIONSHIP_STATE = {
    "none": connections_pb2.RELATIONSHIP_STATE_NONE,
    "connected": connections_pb2.RELATIONSHIP_STATE_CONNECTED,
    "outgoing_pending": connections_pb2.RELATIONSHIP_STATE_OUTGOING_PENDING,
    "incoming_pending": connections_pb2.RELATIONSHIP_STATE_INCOMING_PENDING,
    "blocked": connections_pb2.RELATIONSHIP_STATE_BLOCKED,
}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def set_time(stamp: timestamp_pb2.Timestamp, value: dt.datetime) -> None:
    """Writes a datetime into a Timestamp field (naive values are taken as UTC).

    Plain arithmetic: `Timestamp.FromDatetime` costs 2.5x as much, and list pages write
    one per row.
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    delta = value - _EPOCH
    stamp.seconds = delta.days * 86_400 + delta.seconds
    stamp.nanos = delta.microseconds * 1_000


# The fill_* functions write into a message the caller got from its response (a field, or
# `repeated.add()`): building a message and then assigning it would copy it once more, and
# lists of 50 rows spend most of their Python time here.


def fill_request(message: connections_pb2.ConnectionRequest, request: RequestView) -> None:
    """A connection request; resolve_time stays unset while pending, the note empty in the
    sender's views."""
    message.id = request.id
    message.sender_umbral_name = request.sender_name
    message.sender_preferred_name = request.sender_preferred or ""
    message.receiver_umbral_name = request.receiver_name
    message.receiver_preferred_name = request.receiver_preferred or ""
    message.status = _REQUEST_STATUS[request.status]
    set_time(message.create_time, request.create_time)
    if request.resolve_time is not None:
        set_time(message.resolve_time, request.resolve_time)
    if request.message is not None:
        message.message = request.message


def fill_blocked_user(message: connections_pb2.BlockedUser, blocked: BlockedUserView) -> None:
    """A user the caller blocks."""
    message.umbral_name = blocked.umbral_name
    message.preferred_name = blocked.preferred_name or ""
    set_time(message.create_time, blocked.create_time)


def relationship_to_pb(relationship: Relationship) -> connections_pb2.Relationship:
    """How the caller stands with one handle."""
    return connections_pb2.Relationship(
        umbral_name=relationship.umbral_name, state=_RELATIONSHIP_STATE[relationship.state]
    )


def fill_connection(message: connections_pb2.Connection, connection: ConnectionView) -> None:
    """One side of a connection."""
    message.id = connection.id
    message.connected_user_id = connection.connected_user_id
    message.connected_umbral_name = connection.connected_name
    message.connected_preferred_name = connection.connected_preferred or ""
    message.person_id = connection.person_id
    set_time(message.create_time, connection.create_time)


def fill_notification(
    message: connections_pb2.Notification, notification: NotificationView
) -> None:
    """An in-app notification."""
    message.id = notification.id
    message.type = notification.type
    message.title = notification.title
    message.message = notification.message
    message.data.update(notification.data)
    message.source_type = notification.source_type or ""
    message.source_id = notification.source_id or 0
    message.read = notification.read
    set_time(message.create_time, notification.create_time)


def contact_to_pb(contact: ContactView) -> connections_pb2.Contact:
    """A contact card; fields not shared stay unset (not empty strings)."""
    message = connections_pb2.Contact(
        id=contact.id,
        linked_user_id=contact.linked_user_id or 0,
        is_umbral_contact=contact.is_umbral_contact,
        display_name=contact.display_name,
    )
    for field, value in contact.fields.items():
        setattr(message, field, value)
    set_time(message.create_time, contact.create_time)
    set_time(message.update_time, contact.update_time)
    return message


def shared_profile_to_pb(profile: SharedProfile) -> connections_pb2.SharedProfile:
    """Fields not shared stay unset (not empty strings)."""
    return connections_pb2.SharedProfile(
        umbral_name=profile.umbral_name,
        preferred_name=profile.preferred_name or "",
        **profile.fields,
    )


def overrides_change(
    overrides: connections_pb2.SharingOverrides, mask: field_mask_pb2.FieldMask
) -> OverridesChange:
    """Update-mask semantics: a masked field with a value is set, without one is cleared.

    An empty mask means every shareable field. A path that is not a shareable field is
    INVALID_ARGUMENT.
    """
    paths = list(mask.paths) or list(SHAREABLE_FIELDS)
    unknown = [path for path in paths if path not in SHAREABLE_FIELDS]
    if unknown:
        raise InvalidField(f"update_mask path {unknown[0]!r} is not a shareable field")
    present = {field.name: value for field, value in overrides.ListFields()}
    set_values = {path: bool(present[path]) for path in paths if path in present}
    clear = tuple(path for path in paths if path not in present)
    return OverridesChange(set_values=set_values, clear=clear)


def overrides_to_pb(overrides: dict[str, bool]) -> connections_pb2.SharingOverrides:
    """The overrides in force; fields following the default stay unset."""
    return connections_pb2.SharingOverrides(
        **{field: value for field, value in overrides.items() if field in SHAREABLE_FIELDS}
    )


def watch_item_to_pb(item: WatchItem) -> connections_pb2.WatchIncomingRequestsResponse:
    """One event of the watch stream."""
    message = connections_pb2.WatchIncomingRequestsResponse()
    if isinstance(item, Synced):
        message.synced.SetInParent()
    elif isinstance(item, Heartbeat):
        message.heartbeat.SetInParent()
    elif item.kind == "received":
        fill_request(message.received, item.request)
    elif item.kind == "cancelled":
        fill_request(message.cancelled, item.request)
    else:
        fill_request(message.resolved, item.request)
    return message
