"""Plain records passed between the service layer, storage and the API edge."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import NamedTuple

SHAREABLE_FIELDS = ("email", "phone", "mobile", "address", "company", "job_title", "birthday")
NTFY_FIELDS = ("enabled", "server_url", "topic", "auth_token", "connections_enabled")


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """Shareable profile fields; None means unset. Birthday is an ISO date string."""

    email: str | None = None
    phone: str | None = None
    mobile: str | None = None
    address: str | None = None
    company: str | None = None
    job_title: str | None = None
    birthday: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class NtfySettings:
    """Push settings as returned: the auth token itself never leaves storage."""

    enabled: bool = False
    server_url: str | None = None
    topic: str | None = None
    connections_enabled: bool = True
    has_auth_token: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class UserSettings:
    """A user's settings; `sharing_defaults` maps each shareable field to a bool."""

    accept_connections: bool = False
    preferred_name: str | None = None
    sharing_defaults: dict[str, bool] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(SHAREABLE_FIELDS, False)
    )
    ntfy: NtfySettings = dataclasses.field(default_factory=NtfySettings)


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    """A user with their settings."""

    id: int
    umbral_name: str
    is_active: bool
    profile: Profile
    settings: UserSettings
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None


class ConnectionView(NamedTuple):
    """One side of a connection as its owner sees it (a NamedTuple: see RequestView)."""

    id: int
    connected_user_id: int
    connected_name: str
    connected_preferred: str | None
    person_id: int
    create_time: dt.datetime
