"""The invariants of SPEC 2 (I1-I5) and SPEC 11's block rule, checked by SQL against the rows a
scenario left behind.

Each check is an async function taking an asyncpg connection and returning its violations as
sentences that name the rows (an empty list when it holds); `check_all` runs them all. They
only read, so any scenario can call them afterwards: the fuzzer, race tests, a failover test.

What the rows can tell, and how:
- I1, I2: directly (pending pairs; connection rows, their mirrors, duplicates).
- I3: requests to one receiver are serialized by the lock on the receiver's row, so a lower
  request id was committed before a higher one was checked; and the cap check of request R
  counted the requests still pending in its snapshot that were created in
  [R.created_at - window, R.created_at] (`now()` is R's `created_at`). A request Q was
  certainly still pending in that snapshot when it is pending now, or when the audit row of
  its resolution has a higher id than R's `request_sent` audit row (written after R's check,
  in the same statement). Counting only those gives no false alarm; R violates I3 when at
  least `cap` of them precede it.
- I4: an accept writes its two contact cards in the statement that sets `resolved_at`, so
  the cards carry `created_at = resolved_at` (and the connection rows too). Removal deletes
  the rows and detaches the cards, so what must hold is: every accepted request has exactly
  one card per side, linked to the other side while the pair is connected by that accept and
  detached otherwise; every connection row comes from the pair's latest accept.
- I5: every request has its `connection.request_sent` audit row, every resolution its
  one resolution row by the party allowed to resolve it, and every pair has one
  `connection.removed` row per accept that is no longer connected. Mutations that leave no
  other trace (settings, sharing overrides) can only be counted by the scenario itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

import asyncpg

Violations = list[str]

# The audit actions that record each way a request leaves pending, each with who may do it
# (None: the service itself, no actor: expiry).
RESOLUTIONS: dict[str, dict[str, str | None]] = {
    "accepted": {"connection.accepted": "receiver"},
    "rejected": {
        "connection.rejected": "receiver",
        "connection.rejected_sender_inactive": "receiver",
    },
    "cancelled": {
        "connection.request_cancelled": "sender",
        # The receiver blocked the sender (SPEC 11).
        "connection.request_cancelled_by_receiver": "receiver",
    },
    "expired": {"connection.request_expired": None},
}
SENT = "connection.request_sent"
REMOVED = "connection.removed"


async def i1_one_pending_request_per_pair(conn: asyncpg.Connection) -> Violations:
    """I1: at most one pending request per unordered pair of users."""
    rows = await conn.fetch(
        """
        SELECT least(sender_id, receiver_id) AS a, greatest(sender_id, receiver_id) AS b,
               array_agg(id ORDER BY id) AS ids
        FROM connection_requests WHERE status = 'pending'
        GROUP BY 1, 2 HAVING count(*) > 1
        """
    )
    return [
        f"I1: requests {list(row['ids'])} are all pending between users {row['a']} and {row['b']}"
        for row in rows
    ]


async def i2_connections_are_symmetric(conn: asyncpg.Connection) -> Violations:
    """I2: a connection row A->B exists iff B->A does; no duplicates, no self-connection."""
    found: Violations = []
    for row in await conn.fetch(
        """
        SELECT c.id, c.user_id, c.connected_user_id FROM user_connections c
        WHERE NOT EXISTS (SELECT 1 FROM user_connections m
                          WHERE m.user_id = c.connected_user_id
                            AND m.connected_user_id = c.user_id)
        """
    ):
        found.append(
            f"I2: connection {row['id']} ({row['user_id']} -> {row['connected_user_id']})"
            " has no mirror row"
        )
    for row in await conn.fetch(
        """
        SELECT user_id, connected_user_id, array_agg(id ORDER BY id) AS ids
        FROM user_connections GROUP BY 1, 2 HAVING count(*) > 1
        """
    ):
        found.append(
            f"I2: connections {list(row['ids'])} all join {row['user_id']} -> "
            f"{row['connected_user_id']}"
        )
    for row in await conn.fetch(
        "SELECT id, user_id FROM user_connections WHERE user_id = connected_user_id"
    ):
        found.append(f"I2: connection {row['id']} joins user {row['user_id']} to themselves")
    return found


# Per request: the id of its request_sent audit row and of its first resolution audit row.
_REQUEST_AUDITS = f"""
    SELECT CAST(detail->>'request_id' AS bigint) AS request_id,
           min(id) FILTER (WHERE action = '{SENT}') AS sent_audit,
           min(id) FILTER (WHERE action <> '{SENT}') AS resolved_audit
    FROM audit_log WHERE detail ? 'request_id' GROUP BY 1
"""


async def i3_pending_cap_per_window(
    conn: asyncpg.Connection, *, cap: int, window: dt.timedelta
) -> Violations:
    """I3: no request was admitted while `cap` requests to its receiver created within
    `window` before it were certainly pending (see the module docstring)."""
    rows = await conn.fetch(
        f"""
        WITH audits AS ({_REQUEST_AUDITS}),
        req AS (
            SELECT r.id, r.receiver_id, r.created_at, r.status, a.sent_audit, a.resolved_audit
            FROM connection_requests r LEFT JOIN audits a ON a.request_id = r.id
        )
        SELECT r.id, r.receiver_id, array_agg(q.id ORDER BY q.id) AS before
        FROM req r JOIN req q
          ON q.receiver_id = r.receiver_id AND q.id < r.id
         AND q.created_at >= r.created_at - $2::interval
         AND (q.status = 'pending' OR q.resolved_audit > r.sent_audit)
        GROUP BY r.id, r.receiver_id
        HAVING count(*) >= $1
        """,
        cap,
        window,
    )
    return [
        f"I3: request {row['id']} to user {row['receiver_id']} was admitted while "
        f"{len(row['before'])} requests {list(row['before'])} (cap {cap}) created within "
        f"{window.total_seconds():g}s before it were pending"
        for row in rows
    ]


async def i4_resolution_and_accept_rows(conn: asyncpg.Connection) -> Violations:
    """I4: resolved_at iff resolved; an accept made exactly two cards and two rows."""
    found: Violations = []
    for row in await conn.fetch(
        """
        SELECT id, status, created_at, resolved_at FROM connection_requests
        WHERE (status = 'pending') <> (resolved_at IS NULL) OR resolved_at < created_at
        """
    ):
        found.append(
            f"I4: request {row['id']} is {row['status']} with resolved_at {row['resolved_at']}"
            f" (created {row['created_at']})"
        )
    # Every accepted request: one card per side, created with the accept; linked to the other
    # side exactly while the pair is connected by this (their latest) accept.
    for row in await conn.fetch(
        """
        WITH accepted AS (
            SELECT r.id, r.sender_id, r.receiver_id, r.resolved_at,
                   r.resolved_at = max(r.resolved_at) OVER (
                       PARTITION BY least(r.sender_id, r.receiver_id),
                                    greatest(r.sender_id, r.receiver_id)) AS latest
            FROM connection_requests r WHERE r.status = 'accepted'
        ),
        sides AS (
            SELECT a.*, side.owner, side.other, EXISTS (
                       SELECT 1 FROM user_connections c
                       WHERE c.user_id = side.owner AND c.connected_user_id = side.other
                         AND c.created_at = a.resolved_at) AS connected
            FROM accepted a CROSS JOIN LATERAL (VALUES (a.sender_id, a.receiver_id),
                                                      (a.receiver_id, a.sender_id))
                 AS side(owner, other)
        )
        SELECT s.id, s.owner, s.other, s.latest, s.connected,
               count(p.id) AS cards,
               count(p.id) FILTER (WHERE p.linked_user_id = s.other
                                     AND p.is_umbral_contact) AS linked,
               count(p.id) FILTER (WHERE p.linked_user_id IS NULL
                                     AND NOT p.is_umbral_contact) AS detached
        FROM sides s
        LEFT JOIN persons p ON p.owner_user_id = s.owner AND p.created_at = s.resolved_at
        GROUP BY s.id, s.owner, s.other, s.latest, s.connected
        """
    ):
        where = f"accepted request {row['id']}: user {row['owner']}'s card for {row['other']}"
        if row["cards"] != 1:
            found.append(f"I4: {where}: {row['cards']} cards, expected 1")
        elif row["connected"] and not row["linked"]:
            found.append(f"I4: {where} is not linked while they are connected")
        elif not row["connected"] and not row["detached"]:
            found.append(f"I4: {where} is not detached while they are not connected")
        if row["connected"] and not row["latest"]:
            found.append(f"I4: {where}: connected by an accept that is not the pair's latest")
    # Every card comes from an accept; every connection row from the pair's accept, pointing
    # at the card its owner got then.
    for row in await conn.fetch(
        """
        SELECT p.id, p.owner_user_id FROM persons p
        WHERE NOT EXISTS (
            SELECT 1 FROM connection_requests r
            WHERE r.status = 'accepted' AND r.resolved_at = p.created_at
              AND p.owner_user_id IN (r.sender_id, r.receiver_id))
        """
    ):
        found.append(f"I4: card {row['id']} of user {row['owner_user_id']} comes from no accept")
    for row in await conn.fetch(
        """
        SELECT c.id, c.user_id, c.connected_user_id FROM user_connections c
        LEFT JOIN persons p ON p.id = c.person_id
        WHERE p.owner_user_id IS DISTINCT FROM c.user_id
           OR p.linked_user_id IS DISTINCT FROM c.connected_user_id
           OR NOT p.is_umbral_contact
           OR p.created_at <> c.created_at
           OR NOT EXISTS (
               SELECT 1 FROM connection_requests r
               WHERE r.status = 'accepted' AND r.resolved_at = c.created_at
                 AND least(r.sender_id, r.receiver_id) = least(c.user_id, c.connected_user_id)
                 AND greatest(r.sender_id, r.receiver_id)
                     = greatest(c.user_id, c.connected_user_id))
        """
    ):
        found.append(
            f"I4: connection {row['id']} ({row['user_id']} -> {row['connected_user_id']}) has"
            " no accepted request or not its owner's linked card from that accept"
        )
    return found


async def blocked_pairs_hold_nothing(conn: asyncpg.Connection) -> Violations:
    """SPEC 11: a blocked pair holds no pending request and no connection."""
    rows = await conn.fetch(
        """
        SELECT k.blocker_id, k.blocked_id FROM user_blocks k
        WHERE EXISTS (SELECT 1 FROM connection_requests r WHERE r.status = 'pending'
                      AND least(r.sender_id, r.receiver_id) = least(k.blocker_id, k.blocked_id)
                      AND greatest(r.sender_id, r.receiver_id)
                          = greatest(k.blocker_id, k.blocked_id))
           OR EXISTS (SELECT 1 FROM user_connections c
                      WHERE (c.user_id, c.connected_user_id)
                            IN ((k.blocker_id, k.blocked_id), (k.blocked_id, k.blocker_id)))
        """
    )
    return [
        f"blocks: user {row['blocker_id']} blocks user {row['blocked_id']}, yet the two have a"
        " pending request or a connection"
        for row in rows
    ]


async def i5_mutations_are_audited(conn: asyncpg.Connection) -> Violations:
    """I5: request sent, resolved and connection removed each have their audit row."""
    found: Violations = []
    for row in await conn.fetch(
        f"""
        WITH sent AS (
            SELECT CAST(detail->>'request_id' AS bigint) AS request_id, count(*) AS rows,
                   min(actor_id) AS actor_id, min(target_id) AS target_id
            FROM audit_log WHERE action = '{SENT}' GROUP BY 1
        )
        SELECT r.id, s.request_id, r.sender_id, r.receiver_id, s.actor_id, s.target_id,
               s.rows
        FROM connection_requests r FULL JOIN sent s ON s.request_id = r.id
        WHERE r.id IS NULL OR s.request_id IS NULL OR s.rows <> 1
           OR s.actor_id IS DISTINCT FROM r.sender_id
           OR s.target_id IS DISTINCT FROM r.receiver_id
        """
    ):
        if row["id"] is None:
            found.append(f"I5: {SENT} audit row for request {row['request_id']}, which is absent")
        else:
            found.append(
                f"I5: request {row['id']} ({row['sender_id']} -> {row['receiver_id']}) has "
                f"{row['rows'] or 0} {SENT} audit rows, expected one by its sender for its "
                f"receiver (actor {row['actor_id']}, target {row['target_id']})"
            )
    resolutions = sorted({action for actions in RESOLUTIONS.values() for action in actions})
    rows = await conn.fetch(
        """
        SELECT r.id, r.status, r.sender_id, r.receiver_id,
               coalesce(array_agg(a.action ORDER BY a.id)
                        FILTER (WHERE a.id IS NOT NULL), '{}') AS actions,
               coalesce(array_agg(a.actor_id ORDER BY a.id)
                        FILTER (WHERE a.id IS NOT NULL), '{}') AS actors
        FROM connection_requests r
        LEFT JOIN audit_log a ON a.action = ANY($1::text[])
                             AND a.detail->>'request_id' = CAST(r.id AS text)
        GROUP BY r.id
        """,
        resolutions,
    )
    for row in rows:
        found.extend(_resolution_violations(row))
    for row in await conn.fetch(
        f"""
        WITH pairs AS (
            SELECT least(sender_id, receiver_id) AS a, greatest(sender_id, receiver_id) AS b,
                   count(*) AS accepts
            FROM connection_requests WHERE status = 'accepted' GROUP BY 1, 2
        ),
        removals AS (
            SELECT least(actor_id, target_id) AS a, greatest(actor_id, target_id) AS b,
                   count(*) AS removed
            FROM audit_log WHERE action = '{REMOVED}' GROUP BY 1, 2
        )
        SELECT coalesce(p.a, r.a) AS a, coalesce(p.b, r.b) AS b,
               coalesce(p.accepts, 0) AS accepts, coalesce(r.removed, 0) AS removed,
               EXISTS (SELECT 1 FROM user_connections c
                       WHERE c.user_id = coalesce(p.a, r.a)
                         AND c.connected_user_id = coalesce(p.b, r.b)) AS connected
        FROM pairs p FULL JOIN removals r ON r.a = p.a AND r.b = p.b
        """
    ):
        expected = row["accepts"] - (1 if row["connected"] else 0)
        if row["removed"] != expected:
            found.append(
                f"I5: users {row['a']} and {row['b']}: {row['accepts']} accepts, "
                f"{'' if row['connected'] else 'not '}connected now, but {row['removed']} "
                f"{REMOVED} audit rows (expected {expected})"
            )
    return found


def _resolution_violations(row: asyncpg.Record) -> Violations:
    actions, actors = list(row["actions"]), list(row["actors"])
    where = f"request {row['id']} ({row['status']})"
    if row["status"] == "pending":
        return [f"I5: {where} has resolution audit rows {actions}"] if actions else []
    if row["status"] not in RESOLUTIONS:
        return [f"I5: {where}: no rule for status {row['status']!r}"]
    allowed = RESOLUTIONS[row["status"]]
    if len(actions) != 1 or actions[0] not in allowed:
        return [
            f"I5: {where} has resolution audit rows {actions}, expected one of {sorted(allowed)}"
        ]
    party = allowed[actions[0]]
    if actors[0] != (None if party is None else row[f"{party}_id"]):
        return [f"I5: {where} was resolved by user {actors[0]}, not its {party or 'service'}"]
    return []


Check = Callable[[asyncpg.Connection], Awaitable[Violations]]


async def check_all(
    conn: asyncpg.Connection, *, cap: int = 5, window: dt.timedelta = dt.timedelta(minutes=10)
) -> Violations:
    """Every invariant's violations; `cap` and `window` are the server's pending cap settings."""
    checks: list[Check] = [
        i1_one_pending_request_per_pair,
        i2_connections_are_symmetric,
        lambda c: i3_pending_cap_per_window(c, cap=cap, window=window),
        i4_resolution_and_accept_rows,
        i5_mutations_are_audited,
        blocked_pairs_hold_nothing,
    ]
    found: Violations = []
    for check in checks:
        found.extend(await check(conn))
    return found
