"""Connection rules: list, get, shared profile, sharing overrides, removal.

Budgets (SPEC 8): ListConnections, GetConnection and GetSharedProfile are one autocommit
read each; UpdateSharingOverrides and RemoveConnection one statement each, in BEGIN ... COMMIT
(see `Database.transaction`).
Anything that is not the caller's own connection is CONNECTION_NOT_FOUND, the same answer as
an id that does not exist.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping

from umbra_grpc.domain.errors import ConnectionNotFound, InvalidField
from umbra_grpc.domain.ids import check_id
from umbra_grpc.domain.pages import Page, PageTokens
from umbra_grpc.records import SHAREABLE_FIELDS, ConnectionView
from umbra_grpc.storage import connections as store
from umbra_grpc.storage.database import Database

DEFAULT_PAGE_SIZE = 50
_SCOPE = "connections"


@dataclasses.dataclass(frozen=True, slots=True)
class SharedProfile:
    """What the other side shares with the caller: only shared, non-empty fields."""

    umbral_name: str
    preferred_name: str | None
    fields: dict[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class OverridesChange:
    """An update-mask change: fields to set (with their value) and fields to clear."""

    set_values: dict[str, bool]
    clear: tuple[str, ...]


def shared_fields(
    values: Mapping[str, str | dt.date | None],
    defaults: Mapping[str, bool],
    overrides: Mapping[str, object] | None,
) -> dict[str, str]:
    """A field is shared when the override says so, else the default; empty values never."""
    shared: dict[str, str] = {}
    for field in SHAREABLE_FIELDS:
        override = (overrides or {}).get(field)
        allowed = override if isinstance(override, bool) else defaults[field]
        value = values.get(field)
        if allowed and value is not None and value != "":
            shared[field] = value.isoformat() if isinstance(value, dt.date) else str(value)
    return shared


class Connections:
    """The connection half of ConnectionService."""

    def __init__(self, db: Database, pages: PageTokens) -> None:
        self._db = db
        self._pages = pages

    async def page(self, caller: int, *, size: int, token: str) -> Page[ConnectionView]:
        """The caller's connections, newest first."""
        return await self._pages.page(
            _SCOPE,
            caller,
            size=size,
            default=DEFAULT_PAGE_SIZE,
            token=token,
            fetch=lambda after, limit: self._db.read(
                lambda conn: store.page(conn, caller=caller, after=after, limit=limit)
            ),
        )

    async def get(self, caller: int, connection_id: int) -> ConnectionView:
        """One of the caller's connections."""
        check_id(connection_id, "connection_id")
        view = await self._db.read(
            lambda conn: store.one(conn, caller=caller, connection_id=connection_id)
        )
        if view is None:
            raise ConnectionNotFound
        return view

    async def shared_profile(self, caller: int, connection_id: int) -> SharedProfile:
        """What the other side of the caller's connection shares with the caller."""
        check_id(connection_id, "connection_id")
        source = await self._db.read(
            lambda conn: store.shared_profile_source(
                conn, caller=caller, connection_id=connection_id
            )
        )
        if source is None:
            raise ConnectionNotFound
        return SharedProfile(
            umbral_name=source.umbral_name,
            preferred_name=source.preferred_name,
            fields=shared_fields(source.values, source.defaults, source.overrides),
        )

    async def update_overrides(
        self, caller: int, connection_id: int, change: OverridesChange, ip: str | None
    ) -> dict[str, bool]:
        """Sets/clears what the caller shares with one connection; returns what is in force."""
        check_id(connection_id, "connection_id")
        unknown = (set(change.set_values) | set(change.clear)) - set(SHAREABLE_FIELDS)
        if unknown:
            raise InvalidField(f"not a shareable field: {', '.join(sorted(unknown))}")
        overrides = await self._db.transaction(
            lambda conn: store.update_overrides(
                conn,
                caller=caller,
                connection_id=connection_id,
                set_values=change.set_values,
                clear=change.clear,
                ip=ip,
            )
        )
        if overrides is None:
            raise ConnectionNotFound
        return overrides

    async def remove(self, caller: int, connection_id: int, ip: str | None) -> None:
        """Removes both sides of the connection; both contact cards stay, detached."""
        check_id(connection_id, "connection_id")
        removed = await self._db.transaction(
            lambda conn: store.remove(conn, caller=caller, connection_id=connection_id, ip=ip)
        )
        if removed == 0:
            raise ConnectionNotFound
