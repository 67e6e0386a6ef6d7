"""The end-of-run checks, in SQL on the primary: invariants I1-I5, nothing acknowledged lost,
watchers in sync, pushes delivered."""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg

from cluster.scenario import WATCHERS, Ledger

# I1: at most one pending request per unordered pair.
I1 = """
SELECT count(*) FROM (
    SELECT 1 FROM connection_requests WHERE status = 'pending'
    GROUP BY least(sender_id, receiver_id), greatest(sender_id, receiver_id)
    HAVING count(*) > 1) twice
"""
# I2: every connection row has its mirror, and no pair twice.
I2 = """
SELECT (SELECT count(*) FROM user_connections a WHERE NOT EXISTS (
            SELECT 1 FROM user_connections b
            WHERE b.user_id = a.connected_user_id AND b.connected_user_id = a.user_id))
     + (SELECT count(*) FROM (SELECT 1 FROM user_connections
                              GROUP BY user_id, connected_user_id HAVING count(*) > 1) d)
"""
# I3: when each request was created, its receiver had at most `cap` pending requests created
# within the window before it (itself included).
I3 = """
SELECT count(*) FROM connection_requests r
WHERE (SELECT count(*) FROM connection_requests o
       WHERE o.receiver_id = r.receiver_id
         AND o.created_at <= r.created_at
         AND o.created_at > r.created_at - make_interval(secs => $2)
         AND (o.resolved_at IS NULL OR o.resolved_at > r.created_at)) > $1
"""
# I4: resolved exactly when not pending; every accepted request has its two contact cards
# and one accept audit row.
I4 = """
SELECT (SELECT count(*) FROM connection_requests
        WHERE (status = 'pending') <> (resolved_at IS NULL))
     + abs((SELECT count(*) FROM persons)
           - 2 * (SELECT count(*) FROM connection_requests WHERE status = 'accepted'))
     + (SELECT count(*) FROM connection_requests r WHERE r.status = 'accepted'
        AND (SELECT count(*) FROM audit_log a WHERE a.action = 'connection.accepted'
             AND (a.detail->>'request_id')::bigint = r.id) <> 1)
"""
# I5: one audit row per successful mutation.
I5_AUDIT = "SELECT action, count(*) FROM audit_log GROUP BY action"
STATUSES = "SELECT id, status, sender_id, receiver_id FROM connection_requests"
CONNECTION_IDS = "SELECT id FROM user_connections"
PENDING_FOR = "SELECT id FROM connection_requests WHERE status = 'pending' AND receiver_id = $1"
OUTBOX = """
SELECT o.status, s.ntfy_topic, count(*) FROM outbox o JOIN settings s USING (user_id)
GROUP BY 1, 2
"""


async def invariants(conn: asyncpg.Connection, cap: int, window: float) -> dict[str, int]:
    """Violations of I1-I5 (0 everywhere when they hold)."""
    statuses = Counter(row["status"] for row in await conn.fetch(STATUSES))
    audit = {row["action"]: row["count"] for row in await conn.fetch(I5_AUDIT)}
    rows = await conn.fetchval("SELECT count(*) FROM user_connections")
    expected_audit = {
        "connection.request_sent": sum(statuses.values()),
        "connection.accepted": statuses["accepted"],
        "connection.rejected": statuses["rejected"],
        "connection.request_cancelled": statuses["cancelled"],
        "connection.removed": statuses["accepted"] - rows // 2,
    }
    return {
        "I1": int(await conn.fetchval(I1)),
        "I2": int(await conn.fetchval(I2)),
        "I3": int(await conn.fetchval(I3, cap, window)),
        "I4": int(await conn.fetchval(I4)),
        "I5": sum(abs(audit.get(a, 0) - n) for a, n in expected_audit.items()),
    }


async def lost_writes(conn: asyncpg.Connection, ledger: Ledger) -> list[str]:
    """Acknowledged writes the database does not show."""
    rows = {row["id"]: row for row in await conn.fetch(STATUSES)}
    lost = [f"request {i} sent" for i in ledger.sent if i not in rows]
    for ids, status in (
        (ledger.accepted, "accepted"),
        (ledger.rejected, "rejected"),
        (ledger.cancelled, "cancelled"),
    ):
        lost += [f"request {i} {status}" for i in ids if rows.get(i, {}).get("status") != status]
    present = {row["id"] for row in await conn.fetch(CONNECTION_IDS)}
    lost += [f"connection {i} removed" for i in ledger.removed if i in present]
    return lost


def unacknowledged(rows: list[Any], ledger: Ledger) -> list[int]:
    """Requests in the database the driver never saw acknowledged, outside ambiguous pairs."""
    return [
        row["id"]
        for row in rows
        if row["id"] not in ledger.sent
        and frozenset((row["sender_id"], row["receiver_id"])) not in ledger.ambiguous_pairs
    ]


async def watchers_in_sync(
    conn: asyncpg.Connection, seen: dict[int, set[int]], view: dict[int, set[int]]
) -> dict[str, int]:
    """Requests a watcher never heard of, and watchers whose pending view is wrong."""
    rows = await conn.fetch(STATUSES)
    unknown = sum(
        1
        for row in rows
        if row["receiver_id"] in seen and row["id"] not in seen[row["receiver_id"]]
    )
    wrong_views = 0
    for user in WATCHERS:
        truth = {row["id"] for row in await conn.fetch(PENDING_FOR, user)}
        wrong_views += truth != view[user]
    return {"requests_unknown_to_their_watcher": unknown, "watchers_with_wrong_view": wrong_views}


async def pushes(conn: asyncpg.Connection, received: Counter[str]) -> dict[str, int]:
    """Outbox rows not delivered, and topics that got fewer POSTs than rows sent to them."""
    undelivered = 0
    short = 0
    rows = 0
    for row in await conn.fetch(OUTBOX):
        rows += row["count"]
        if row["status"] in ("pending", "failed"):
            undelivered += row["count"]
        elif row["status"] == "sent" and received[row["ntfy_topic"]] < row["count"]:
            short += 1
    return {
        "outbox_rows": rows,
        "undelivered": undelivered,
        "topics_short_of_posts": short,
        "posts_received": sum(received.values()),
    }
