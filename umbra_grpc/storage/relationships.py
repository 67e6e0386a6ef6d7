"""Blocks and relationship states: the SQL of BlockUser, UnblockUser, ListBlockedUsers and
GetRelationships (SPEC 11).

- `block` is ONE statement of data-modifying CTEs: it removes a connection between the two
  (both rows, both cards detached, a `connection.removed` audit row, as
  `connections.remove`), cancels every pending request of the pair in both directions (its
  notification deleted, its unsent push skipped, the receiver's watch streams woken with
  `cancelled`, an audit row each: `connection.request_cancelled` by its sender, the
  blocker, or `connection.request_cancelled_by_receiver`; one already past the TTL is
  expired instead, as the sweeper would), and records the block (`user.blocked`). A request
  the blocked user had sent is flagged `cancelled_by_receiver`: to its sender it must look
  like a silent reject (no resend cooldown, no place in the cap). Its INSERT into
  `user_blocks` fires the pair guard of migration 0004: when a request or a connection of
  the pair committed after this statement's snapshot, the guard raises a serialization
  failure and the whole call runs again (then it sees, and removes, what appeared). A
  handle nobody has writes nothing.
- `relationships` answers for a whole list of handles in one statement, through the unique
  indexes of each table (handle, pair of a block, pair of a connection, pending pair).

What anyone may learn stays what Search tells: a blocked user shows in the caller's list,
and as BLOCKED, only while active and accepting connections; whoever blocks the caller is
NONE, as are inactive and unknown handles.
"""

from __future__ import annotations

import datetime as dt

from umbra_grpc.records import BlockedUserView, Relationship
from umbra_grpc.storage import keyset
from umbra_grpc.storage.database import Conn, Query, record
from umbra_grpc.storage.notify import request_event
from umbra_grpc.storage.requests import CANCELLED_PUSH

EXPIRED_PUSH = "skipped: expired"

_PAIR = """least(r.sender_id, r.receiver_id) = least(CAST(:caller AS bigint), target.id)
          AND greatest(r.sender_id, r.receiver_id) = greatest(CAST(:caller AS bigint), target.id)"""
_STALE = "r.created_at <= now() - CAST(:ttl AS interval)"

# A swept request that had expired is told as `resolved`, one still pending as `cancelled`.
_SWEPT_EVENT = request_event(
    "CASE WHEN swept.status = 'expired' THEN 'resolved' ELSE 'cancelled' END", "swept"
)

_BLOCK = Query(
    f"""
    WITH me AS (
        SELECT lower(umbral_name) = :handle AS is_self FROM users WHERE id = :caller
    ),
    target AS (
        SELECT id FROM users WHERE lower(umbral_name) = :handle AND id <> :caller
    ),
    unlinked AS (
        DELETE FROM user_connections c USING target
        WHERE (c.user_id, c.connected_user_id)
              IN ((CAST(:caller AS bigint), target.id), (target.id, CAST(:caller AS bigint)))
        RETURNING c.id, c.user_id, c.person_id
    ),
    cards AS (
        UPDATE persons p
        SET linked_user_id = NULL, is_umbral_contact = false, updated_at = now()
        FROM unlinked WHERE p.id = unlinked.person_id
        RETURNING p.id
    ),
    swept AS (
        UPDATE connection_requests r
        SET status = CASE WHEN {_STALE} THEN 'expired' ELSE 'cancelled' END,
            resolved_at = CASE WHEN {_STALE} THEN r.created_at + CAST(:ttl AS interval)
                               ELSE now() END,
            cancelled_by_receiver = NOT ({_STALE}) AND r.sender_id = target.id
        FROM target
        WHERE r.status = 'pending' AND {_PAIR}
        RETURNING r.id, r.sender_id, r.receiver_id, r.status
    ),
    withdrawn AS (
        DELETE FROM notifications n USING swept
        WHERE n.source_type = 'connection_request' AND n.source_id = swept.id
          AND n.user_id = swept.receiver_id
        RETURNING n.id
    ),
    unsent AS (
        UPDATE outbox o
        SET status = 'skipped', completed_at = now(),
            last_error = CASE WHEN swept.status = 'expired' THEN '{EXPIRED_PUSH}'
                              ELSE '{CANCELLED_PUSH}' END
        FROM swept WHERE o.request_id = swept.id AND o.status = 'pending'
        RETURNING o.id
    ),
    block AS (
        INSERT INTO user_blocks (blocker_id, blocked_id)
        SELECT CAST(:caller AS bigint), target.id FROM target
        ON CONFLICT (blocker_id, blocked_id) DO NOTHING
        RETURNING blocked_id
    ),
    audit AS (
        INSERT INTO audit_log (action, actor_id, target_id, detail, ip)
        SELECT 'user.blocked', CAST(:caller AS bigint), target.id,
               jsonb_build_object('requests_cancelled', (SELECT count(*) FROM swept),
                                  'connection_removed', EXISTS (SELECT 1 FROM unlinked)),
               CAST(:ip AS inet)
        FROM target WHERE EXISTS (SELECT 1 FROM block)
        UNION ALL
        SELECT 'connection.removed', CAST(:caller AS bigint), target.id,
               jsonb_build_object('connection_id', unlinked.id, 'reason', 'block'),
               CAST(:ip AS inet)
        FROM target JOIN unlinked ON unlinked.user_id = :caller
        UNION ALL
        SELECT CASE WHEN swept.status = 'expired' THEN 'connection.request_expired'
                    WHEN swept.sender_id = :caller THEN 'connection.request_cancelled'
                    ELSE 'connection.request_cancelled_by_receiver' END,
               CASE WHEN swept.status = 'expired' THEN NULL ELSE CAST(:caller AS bigint) END,
               CASE WHEN swept.sender_id = :caller OR swept.status = 'expired'
                    THEN swept.receiver_id ELSE swept.sender_id END,
               jsonb_build_object('request_id', swept.id, 'reason', 'block'),
               CAST(:ip AS inet)
        FROM swept
        RETURNING id
    ),
    wake AS (
        SELECT {_SWEPT_EVENT} FROM swept
    )
    SELECT coalesce((SELECT is_self FROM me), false) AS is_self,
           (SELECT count(*) FROM block) AS blocked,
           (SELECT count(*) FROM cards) + (SELECT count(*) FROM withdrawn)
           + (SELECT count(*) FROM unsent) + (SELECT count(*) FROM audit)
           + (SELECT count(*) FROM wake) AS side_rows
    """
)


async def block(conn: Conn, *, caller: int, handle: str, ttl: dt.timedelta, ip: str | None) -> bool:
    """Blocks the user with `handle` (if any, and not the caller), sweeping what joined the
    two; True when the handle is the caller's own (then nothing is written)."""
    # One row always (a SELECT of subqueries); `is_self` is its first column.
    return bool(await conn.fetchval(_BLOCK, caller=caller, handle=handle, ttl=ttl, ip=ip))


_UNBLOCK = Query(
    """
    WITH gone AS (
        DELETE FROM user_blocks k USING users u
        WHERE k.blocker_id = :caller AND k.blocked_id = u.id AND lower(u.umbral_name) = :handle
        RETURNING k.blocked_id
    ),
    audit AS (
        INSERT INTO audit_log (action, actor_id, target_id, detail, ip)
        SELECT 'user.unblocked', CAST(:caller AS bigint), gone.blocked_id, '{}'::jsonb,
               CAST(:ip AS inet)
        FROM gone RETURNING id
    )
    SELECT (SELECT count(*) FROM gone) AS lifted, (SELECT count(*) FROM audit) AS audited
    """
)


async def unblock(conn: Conn, *, caller: int, handle: str, ip: str | None) -> int:
    """Lifts the caller's block of `handle`, if any; how many blocks went (0 or 1)."""
    return int(await conn.fetchval(_UNBLOCK, caller=caller, handle=handle, ip=ip))


# Blocked users who are inactive or not accepting are left out: see the module docstring.
_BLOCKED_PAGES = keyset.statements(
    lambda cursor: (
        f"""
    SELECT k.id, k.created_at, u.umbral_name, s.preferred_name
    FROM user_blocks k
    JOIN users u ON u.id = k.blocked_id JOIN settings s ON s.user_id = k.blocked_id
    WHERE k.blocker_id = :caller AND u.is_active AND s.accept_connections {cursor}
    ORDER BY k.created_at DESC, k.id DESC
    LIMIT :limit
    """
    ),
    alias="k",
)
_blocked_view = record(BlockedUserView, ("id", "umbral_name", "preferred_name", "created_at"))


async def blocked_page(
    conn: Conn, *, caller: int, after: keyset.Cursor | None, limit: int
) -> list[BlockedUserView]:
    """The caller's blocks of visible users, newest first, after a keyset cursor."""
    rows = await keyset.page(conn, _BLOCKED_PAGES, after=after, limit=limit, caller=caller)
    return [_blocked_view(row) for row in rows]


_RELATIONSHIPS = Query(
    """
    SELECT asked.handle,
           CASE
               WHEN u.id IS NULL THEN 'none'
               WHEN EXISTS (SELECT 1 FROM user_blocks k
                            WHERE k.blocker_id = :caller AND k.blocked_id = u.id)
                   THEN CASE WHEN s.accept_connections THEN 'blocked' ELSE 'none' END
               WHEN EXISTS (SELECT 1 FROM user_blocks k
                            WHERE k.blocker_id = u.id AND k.blocked_id = :caller) THEN 'none'
               WHEN EXISTS (SELECT 1 FROM user_connections c
                            WHERE c.user_id = :caller AND c.connected_user_id = u.id)
                   THEN 'connected'
               WHEN pending.sender_id = :caller THEN 'outgoing_pending'
               WHEN pending.sender_id IS NOT NULL THEN 'incoming_pending'
               ELSE 'none'
           END AS state
    FROM unnest(CAST(:handles AS text[])) WITH ORDINALITY AS asked(handle, position)
    LEFT JOIN users u
        ON lower(u.umbral_name) = asked.handle AND u.is_active AND u.id <> :caller
    LEFT JOIN settings s ON s.user_id = u.id
    LEFT JOIN LATERAL (
        SELECT r.sender_id FROM connection_requests r
        WHERE r.status = 'pending' AND r.created_at > now() - CAST(:ttl AS interval)
          AND least(r.sender_id, r.receiver_id) = least(CAST(:caller AS bigint), u.id)
          AND greatest(r.sender_id, r.receiver_id) = greatest(CAST(:caller AS bigint), u.id)
    ) pending ON true
    ORDER BY asked.position
    """
)


async def relationships(
    conn: Conn, *, caller: int, handles: list[str], ttl: dt.timedelta
) -> list[Relationship]:
    """(handle, state) for each of `handles`, in order."""
    rows = await conn.fetch(_RELATIONSHIPS, caller=caller, handles=handles, ttl=ttl)
    return [Relationship(row["handle"], row["state"]) for row in rows]
