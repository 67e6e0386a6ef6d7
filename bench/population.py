"""Who exists in a bench database, seeded in bulk with `generate_series`, and the call plans.

User ids are laid out in blocks, one per purpose, so that no phase disturbs another (a
request accepted by the Respond phase never meets a pair the SendRequest phase uses):

| block | ids | what they have |
|---|---|---|
| callers | 1..256 | nothing: Echo and Search callers |
| listers | 1001..1064 | `list_size` connections to partners and as many pending incoming requests |
| partners | 2001.. | the other side of the listers' connections (Search finds them) |
| list senders | 3001.. | senders of the listers' pending requests |
| senders | 4001..4256 | SendRequest callers |
| responders | 5001..5256 | pending requests from `responder senders` (Respond ACCEPT) |
| responder senders | 6001.. | |
| removers | 7001..7256 | connections to `remover partners` (RemoveConnection) |
| remover partners | 8001.. | |
| floor callers | 9001..9016 | callers of the timing-floor tests; 9003 blocks 9002 |
| watch senders | 9101..9300 | SendRequest callers of the watch test |
| pages | 9501, 9502 | `small_list` and `large_list` notifications |
| blockers | 9601..9856 | BlockUser callers |
| receivers | 100001.. | fresh SendRequest receivers (5 requests each: the pending cap) |
| watchers | 200001.. | WatchIncomingRequests callers |
| block targets | 300001.. | one pending request each to a blocker (BlockUser sweeps it) |

Every user is active, accepts requests and shares email, phone and company. Rows go in with
`session_replication_role = replica` (the seed is consistent by construction): triggers off,
so the pair guard of migration 0004 does not take one advisory lock per seeded request and
connection in one transaction (tens of thousands would exhaust the lock table). The seeded
database is a template: each server of a run gets its own copy (`CREATE DATABASE ...
TEMPLATE`), so that one server's outbox worker never delivers another's rows and every
server has all the requests and connections to consume.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Awaitable

import asyncpg
from google.protobuf.message import Message

from umbra_grpc.pb import connections_pb2 as pb

POOL = 256
LISTERS = range(1001, 1065)
PARTNERS_FROM = 2001
LIST_SENDERS_FROM = 3001
SENDERS = range(4001, 4001 + POOL)
RESPONDERS = range(5001, 5001 + POOL)
RESPONDER_SENDERS_FROM = 6001
REMOVERS = range(7001, 7001 + POOL)
REMOVER_PARTNERS_FROM = 8001
CALLERS = range(1, 1 + POOL)
FLOOR_CALLERS = range(9001, 9017)
WATCH_SENDERS = range(9101, 9301)
SMALL_PAGES_USER = 9501
LARGE_PAGES_USER = 9502
BLOCKERS = range(9601, 9601 + POOL)
BLOCK_TARGETS_FROM = 300_001
# The timing-floor cast of the block comparisons: FLOOR_BLOCKER blocks FLOOR_BLOCKED;
# FLOOR_BLOCKING_CALLER blocks FLOOR_BLOCK_TARGET (an existing handle) again and again.
FLOOR_BLOCKED, FLOOR_BLOCKER = 9002, 9003
FLOOR_BLOCKING_CALLER, FLOOR_BLOCK_TARGET = 9004, 9005
RELATIONSHIP_HANDLES = 20  # per GetRelationships call: a screenful of a list
RECEIVERS_FROM = 100_001
WATCHERS_FROM = 200_001
PENDING_CAP = 5
NOT_FOUND_HANDLE = "user0000"  # never created; as long as "user2001"

Item = tuple[int, bytes]


def handle(user_id: int) -> str:
    return f"user{user_id}"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much of everything a run seeds."""

    list_size: int  # connections and pending requests per lister (pages of 50 need >= 51)
    sends: int  # SendRequest items
    responds: int  # pending requests to accept
    removes: int  # connections to remove
    watchers: int  # users with a watch stream in the latency test
    idle_streams: int  # streams open for the RSS figure (5 per user, after the watchers')
    small_list: int
    large_list: int
    blocks: int  # BlockUser items (each sweeps a pending request)

    @property
    def receivers(self) -> int:
        return math.ceil(self.sends / PENDING_CAP)

    @property
    def idle_users(self) -> int:
        return math.ceil(self.idle_streams / PENDING_CAP)


async def _users(conn: asyncpg.Connection, first: int, count: int) -> None:
    if count <= 0:
        return
    await conn.execute(
        """
        INSERT INTO users (id, umbral_name, is_active, email, phone, company, job_title)
        SELECT g, 'user' || g, true, 'user' || g || '@example.org', '+1555' || g,
               'Company ' || (g % 97), 'Engineer'
        FROM generate_series($1::bigint, $2::bigint) AS g
        """,
        first,
        first + count - 1,
    )
    await conn.execute(
        """
        INSERT INTO settings (user_id, accept_connections, preferred_name,
                              share_email, share_phone, share_company)
        SELECT g, true, 'User ' || g, true, true, true
        FROM generate_series($1::bigint, $2::bigint) AS g
        """,
        first,
        first + count - 1,
    )


async def _pending(
    conn: asyncpg.Connection, receivers: range, senders_from: int, per_receiver: int
) -> None:
    """Pending requests: each receiver from `per_receiver` distinct senders."""
    await conn.execute(
        """
        INSERT INTO connection_requests (sender_id, receiver_id, created_at)
        SELECT s, r, now() - (s - $3) * interval '1 ms' - (r % 1000) * interval '1 us'
        FROM generate_series($1::bigint, $2::bigint) AS r,
             generate_series($3::bigint, $3::bigint + $4 - 1) AS s
        """,
        receivers.start,
        receivers.stop - 1,
        senders_from,
        per_receiver,
    )


async def _connected(
    conn: asyncpg.Connection, owners: range, partners_from: int, per_owner: int
) -> None:
    """Connections, as Respond makes them: two cards and two directed rows per pair."""
    await conn.execute(
        """
        WITH pairs AS (
            SELECT a, b FROM generate_series($1::bigint, $2::bigint) AS a,
                             generate_series($3::bigint, $3::bigint + $4 - 1) AS b
        ),
        cards AS (
            INSERT INTO persons (owner_user_id, linked_user_id, is_umbral_contact,
                                 display_name, email, phone, company)
            SELECT p.owner, p.other, true, 'User ' || p.other, 'user' || p.other
                   || '@example.org', '+1555' || p.other, 'Company ' || (p.other % 97)
            FROM pairs CROSS JOIN LATERAL (VALUES (a, b), (b, a)) AS p(owner, other)
            RETURNING id, owner_user_id, linked_user_id
        )
        INSERT INTO user_connections (user_id, connected_user_id, person_id, created_at)
        SELECT owner_user_id, linked_user_id, id,
               now() - (id % 100000) * interval '1 ms'
        FROM cards
        """,
        owners.start,
        owners.stop - 1,
        partners_from,
        per_owner,
    )


async def _notifications(conn: asyncpg.Connection, user_id: int, count: int) -> None:
    await conn.execute(
        """
        INSERT INTO notifications (user_id, type, title, message, data, source_type,
                                   source_id, created_at)
        SELECT $1, 'connection_request', 'New Connection Request',
               'User ' || g || ' wants to connect with you',
               jsonb_build_object('sender_umbral_name', 'user' || g),
               'connection_request', g, now() - g * interval '1 second'
        FROM generate_series(1, $2::bigint) AS g
        """,
        user_id,
        count,
    )


async def _block_requests(conn: asyncpg.Connection, count: int) -> None:
    """A pending request from each block target to a blocker (round robin)."""
    await conn.execute(
        """
        INSERT INTO connection_requests (sender_id, receiver_id, created_at)
        SELECT $1 + g, $2 + g % $3, now() - g * interval '1 ms'
        FROM generate_series(0, $4 - 1) AS g
        """,
        BLOCK_TARGETS_FROM,
        BLOCKERS.start,
        len(BLOCKERS),
        count,
    )


async def seed(url: str, sizes: Sizes) -> dict[str, float]:
    """Creates everything but the large list in one go; returns seconds per step."""
    timings: dict[str, float] = {}
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")  # see the docstring
        responder_senders = math.ceil(sizes.responds / POOL)
        remover_partners = math.ceil(sizes.removes / POOL)

        async def step(name: str, coroutine: Awaitable[object]) -> None:
            started = time.perf_counter()
            await coroutine
            timings[name] = round(time.perf_counter() - started, 2)

        async def users() -> None:
            for first, count in (
                (CALLERS.start, len(CALLERS)),
                (LISTERS.start, len(LISTERS)),
                (PARTNERS_FROM, sizes.list_size),
                (LIST_SENDERS_FROM, sizes.list_size),
                (SENDERS.start, len(SENDERS)),
                (RESPONDERS.start, len(RESPONDERS)),
                (RESPONDER_SENDERS_FROM, responder_senders),
                (REMOVERS.start, len(REMOVERS)),
                (REMOVER_PARTNERS_FROM, remover_partners),
                (FLOOR_CALLERS.start, len(FLOOR_CALLERS)),
                (WATCH_SENDERS.start, len(WATCH_SENDERS)),
                (SMALL_PAGES_USER, 2),
                (RECEIVERS_FROM, sizes.receivers),
                (WATCHERS_FROM, sizes.watchers + sizes.idle_users),
                (BLOCKERS.start, len(BLOCKERS)),
                (BLOCK_TARGETS_FROM, sizes.blocks),
            ):
                await _users(conn, first, count)

        await step("users", users())
        await step("list_requests", _pending(conn, LISTERS, LIST_SENDERS_FROM, sizes.list_size))
        await step("list_connections", _connected(conn, LISTERS, PARTNERS_FROM, sizes.list_size))
        await step(
            "respond_requests",
            _pending(conn, RESPONDERS, RESPONDER_SENDERS_FROM, responder_senders),
        )
        await step(
            "remove_connections",
            _connected(conn, REMOVERS, REMOVER_PARTNERS_FROM, remover_partners),
        )
        await step("small_list", _notifications(conn, SMALL_PAGES_USER, sizes.small_list))
        await step("block_requests", _block_requests(conn, sizes.blocks))
        await step(
            "floor_block",
            conn.execute(
                "INSERT INTO user_blocks (blocker_id, blocked_id) VALUES ($1, $2)",
                FLOOR_BLOCKER,
                FLOOR_BLOCKED,
            ),
        )
        await step("analyze", conn.execute("VACUUM ANALYZE"))
    finally:
        await conn.close()
    return timings


async def seed_large_list(url: str, sizes: Sizes) -> float:
    """The large notification list (only the database that serves the pagination test)."""
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")
        await _notifications(conn, LARGE_PAGES_USER, sizes.large_list)
        await conn.execute("VACUUM ANALYZE notifications")
    finally:
        await conn.close()
    return round(time.perf_counter() - started, 2)


def _bytes(message: Message) -> bytes:
    return message.SerializeToString()


def _interleaved(rows: list[asyncpg.Record], key: str) -> list[asyncpg.Record]:
    """Rows ordered so that consecutive ones belong to different callers."""
    by_caller: dict[int, list[asyncpg.Record]] = {}
    for row in rows:
        by_caller.setdefault(row[key], []).append(row)
    queues = list(by_caller.values())
    ordered: list[asyncpg.Record] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        ordered.extend(q[depth] for q in queues if depth < len(q))
    return ordered


async def plans(url: str, sizes: Sizes) -> dict[str, list[Item]]:
    """The calls of every unary phase: (caller id, serialized request) in calling order."""
    conn = await asyncpg.connect(url)
    try:
        shared = await conn.fetch(
            "SELECT id, user_id FROM user_connections WHERE user_id BETWEEN $1 AND $2 ORDER BY id",
            LISTERS.start,
            LISTERS.stop - 1,
        )
        pending = await conn.fetch(
            "SELECT id, receiver_id FROM connection_requests"
            " WHERE receiver_id BETWEEN $1 AND $2 AND status = 'pending' ORDER BY id",
            RESPONDERS.start,
            RESPONDERS.stop - 1,
        )
        removable = await conn.fetch(
            "SELECT id, user_id FROM user_connections WHERE user_id BETWEEN $1 AND $2 ORDER BY id",
            REMOVERS.start,
            REMOVERS.stop - 1,
        )
    finally:
        await conn.close()
    accept = pb.RespondRequest.ACTION_ACCEPT
    sends: list[Item] = []
    for round_ in range(PENDING_CAP):
        for n in range(sizes.receivers):
            sender = SENDERS[(n + round_ * 37) % len(SENDERS)]
            sends.append(
                (
                    sender,
                    pb.SendRequestRequest(
                        umbral_name=handle(RECEIVERS_FROM + n)
                    ).SerializeToString(),
                )
            )
    return {
        "Echo": [(uid, b"") for uid in CALLERS],
        "Search": [
            (
                uid,
                pb.SearchRequest(
                    umbral_name=handle(PARTNERS_FROM + uid % sizes.list_size)
                ).SerializeToString(),
            )
            for uid in CALLERS
        ],
        "SendRequest": sends[: sizes.sends],
        "Respond": [
            (
                row["receiver_id"],
                pb.RespondRequest(request_id=row["id"], action=accept).SerializeToString(),
            )
            for row in _interleaved(list(pending), "receiver_id")
        ],
        "ListIncomingRequests": [
            (uid, pb.ListIncomingRequestsRequest(page_size=50).SerializeToString())
            for uid in LISTERS
        ],
        "ListConnections": [
            (uid, pb.ListConnectionsRequest(page_size=50).SerializeToString()) for uid in LISTERS
        ],
        "GetSharedProfile": [
            (
                row["user_id"],
                pb.GetSharedProfileRequest(connection_id=row["id"]).SerializeToString(),
            )
            for row in _interleaved(list(shared), "user_id")
        ],
        "RemoveConnection": [
            (
                row["user_id"],
                pb.RemoveConnectionRequest(connection_id=row["id"]).SerializeToString(),
            )
            for row in _interleaved(list(removable), "user_id")
        ],
        "GetRelationships": [
            (
                uid,
                pb.GetRelationshipsRequest(
                    umbral_names=relationship_handles(n)
                ).SerializeToString(),
            )
            for n, uid in enumerate(LISTERS)
        ],
        "BlockUser": [
            (
                BLOCKERS[n % len(BLOCKERS)],
                pb.BlockUserRequest(umbral_name=handle(BLOCK_TARGETS_FROM + n)).SerializeToString(),
            )
            for n in range(sizes.blocks)
        ],
    }


def relationship_handles(n: int) -> list[str]:
    """What a lister asks about: connected, incoming pending, nothing between, nobody."""
    quarter = RELATIONSHIP_HANDLES // 4
    return [
        *(handle(PARTNERS_FROM + k) for k in range(quarter)),
        *(handle(LIST_SENDERS_FROM + k) for k in range(quarter)),
        *(handle(CALLERS.start + (n + k) % len(CALLERS)) for k in range(quarter)),
        *(f"nobody{n:03d}x{k:03d}" for k in range(quarter)),
    ]
