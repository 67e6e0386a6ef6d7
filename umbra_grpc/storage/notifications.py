"""In-app notifications: the caller's own rows only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import NamedTuple

from umbra_grpc.storage import keyset
from umbra_grpc.storage.database import Conn, Query, record


class NotificationRow(NamedTuple):
    """One notification as stored (`data` is the JSON object as written)."""

    id: int
    type: str
    title: str
    message: str
    data: dict[str, object]
    source_type: str | None
    source_id: int | None
    read: bool
    created_at: dt.datetime


_row = record(NotificationRow, NotificationRow._fields)


def _pages(*, unread_only: bool) -> dict[bool, Query]:
    unread = "AND NOT read" if unread_only else ""
    return keyset.statements(
        lambda cursor: (
            f"""
        SELECT id, type, title, message, data, source_type, source_id, read, created_at
        FROM notifications
        WHERE user_id = :caller {unread} {cursor}
        ORDER BY created_at DESC, id DESC
        LIMIT :limit
        """
        )
    )


_PAGES = {unread_only: _pages(unread_only=unread_only) for unread_only in (True, False)}


async def page(
    conn: Conn,
    *,
    caller: int,
    unread_only: bool,
    after: keyset.Cursor | None,
    limit: int,
) -> list[NotificationRow]:
    """The caller's notifications, newest first, after a keyset cursor."""
    rows = await keyset.page(conn, _PAGES[unread_only], after=after, limit=limit, caller=caller)
    return [_row(row) for row in rows]


_MARK_READ = Query(
    """
    WITH marked AS (
        UPDATE notifications SET read = true
        WHERE user_id = :caller AND id = ANY(CAST(:ids AS bigint[])) AND NOT read
        RETURNING id
    ),
    audit AS (
        INSERT INTO audit_log (action, actor_id, target_id, detail, ip)
        SELECT 'notifications.marked_read', CAST(:caller AS bigint), NULL,
               jsonb_build_object('notification_ids', jsonb_agg(marked.id ORDER BY marked.id)),
               CAST(:ip AS inet)
        FROM marked HAVING count(*) > 0
        RETURNING id
    )
    SELECT (SELECT count(*) FROM marked) AS updated, (SELECT count(*) FROM audit) AS audited
    """
)


async def mark_read(conn: Conn, *, caller: int, ids: Sequence[int], ip: str | None) -> int:
    """Marks the caller's unread notifications among `ids` read; returns how many changed."""
    return int(await conn.fetchval(_MARK_READ, caller=caller, ids=list(ids), ip=ip))
