"""Connection requests: the SQL of Search, SendRequest, Respond, CancelRequest and the lists.

Each write is one statement, so an RPC costs a fixed, small number of round trips (SPEC 8)
and either all of its rows are written or none:
- `send` (SendRequest) calls `umbra_send_request` (a PL/pgSQL function, migration 0003),
  whose statements each take their own snapshot. It reads the caller's opt-in, then the
  target's flags, without locks, and stops at the first refusal (no oracle, no waiting:
  SPEC 10.2). Only then does it take a `FOR NO KEY UPDATE` lock on the receiver's row, so
  senders racing one receiver queue there; its last statement re-checks the flags and
  connected / pending / resend cooldown / cap in a snapshot taken after the lock (I3) and,
  only when all clear, writes the request, the receiver's notification, the audit row and
  the outbox row; then it sends the NOTIFYs. The pending-pair unique index (I1) settles the
  one race the lock does not cover (A->B and B->A at once).
- `respond` and `cancel` are each one conditional UPDATE ... WHERE status = 'pending' with
  everything that follows hanging off its RETURNING (data-modifying CTEs), so a request
  resolves at most once. An answer marks the receiver's request notification read. A cancel
  deletes it and marks the request's push `skipped` ("skipped: cancelled") while it is
  pending: a worker claim in progress skips the locked row, and once the cancel commits no
  claim takes it. A push already claimed is in flight and may still be delivered, once: its
  outcome write is then refused (the row is no longer pending), so it is never retried.
Expiry (SPEC 11) is exact at read time: a pending request older than the TTL (`:ttl`) is left
out of the lists and the watch snapshot and cannot be answered or cancelled, whether or not
the sweeper (`umbra_grpc.storage.expiry`) has marked it `expired` yet; `umbra_send_request`
expires the pair's stale request itself before writing a new one.
The sender's note (`message`) is read only by queries whose caller is the receiver; the
sender's views get NULL in its place.
NOTIFY payloads carry ids only (PostgreSQL caps them below 8,000 bytes).
"""

from __future__ import annotations

import datetime as dt

from umbra_grpc.domain.models import SHAREABLE_FIELDS
from umbra_grpc.storage import keyset
from umbra_grpc.storage.database import Conn, Query, Row

REQUESTS_CHANNEL = "umbra_requests"
OUTBOX_CHANNEL = "umbra_outbox"
PENDING_PAIR_INDEX = "uq_connection_requests_pending_pair"
# The outbox `last_error` of a push skipped because its request was cancelled.
CANCELLED_PUSH = "skipped: cancelled"
CONNECTION_PAIR = "uq_user_connections_pair"

_SEARCH = Query(
    """
    SELECT EXISTS (
        SELECT 1 FROM settings WHERE user_id = :caller AND accept_connections
    ) AND EXISTS (
        SELECT 1 FROM users u JOIN settings s ON s.user_id = u.id
        WHERE lower(u.umbral_name) = :handle AND u.id <> :caller
          AND u.is_active AND s.accept_connections
          AND NOT EXISTS (SELECT 1 FROM user_blocks k
                          WHERE (k.blocker_id, k.blocked_id) IN ((u.id, :caller), (:caller, u.id)))
    ) AS found
    """
)


async def search(conn: Conn, *, caller: int, handle: str) -> bool:
    """Whether `caller` (opted in) could send a request to the active, accepting `handle`
    (neither of the two blocking the other)."""
    return bool(await conn.fetchval(_SEARCH, caller=caller, handle=handle))


_SEND = Query(
    "SELECT * FROM umbra_send_request(CAST(:caller AS bigint), CAST(:handle AS text),"
    " CAST(:cap AS integer), CAST(:window AS interval), CAST(:cooldown AS interval),"
    " CAST(:ip AS inet), CAST(:ttl AS interval), CAST(:note AS text))"
)


async def send(
    conn: Conn,
    *,
    caller: int,
    handle: str,
    cap: int,
    window: dt.timedelta,
    cooldown: dt.timedelta,
    ttl: dt.timedelta,
    note: str | None,
    ip: str | None,
) -> Row | None:
    """Caller and target facts, and the new request's id and created_at when it was written.

    None when the caller has no row. When the caller does not accept connections, only the
    caller's facts are set; when the target blocks the caller, no target facts are (exactly
    as for a handle nobody has). Nothing is written unless the target exists, is active, is
    not the caller, both sides accept connections, and the flags (blocked, connected,
    pending, `resend_wait` seconds of cooldown left, recent >= cap) all clear: then
    `request_id` is set.
    """
    return await conn.fetchrow(
        _SEND,
        caller=caller,
        handle=handle,
        cap=cap,
        window=window,
        cooldown=cooldown,
        ttl=ttl,
        note=note,
        ip=ip,
    )


_AUDIT_COLUMNS = "action, actor_id, target_id, detail, ip"


def _card_column(field: str) -> str:
    """A contact-card value: copied only when the owner shares it and it is non-empty."""
    value = f"u.{field}" if field == "birthday" else f"nullif(u.{field}, '')"
    return f"CASE WHEN s.share_{field} THEN {value} END"


_CARD_FIELDS = ", ".join(SHAREABLE_FIELDS)
_CARD_VALUES = ", ".join(_card_column(field) for field in SHAREABLE_FIELDS)

# `{message}`: `r.message` where the caller is the receiver, else NULL (the sender's views).
_REQUEST_VIEW = """
    SELECT r.id, r.receiver_id, r.status, r.created_at, r.resolved_at,
           su.umbral_name AS sender_name, ss.preferred_name AS sender_preferred,
           ru.umbral_name AS receiver_name, rs.preferred_name AS receiver_preferred,
           {message} AS message
    FROM {source} r
    JOIN users su ON su.id = r.sender_id JOIN settings ss ON ss.user_id = r.sender_id
    JOIN users ru ON ru.id = r.receiver_id JOIN settings rs ON rs.user_id = r.receiver_id
"""

_RESPOND = Query(
    f"""
    WITH me AS (
        SELECT u.umbral_name, coalesce(s.preferred_name, u.umbral_name) AS display
        FROM users u JOIN settings s ON s.user_id = u.id WHERE u.id = :caller
    ),
    req AS (
        UPDATE connection_requests r
        SET status = CASE
                WHEN CAST(:action AS text) = 'reject' THEN 'rejected'
                WHEN EXISTS (SELECT 1 FROM users WHERE id = r.sender_id AND is_active)
                    THEN 'accepted'
                ELSE 'rejected'
            END,
            resolved_at = now()
        WHERE r.id = :request_id AND r.receiver_id = :caller AND r.status = 'pending'
          AND r.created_at > now() - CAST(:ttl AS interval)
        RETURNING r.id, r.sender_id, r.receiver_id, r.status, r.created_at, r.resolved_at,
                  r.message
    ),
    seen AS (
        UPDATE notifications n SET read = true FROM req
        WHERE n.source_type = 'connection_request' AND n.source_id = req.id
          AND n.user_id = req.receiver_id AND NOT n.read
        RETURNING n.id
    ),
    cards AS (
        INSERT INTO persons (owner_user_id, linked_user_id, is_umbral_contact, display_name,
                             {_CARD_FIELDS})
        SELECT pair.owner, pair.other, true, coalesce(s.preferred_name, u.umbral_name),
               {_CARD_VALUES}
        FROM req
        CROSS JOIN LATERAL (VALUES (req.receiver_id, req.sender_id),
                                   (req.sender_id, req.receiver_id)) AS pair(owner, other)
        JOIN users u ON u.id = pair.other JOIN settings s ON s.user_id = pair.other
        WHERE req.status = 'accepted'
        RETURNING id, owner_user_id, linked_user_id
    ),
    links AS (
        INSERT INTO user_connections (user_id, connected_user_id, person_id)
        SELECT owner_user_id, linked_user_id, id FROM cards
        RETURNING id, user_id, connected_user_id, person_id, created_at
    ),
    note AS (
        INSERT INTO notifications (user_id, type, title, message, data, source_type, source_id)
        SELECT req.sender_id, 'connection_accepted', 'Connection Accepted',
               me.display || ' accepted your connection request',
               jsonb_build_object('connected_umbral_name', me.umbral_name),
               'user_connection', links.id
        FROM req JOIN links ON links.user_id = req.sender_id CROSS JOIN me
        RETURNING id
    ),
    push AS (
        INSERT INTO outbox (user_id, kind, display_name, request_id)
        SELECT req.sender_id, 'request_accepted', me.display, req.id
        FROM req CROSS JOIN me WHERE req.status = 'accepted'
        RETURNING id
    ),
    audit AS (
        INSERT INTO audit_log ({_AUDIT_COLUMNS})
        SELECT CASE
                   WHEN req.status = 'accepted' THEN 'connection.accepted'
                   WHEN CAST(:action AS text) = 'reject' THEN 'connection.rejected'
                   ELSE 'connection.rejected_sender_inactive'
               END,
               CAST(:caller AS bigint), req.sender_id, jsonb_build_object('request_id', req.id),
               CAST(:ip AS inet)
        FROM req RETURNING id
    ),
    wake AS (
        SELECT pg_notify('{REQUESTS_CHANNEL}', json_build_object(
            'kind', 'resolved', 'request_id', req.id, 'receiver_id', req.receiver_id,
            'sender_id', req.sender_id)::text)
        FROM req
        UNION ALL
        SELECT pg_notify('{OUTBOX_CHANNEL}', '') FROM push
    ),
    view AS ({_REQUEST_VIEW.format(source="req", message="r.message")})
    SELECT view.*, links.id AS connection_id, links.connected_user_id, links.person_id,
           links.created_at AS connection_created_at,
           (SELECT count(*) FROM note) + (SELECT count(*) FROM push)
           + (SELECT count(*) FROM audit) + (SELECT count(*) FROM wake)
           + (SELECT count(*) FROM seen) AS side_rows
    FROM view LEFT JOIN links ON links.user_id = :caller
    """
)


async def respond(
    conn: Conn,
    *,
    caller: int,
    request_id: int,
    accept: bool,
    ttl: dt.timedelta,
    ip: str | None,
) -> Row | None:
    """Resolves a pending, unexpired request sent to `caller` and marks its notification
    read; None when there is none to resolve."""
    return await conn.fetchrow(
        _RESPOND,
        caller=caller,
        request_id=request_id,
        action="accept" if accept else "reject",
        ttl=ttl,
        ip=ip,
    )


_CANCEL = Query(
    f"""
    WITH req AS (
        UPDATE connection_requests r SET status = 'cancelled', resolved_at = now()
        WHERE r.id = :request_id AND r.sender_id = :caller AND r.status = 'pending'
          AND r.created_at > now() - CAST(:ttl AS interval)
        RETURNING r.id, r.sender_id, r.receiver_id, r.status, r.created_at, r.resolved_at
    ),
    audit AS (
        INSERT INTO audit_log ({_AUDIT_COLUMNS})
        SELECT 'connection.request_cancelled', CAST(:caller AS bigint), req.receiver_id,
               jsonb_build_object('request_id', req.id), CAST(:ip AS inet)
        FROM req RETURNING id
    ),
    withdrawn AS (
        DELETE FROM notifications n USING req
        WHERE n.source_type = 'connection_request' AND n.source_id = req.id
          AND n.user_id = req.receiver_id
        RETURNING n.id
    ),
    unsent AS (
        UPDATE outbox o
        SET status = 'skipped', completed_at = now(), last_error = '{CANCELLED_PUSH}'
        FROM req WHERE o.request_id = req.id AND o.status = 'pending'
        RETURNING o.id
    ),
    wake AS (
        SELECT pg_notify('{REQUESTS_CHANNEL}', json_build_object(
            'kind', 'cancelled', 'request_id', req.id, 'receiver_id', req.receiver_id,
            'sender_id', req.sender_id)::text)
        FROM req
    ),
    view AS ({_REQUEST_VIEW.format(source="req", message="NULL::text")})
    SELECT view.*,
           (SELECT count(*) FROM audit) + (SELECT count(*) FROM withdrawn)
           + (SELECT count(*) FROM unsent) + (SELECT count(*) FROM wake) AS side_rows
    FROM view
    """
)


async def cancel(
    conn: Conn, *, caller: int, request_id: int, ttl: dt.timedelta, ip: str | None
) -> Row | None:
    """Cancels a pending, unexpired request `caller` sent; None when there is none to cancel."""
    return await conn.fetchrow(_CANCEL, caller=caller, request_id=request_id, ttl=ttl, ip=ip)


# Unexpired: the TTL is compared at read time, so no replica shows a request past it.
_FRESH = "r.status = 'pending' AND r.created_at > now() - CAST(:ttl AS interval)"


def _pages(side: str, message: str) -> dict[bool, Query]:
    return keyset.statements(
        lambda cursor: (
            _REQUEST_VIEW.format(source="connection_requests", message=message)
            + f"""
    WHERE r.{side} = :caller AND {_FRESH} {cursor}
    ORDER BY r.created_at DESC, r.id DESC
    LIMIT :limit
    """
        ),
        alias="r",
    )


# Served by the (receiver|sender, created_at DESC, id DESC) partial indexes on pending rows.
_PAGES = {True: _pages("receiver_id", "r.message"), False: _pages("sender_id", "NULL::text")}


async def pending_page(
    conn: Conn,
    *,
    caller: int,
    incoming: bool,
    ttl: dt.timedelta,
    after: keyset.Cursor | None,
    limit: int,
) -> list[Row]:
    """Unexpired pending requests to (incoming) or from `caller`, newest first, after a
    keyset cursor; the note only on incoming ones."""
    return await keyset.page(
        conn, _PAGES[incoming], after=after, limit=limit, caller=caller, ttl=ttl
    )


SNAPSHOT_LIMIT = 1000

_SNAPSHOT = Query(
    _REQUEST_VIEW.format(source="connection_requests", message="r.message")
    + f"""
    WHERE r.receiver_id = :caller AND {_FRESH}
    ORDER BY r.created_at, r.id
    LIMIT :limit
    """
)


async def pending_for_receiver(conn: Conn, *, caller: int, ttl: dt.timedelta) -> list[Row]:
    """Every unexpired pending request to `caller`, oldest first (a watch stream's snapshot)."""
    return await conn.fetch(_SNAPSHOT, caller=caller, ttl=ttl, limit=SNAPSHOT_LIMIT)


# Events go to the receiver only (the feed reads who that is from the row), so the note too.
_BY_IDS = Query(
    _REQUEST_VIEW.format(source="connection_requests", message="r.message")
    + " WHERE r.id = ANY(CAST(:ids AS bigint[]))"
)


async def by_ids(conn: Conn, ids: list[int]) -> list[Row]:
    """Requests by id, in any order (one query for a whole batch of events)."""
    return await conn.fetch(_BY_IDS, ids=ids)
