"""Blocks and relationship states (SPEC 11): BlockUser, UnblockUser, ListBlockedUsers,
GetRelationships.

A block is invisible to the blocked user: to them the blocker is a handle nobody has (Search
found=false, SendRequest USER_NOT_FOUND, GetRelationships NONE), and nothing tells them. Its
invariant (a blocked pair holds no pending request and no connection) is the database's
(`umbra_grpc.storage.relationships`, migration 0004).

No answer here is an existence oracle: BlockUser and UnblockUser answer the same whether or
not anyone has the handle (the timing floor holds them to Search's floor), and the caller's
list of blocks and the BLOCKED state show a blocked user only while Search would find them
(active and accepting connections). A block of an inactive or hidden user still holds; it
shows again when they become visible.

Budgets (SPEC 8, 11): BlockUser and UnblockUser one statement in BEGIN ... COMMIT (3 on the
wire); ListBlockedUsers and GetRelationships one autocommit read.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from umbra_grpc.domain.errors import InvalidField, SelfBlock
from umbra_grpc.domain.handles import normalize_handle
from umbra_grpc.domain.pages import Page, PageTokens
from umbra_grpc.records import BlockedUserView, Relationship
from umbra_grpc.storage import relationships as store
from umbra_grpc.storage.database import Database

DEFAULT_PAGE_SIZE = 50
MAX_HANDLES = 100
_SCOPE = "blocks"


class Relationships:
    """The block and relationship-status part of ConnectionService."""

    def __init__(self, db: Database, pages: PageTokens, *, ttl: dt.timedelta) -> None:
        self._db = db
        self._pages = pages
        self._ttl = ttl

    async def block(self, caller: int, umbral_name: str, ip: str | None) -> None:
        """Blocks a handle: the same answer whether or not anyone has it; idempotent."""
        handle = normalize_handle(umbral_name)
        is_self = await self._db.transaction(
            lambda conn: store.block(conn, caller=caller, handle=handle, ttl=self._ttl, ip=ip)
        )
        if is_self:
            raise SelfBlock

    async def unblock(self, caller: int, umbral_name: str, ip: str | None) -> None:
        """Lifts the caller's block of a handle, if there is one; restores nothing."""
        handle = normalize_handle(umbral_name)
        await self._db.transaction(
            lambda conn: store.unblock(conn, caller=caller, handle=handle, ip=ip)
        )

    async def blocked(self, caller: int, *, size: int, token: str) -> Page[BlockedUserView]:
        """The caller's blocks of visible users, newest first."""
        return await self._pages.page(
            _SCOPE,
            caller,
            size=size,
            default=DEFAULT_PAGE_SIZE,
            token=token,
            fetch=lambda after, limit: self._db.read(
                lambda conn: store.blocked_page(conn, caller=caller, after=after, limit=limit)
            ),
        )

    async def states(self, caller: int, umbral_names: Sequence[str]) -> list[Relationship]:
        """The caller's relationship with each handle, in the order asked (repeats too)."""
        if len(umbral_names) > MAX_HANDLES:
            raise InvalidField(f"at most {MAX_HANDLES} umbral_names at once")
        handles = [normalize_handle(name) for name in umbral_names]
        if not handles:
            return []
        return await self._db.read(
            lambda conn: store.relationships(conn, caller=caller, handles=handles, ttl=self._ttl)
        )
