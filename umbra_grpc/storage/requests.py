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
Their NOTIFYs follow `umbra_grpc.storage.notify`.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from umbra_grpc.records import SHAREABLE_FIELDS, RequestView
from umbra_grpc.storage import keyset
from umbra_grpc.storage.database import Conn, Query, Row, record
from umbra_grpc.storage.notify import WAKE_OUTBOX, request_event

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


class SendFacts(NamedTuple):
    """What `umbra_send_request` found (its result columns, migration 0004), and the request
    it wrote, if it did. The caller's facts are always set; the target's only when the
    caller accepts connections and the handle is someone's (someone who does not block the
    caller)."""

    caller_accepts: bool
    target_id: int | None
    target_active: bool | None
    target_accepts: bool | None
    blocked: bool | None
    connected: bool | None
    pending: bool | None
    resend_wait: float | None
    """Seconds of resend cooldown left, or None."""
    request: RequestView | None
    """The request written, as its sender sees it (no note), or None."""


class Link(NamedTuple):
    """The caller's side of the connection an accepted request made."""

    id: int
    connected_user_id: int
    person_id: int
    created_at: dt.datetime


class Resolved(NamedTuple):
    """A request Respond resolved, and the caller's side of the connection it made, if any."""

    request: RequestView
    link: Link | None


class Addressed(NamedTuple):
    """A request and who received it (the watch feed's batch lookup)."""

    receiver_id: int
    request: RequestView


def _send_facts(row: Row) -> SendFacts:
    request = None
    if row["request_id"] is not None:  # then every target fact is set too
        request = RequestView(
            row["request_id"],
            "pending",
            row["caller_name"],
            row["caller_preferred"],
            row["target_name"],
            row["target_preferred"],
            row["request_created_at"],
            None,
            None,  # the sender's view
        )
    return SendFacts(
        row["caller_accepts"],
        row["target_id"],
        row["target_active"],
        row["target_accepts"],
        row["blocked"],
        row["connected"],
        row["pending"],
        row["resend_wait"],
        request,
    )


# Every statement's view of requests (`_REQUEST_VIEW`) as RequestView.
_request_view = record(
    RequestView,
    (
        "id",
        "status",
        "sender_name",
        "sender_preferred",
        "receiver_name",
        "receiver_preferred",
        "created_at",
        "resolved_at",
        "message",
    ),
)

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
) -> SendFacts | None:
    """Caller and target facts, and the new request's id and created_at when it was written.

    None when the caller has no row. When the caller does not accept connections, only the
    caller's facts are set; when the target blocks the caller, no target facts are (exactly
    as for a handle nobody has). Nothing is written unless the target exists, is active, is
    not the caller, both sides accept connections, and the flags (blocked, connected,
    pending, `resend_wait` seconds of cooldown left, recent >= cap) all clear: then
    `request_id` is set.
    """
    row = await conn.fetchrow(
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
    return _send_facts(row) if row is not None else None


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
        SELECT {request_event("'resolved'", "req")} FROM req
        UNION ALL
        SELECT {WAKE_OUTBOX} FROM push
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
) -> Resolved | None:
    """Resolves a pending, unexpired request sent to `caller` and marks its notification
    read; None when there is none to resolve."""
    row = await conn.fetchrow(
        _RESPOND,
        caller=caller,
        request_id=request_id,
        action="accept" if accept else "reject",
        ttl=ttl,
        ip=ip,
    )
    if row is None:
        return None
    link = None
    if row["connection_id"] is not None:
        link = Link(
            row["connection_id"],
            row["connected_user_id"],
            row["person_id"],
            row["connection_created_at"],
        )
    return Resolved(_request_view(row), link)


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
        SELECT {request_event("'cancelled'", "req")} FROM req
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
) -> RequestView | None:
    """Cancels a pending, unexpired request `caller` sent; None when there is none to cancel."""
    row = await conn.fetchrow(_CANCEL, caller=caller, request_id=request_id, ttl=ttl, ip=ip)
    return _request_view(row) if row is not None else None


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
) -> list[RequestView]:
    """Unexpired pending requests to (incoming) or from `caller`, newest first, after a
    keyset cursor; the note only on incoming ones."""
    rows = await keyset.page(
        conn, _PAGES[incoming], after=after, limit=limit, caller=caller, ttl=ttl
    )
    return [_request_view(row) for row in rows]


SNAPSHOT_LIMIT = 1000

_SNAPSHOT = Query(
    _REQUEST_VIEW.format(source="connection_requests", message="r.message")
    + f"""
    WHERE r.receiver_id = :caller AND {_FRESH}
    ORDER BY r.created_at, r.id
    LIMIT :limit
    """
)


async def pending_for_receiver(conn: Conn, *, caller: int, ttl: dt.timedelta) -> list[RequestView]:
    """Every unexpired pending request to `caller`, oldest first (a watch stream's snapshot)."""
    rows = await conn.fetch(_SNAPSHOT, caller=caller, ttl=ttl, limit=SNAPSHOT_LIMIT)
    return [_request_view(row) for row in rows]


# Events go to the receiver only (the feed reads who that is from the row), so the note too.
_BY_IDS = Query(
    _REQUEST_VIEW.format(source="connection_requests", message="r.message")
    + " WHERE r.id = ANY(CAST(:ids AS bigint[]))"
)


async def by_ids(conn: Conn, ids: list[int]) -> list[Addressed]:
    """Requests by id and their receivers, in any order (one query for a whole batch of
    events)."""
    rows = await conn.fetch(_BY_IDS, ids=ids)
    return [Addressed(row["receiver_id"], _request_view(row)) for row in rows]
