"""Connections: the SQL of the list, get, shared profile, sharing overrides and removal.

A row X->Y holds in `sharing_overrides` what Y shares with X (as the router stored it), so
GetSharedProfile reads the caller's own row and UpdateSharingOverrides writes the mirror row.
Every statement starts from the caller's own row (`user_id = :caller`): another user's id
finds nothing, exactly as an id that does not exist.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from umbra_grpc.records import SHAREABLE_FIELDS, ConnectionView
from umbra_grpc.storage import keyset
from umbra_grpc.storage.database import Conn, Query, record


class SharedSource(NamedTuple):
    """What GetSharedProfile decides from: the other side's handle, preferred name and
    profile values, their sharing defaults, and their overrides for the caller."""

    umbral_name: str
    preferred_name: str | None
    values: dict[str, str | dt.date | None]
    """Each shareable field's value (birthday a date)."""
    defaults: dict[str, bool]
    """Each shareable field's `share_` default."""
    overrides: dict[str, object] | None
    """The `sharing_overrides` JSON as stored (None: no overrides)."""


_VIEW = """
    SELECT c.id, c.connected_user_id, u.umbral_name, s.preferred_name, c.person_id,
           c.created_at
    FROM user_connections c
    JOIN users u ON u.id = c.connected_user_id
    JOIN settings s ON s.user_id = c.connected_user_id
"""


_PAGES = keyset.statements(
    lambda cursor: (
        _VIEW
        + f"""
    WHERE c.user_id = :caller {cursor}
    ORDER BY c.created_at DESC, c.id DESC
    LIMIT :limit
    """
    ),
    alias="c",
)
_ONE = Query(_VIEW + " WHERE c.id = :connection_id AND c.user_id = :caller")
_view = record(
    ConnectionView,
    ("id", "connected_user_id", "umbral_name", "preferred_name", "person_id", "created_at"),
)


async def page(
    conn: Conn, *, caller: int, after: keyset.Cursor | None, limit: int
) -> list[ConnectionView]:
    """The caller's connections, newest first, after a keyset cursor."""
    rows = await keyset.page(conn, _PAGES, after=after, limit=limit, caller=caller)
    return [_view(row) for row in rows]


async def one(conn: Conn, *, caller: int, connection_id: int) -> ConnectionView | None:
    """One of the caller's connections, or None."""
    row = await conn.fetchrow(_ONE, caller=caller, connection_id=connection_id)
    return _view(row) if row is not None else None


_SHARED = Query(
    f"""
    SELECT u.umbral_name, s.preferred_name, c.sharing_overrides,
           {", ".join(f"u.{field}, s.share_{field}" for field in SHAREABLE_FIELDS)}
    FROM user_connections c
    JOIN users u ON u.id = c.connected_user_id
    JOIN settings s ON s.user_id = c.connected_user_id
    WHERE c.id = :connection_id AND c.user_id = :caller
    """
)


async def shared_profile_source(
    conn: Conn, *, caller: int, connection_id: int
) -> SharedSource | None:
    """The other side's profile, sharing defaults and overrides for the caller, or None."""
    row = await conn.fetchrow(_SHARED, caller=caller, connection_id=connection_id)
    if row is None:
        return None
    return SharedSource(
        row["umbral_name"],
        row["preferred_name"],
        {field: row[field] for field in SHAREABLE_FIELDS},
        {field: row[f"share_{field}"] for field in SHAREABLE_FIELDS},
        row["sharing_overrides"],
    )


# The overrides after the change, computed from the row as it is when the UPDATE locks it.
_MERGED = """nullif(
            (coalesce(r.sharing_overrides, '{}'::jsonb) - CAST(:clear AS text[]))
            || CAST(:set AS jsonb),
            '{}'::jsonb)"""

_UPDATE_OVERRIDES = Query(
    f"""
    WITH mine AS (
        SELECT user_id, connected_user_id FROM user_connections
        WHERE id = :connection_id AND user_id = :caller
    ),
    changed AS (
        UPDATE user_connections r
        SET sharing_overrides = {_MERGED}
        FROM mine
        WHERE r.user_id = mine.connected_user_id AND r.connected_user_id = mine.user_id
          AND r.sharing_overrides IS DISTINCT FROM {_MERGED}
        RETURNING r.sharing_overrides, r.user_id
    ),
    audit AS (
        INSERT INTO audit_log (action, actor_id, target_id, detail, ip)
        SELECT 'connection.sharing_updated', CAST(:caller AS bigint), changed.user_id,
               jsonb_build_object('connection_id', CAST(:connection_id AS bigint),
                                  'set', CAST(:set AS jsonb),
                                  'cleared', to_jsonb(CAST(:clear AS text[]))),
               CAST(:ip AS inet)
        FROM changed RETURNING id
    )
    SELECT CASE WHEN EXISTS (SELECT 1 FROM changed) THEN (SELECT sharing_overrides FROM changed)
                ELSE (SELECT r.sharing_overrides FROM user_connections r
                      WHERE r.user_id = mine.connected_user_id
                        AND r.connected_user_id = mine.user_id)
           END AS sharing_overrides,
           (SELECT count(*) FROM audit) AS audited
    FROM mine
    """
)


async def update_overrides(
    conn: Conn,
    *,
    caller: int,
    connection_id: int,
    set_values: Mapping[str, bool],
    clear: Sequence[str],
    ip: str | None,
) -> dict[str, bool] | None:
    """Sets and clears the caller's overrides on the mirror row in one atomic UPDATE.

    Merging happens inside the UPDATE (jsonb `-` and `||` on the locked row), so two callers
    changing different fields at once both keep their change. A change that leaves the
    overrides as they are writes nothing: no UPDATE of the row, no audit row. Returns the
    overrides in force afterwards ({} for none); None when the connection is not the
    caller's.
    """
    row = await conn.fetchrow(
        _UPDATE_OVERRIDES,
        caller=caller,
        connection_id=connection_id,
        set=json.dumps(dict(set_values)),
        clear=list(clear),
        ip=ip,
    )
    return None if row is None else dict(row["sharing_overrides"] or {})


_REMOVE = Query(
    """
    WITH mine AS (
        SELECT user_id, connected_user_id FROM user_connections
        WHERE id = :connection_id AND user_id = :caller
    ),
    gone AS (
        DELETE FROM user_connections c USING mine
        WHERE (c.user_id = mine.user_id AND c.connected_user_id = mine.connected_user_id)
           OR (c.user_id = mine.connected_user_id AND c.connected_user_id = mine.user_id)
        RETURNING c.person_id
    ),
    cards AS (
        UPDATE persons p
        SET linked_user_id = NULL, is_umbral_contact = false, updated_at = now()
        FROM gone WHERE p.id = gone.person_id
        RETURNING p.id
    ),
    audit AS (
        INSERT INTO audit_log (action, actor_id, target_id, detail, ip)
        SELECT 'connection.removed', CAST(:caller AS bigint), mine.connected_user_id,
               jsonb_build_object('connection_id', CAST(:connection_id AS bigint)),
               CAST(:ip AS inet)
        FROM mine WHERE EXISTS (SELECT 1 FROM gone)
        RETURNING id
    )
    SELECT (SELECT count(*) FROM gone) AS removed, (SELECT count(*) FROM cards) AS detached,
           (SELECT count(*) FROM audit) AS audited
    """
)


async def remove(conn: Conn, *, caller: int, connection_id: int, ip: str | None) -> int:
    """Deletes both rows of the caller's connection and detaches both cards; rows deleted."""
    return int(await conn.fetchval(_REMOVE, caller=caller, connection_id=connection_id, ip=ip))
