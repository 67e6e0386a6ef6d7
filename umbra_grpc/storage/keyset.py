"""Keyset pagination on `(created_at, id)`, newest first: one statement per page.

Each list has two statements, one for the first page and one after a cursor, so that both
are plain index range scans on `(owner, created_at DESC, id DESC)`: a page deep in a long
list costs what the first page costs (no OFFSET, no OR-ed "first page" condition).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from umbra_grpc.storage.database import Conn, Query, Row

# The last row of a page: its created_at and id (what a page token names, domain.pages).
Cursor = tuple[dt.datetime, int]


def statements(build: Callable[[str], str], alias: str = "") -> dict[bool, Query]:
    """The two statements of a list: `build(condition)` with and without the cursor."""
    column = f"{alias}." if alias else ""
    after = f"AND ({column}created_at, {column}id) < (:after_time, :after_id)"
    return {False: Query(build("")), True: Query(build(after))}


async def page(
    conn: Conn,
    variants: Mapping[bool, Query],
    *,
    after: Cursor | None,
    limit: int,
    **params: Any,
) -> list[Row]:
    """One page: at most `limit` rows after the cursor (the first page without one)."""
    values: dict[str, Any] = {**params, "limit": limit}
    if after is not None:
        values["after_time"], values["after_id"] = after
    return await conn.fetch(variants[after is not None], **values)
