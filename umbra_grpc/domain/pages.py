"""Keyset pagination: page sizes, opaque tamper-evident page tokens, and `Page`, the one
shape of every list (`PageTokens.page` reads one).

A page token names the last row of the page it follows (its `created_at` and id), the list it
belongs to and the caller, and carries an HMAC over all of that. A token that does not
decode, was made for another list or another caller, or was forged is INVALID_ARGUMENT;
nothing about the position can be learnt or steered from outside. Keys: see
UMBRA_PAGE_TOKEN_SECRET in the README (replicas must share one).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import hmac
import struct
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from umbra_grpc.domain.errors import InvalidField
from umbra_grpc.storage.keyset import Cursor

MAX_PAGE_SIZE = 100
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_BODY = struct.Struct(">qqq")  # caller, created_at in microseconds, row id
_MAC_BYTES = 16


class Keyed(Protocol):
    """An item of a keyset list: ordered newest first by (create_time, id)."""

    @property
    def id(self) -> int: ...

    @property
    def create_time(self) -> dt.datetime: ...


K = TypeVar("K", bound=Keyed)


@dataclasses.dataclass(frozen=True, slots=True)
class Page(Generic[K]):
    """A page of a list and the token of the next one ("" on the last page)."""

    items: list[K]
    next_page_token: str


# Reads at most `limit` items after the cursor (from the start without one).
Fetch = Callable[[Cursor | None, int], Awaitable[list[K]]]


def page_size(requested: int, default: int) -> int:
    """0 means the default; above the maximum is clamped; negative is INVALID_ARGUMENT."""
    if requested < 0:
        raise InvalidField("page_size must not be negative")
    if requested == 0:
        return default
    return min(requested, MAX_PAGE_SIZE)


class PageTokens:
    """Makes and checks page tokens with one secret key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    async def page(
        self, scope: str, caller: int, *, size: int, default: int, token: str, fetch: Fetch[K]
    ) -> Page[K]:
        """The page `token` names in list `scope` of `caller`, `size` items (0: `default`).

        One more item than the page holds is read: there is a next page when it comes back.
        """
        limit = page_size(size, default)
        after = self.decode(token, scope, caller)
        items = await fetch(after, limit + 1)
        next_token = ""
        if len(items) > limit:
            items = items[:limit]
            last = items[-1]
            next_token = self.encode(scope, caller, (last.create_time, last.id))
        return Page(items, next_token)

    def encode(self, scope: str, caller: int, cursor: Cursor) -> str:
        """The token for the page after `cursor` in list `scope` of `caller`."""
        created, row_id = cursor
        micros = (created - _EPOCH) // dt.timedelta(microseconds=1)
        body = _BODY.pack(caller, micros, row_id)
        token = body + self._mac(scope, body)
        return base64.urlsafe_b64encode(token).decode().rstrip("=")

    def decode(self, token: str, scope: str, caller: int) -> Cursor | None:
        """The cursor in a token; None for the first page (empty token)."""
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidField("page_token is invalid") from None
        body, mac = raw[: _BODY.size], raw[_BODY.size :]
        if len(raw) != _BODY.size + _MAC_BYTES or not hmac.compare_digest(
            mac, self._mac(scope, body)
        ):
            raise InvalidField("page_token is invalid")
        owner, micros, row_id = _BODY.unpack(body)
        if owner != caller:
            raise InvalidField("page_token is invalid")
        return _EPOCH + dt.timedelta(microseconds=micros), row_id

    def _mac(self, scope: str, body: bytes) -> bytes:
        digest = hmac.new(self._key, scope.encode() + b"\0" + body, hashlib.sha256).digest()
        return digest[:_MAC_BYTES]
