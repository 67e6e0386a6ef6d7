"""Plain records passed between storage, the service layer (domain) and the API edge.

A neutral module: storage builds these from rows (so it imports nothing of the domain), the
domain applies its rules to them, the API edge turns them into messages. Records read
straight from a list query are NamedTuples built positionally: immutable, and a third of a
frozen dataclass's construction cost, which a 50-row page pays 50 times.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Literal, NamedTuple

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
    """One side of a connection as its owner sees it."""

    id: int
    connected_user_id: int
    connected_name: str
    connected_preferred: str | None
    person_id: int
    create_time: dt.datetime


class RequestView(NamedTuple):
    """A request with both sides' handles and preferred names."""

    id: int
    status: str
    sender_name: str
    sender_preferred: str | None
    receiver_name: str
    receiver_preferred: str | None
    create_time: dt.datetime
    resolve_time: dt.datetime | None
    message: str | None
    """The sender's note: set only in views whose caller is the receiver."""


class BlockedUserView(NamedTuple):
    """A user the caller blocks."""

    id: int
    """The block's id (its place in the list)."""
    umbral_name: str
    preferred_name: str | None
    create_time: dt.datetime


State = Literal["none", "connected", "outgoing_pending", "incoming_pending", "blocked"]


class Relationship(NamedTuple):
    """How the caller stands with one handle."""

    umbral_name: str
    state: State
