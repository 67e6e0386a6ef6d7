"""Keyset pagination: page sizes and opaque, tamper-evident page tokens.

A page token names the last row of the page it follows (its `created_at` and id), the list it
belongs to and the caller, and carries an HMAC over all of that. A token that does not
decode, was made for another list or another caller, or was forged is INVALID_ARGUMENT;
nothing about the position can be learnt or steered from outside. Keys: see
UMBRA_PAGE_TOKEN_SECRET in the README (replicas must share one).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import struct

from umbra_grpc.domain.errors import InvalidField

MAX_PAGE_SIZE = 100
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_BODY = struct.Struct(">qqq")  # caller, created_at in microseconds, row id
_MAC_BYTES = 16

Cursor = tuple[dt.datetime, int]


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
