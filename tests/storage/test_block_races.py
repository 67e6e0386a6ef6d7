"""A blocked pair never holds a pending request or a connection, even under racing writes.

The invariant is the database's (migration 0004's pair guard): each test holds the other
side's write open in a transaction of its own, at exactly the point where a racing RPC would
be, starts the RPC under test, shows from pg_locks / pg_stat_activity that it waits on that
write, and only then lets the write commit. The last test races many real calls at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator, Awaitable

import asyncpg
import pytest
import pytest_asyncio

from tests.invariants import check_all
from tests.support import test_config, until
from umbra_grpc.domain.errors import DomainError, UserNotFound
from umbra_grpc.domain.pages import PageTokens
from umbra_grpc.domain.relationships import Relationships
from umbra_grpc.domain.requests import Requests
from umbra_grpc.storage import relationships as blocks_store
from umbra_grpc.storage import requests as requests_store
from umbra_grpc.storage.database import Conn, Database, StorageBusy

on_session_loop = pytest.mark.asyncio(loop_scope="session")
CAP = 5
WINDOW = dt.timedelta(minutes=10)
COOLDOWN = dt.timedelta(hours=1)
TTL = dt.timedelta(days=30)
_ids = itertools.count(30_000)


class Service:
    """The two halves of ConnectionService that race here, on one pool."""

    def __init__(self, db: Database) -> None:
        pages = PageTokens(b"k" * 32)
        self.requests = Requests(db, pages, cap=CAP, window=WINDOW, cooldown=COOLDOWN, ttl=TTL)
        self.relationships = Relationships(db, pages, ttl=TTL)


@pytest_asyncio.fixture(loop_scope="session")
async def service(database_url: str) -> AsyncIterator[Service]:
    db = Database.connect(test_config(database_url))
    try:
        yield Service(db)
    finally:
        await db.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def other(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The other side's connection: its write stays open until the test commits it."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def new_user(conn: asyncpg.Connection) -> int:
    user_id = next(_ids)
    await conn.execute(
        "INSERT INTO users (id, umbral_name) VALUES ($1, $2)", user_id, f"r{user_id}"
    )
    await conn.execute(
        "INSERT INTO settings (user_id, accept_connections) VALUES ($1, true)", user_id
    )
    return user_id


async def wait_for_lock_waiter(url: str, locktype: str | None = None) -> None:
    """Until some backend waits for a lock (of `locktype`, when given): the race is on.

    Read from a connection of its own: inside a transaction, pg_locks keeps showing what it
    showed the first time.
    """
    conn = await asyncpg.connect(url)
    try:
        await until(
            lambda: conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted"
                " AND ($1::text IS NULL OR locktype = $1)",
                locktype,
            ),
            within=10,
            what=f"somebody waiting on a {locktype or 'any'} lock",
            every=0.01,
        )
    finally:
        await conn.close()


async def pair_rows(conn: asyncpg.Connection, a: int, b: int) -> dict[str, int]:
    pair = [a, b]
    return {
        "blocks": await conn.fetchval(
            "SELECT count(*) FROM user_blocks WHERE blocker_id = ANY($1::bigint[])"
            " AND blocked_id = ANY($1::bigint[])",
            pair,
        ),
        "pending": await conn.fetchval(
            "SELECT count(*) FROM connection_requests WHERE status = 'pending'"
            " AND sender_id = ANY($1::bigint[]) AND receiver_id = ANY($1::bigint[])",
            pair,
        ),
        "connections": await conn.fetchval(
            "SELECT count(*) FROM user_connections WHERE user_id = ANY($1::bigint[])"
            " AND connected_user_id = ANY($1::bigint[])",
            pair,
        ),
    }


@on_session_loop
async def test_a_block_waits_for_a_request_being_sent_and_then_cancels_it(
    service: Service, other: asyncpg.Connection, database_url: str
) -> None:
    a, b = await new_user(other), await new_user(other)
    async with other.transaction():
        # B's SendRequest to A has written its request, not yet committed.
        sent = await other.fetchrow(
            "SELECT * FROM umbra_send_request($1, $2, $3, $4, $5, NULL)",
            b,
            f"r{a}",
            CAP,
            WINDOW,
            COOLDOWN,
        )
        assert sent is not None and sent["request_id"] is not None
        blocking = asyncio.create_task(service.relationships.block(a, f"r{b}", None))
        await wait_for_lock_waiter(database_url, "advisory")
        assert not blocking.done()
    await blocking
    # The block saw the request committed, ran again, and cancelled it.
    assert await pair_rows(other, a, b) == {"blocks": 1, "pending": 0, "connections": 0}
    status = await other.fetchval(
        "SELECT status FROM connection_requests WHERE id = $1", sent["request_id"]
    )
    assert status == "cancelled"


@on_session_loop
async def test_a_request_sent_while_a_block_commits_is_answered_as_nobody(
    service: Service, other: asyncpg.Connection, database_url: str
) -> None:
    a, b = await new_user(other), await new_user(other)
    async with other.transaction():
        # A's BlockUser of B has run its statement, not yet committed.
        await blocks_store.block(Conn(other, None), caller=a, handle=f"r{b}", ttl=TTL, ip=None)
        sending = asyncio.create_task(service.requests.send(b, f"r{a}", "", None))
        await wait_for_lock_waiter(database_url, "advisory")
        assert not sending.done()
    with pytest.raises(UserNotFound):
        await sending
    assert await pair_rows(other, a, b) == {"blocks": 1, "pending": 0, "connections": 0}


@on_session_loop
async def test_a_block_racing_an_accept_removes_the_new_connection(
    service: Service, other: asyncpg.Connection, database_url: str
) -> None:
    a, b = await new_user(other), await new_user(other)
    request = await service.requests.send(b, f"r{a}", "", None)
    async with other.transaction():
        # A accepts B's request: the connection rows are written, not yet committed.
        accepted = await requests_store.respond(
            Conn(other, None), caller=a, request_id=request.id, accept=True, ttl=TTL, ip=None
        )
        assert accepted is not None and accepted.link is not None
        # Meanwhile B blocks A.
        blocking = asyncio.create_task(service.relationships.block(b, f"r{a}", None))
        await wait_for_lock_waiter(database_url)
        assert not blocking.done()
    await blocking
    assert await pair_rows(other, a, b) == {"blocks": 1, "pending": 0, "connections": 0}
    linked = await other.fetchval(
        "SELECT count(*) FROM persons WHERE owner_user_id = ANY($1::bigint[])"
        " AND linked_user_id IS NOT NULL",
        [a, b],
    )
    assert linked == 0


@on_session_loop
async def test_an_accept_racing_a_block_finds_the_request_gone(
    service: Service, other: asyncpg.Connection, database_url: str
) -> None:
    a, b = await new_user(other), await new_user(other)
    request = await service.requests.send(b, f"r{a}", "", None)
    async with other.transaction():
        await blocks_store.block(Conn(other, None), caller=b, handle=f"r{a}", ttl=TTL, ip=None)
        accepting = asyncio.create_task(
            service.requests.respond(a, request.id, accept=True, ip=None)
        )
        await wait_for_lock_waiter(database_url)
        assert not accepting.done()
    with pytest.raises(DomainError) as refused:
        await accepting
    assert refused.value.reason == "REQUEST_NOT_PENDING"
    assert await pair_rows(other, a, b) == {"blocks": 1, "pending": 0, "connections": 0}


async def outcome(call: Awaitable[object]) -> str:
    """ "OK", or the reason a call was refused."""
    try:
        await call
    except DomainError as error:
        return error.reason
    except StorageBusy:
        return "STORAGE_BUSY"
    return "OK"


@on_session_loop
async def test_many_racing_blocks_sends_and_accepts_never_break_the_invariant(
    service: Service, other: asyncpg.Connection
) -> None:
    pairs = [(await new_user(other), await new_user(other)) for _ in range(12)]
    requests = [await service.requests.send(b, f"r{a}", "", None) for a, b in pairs[:6]]
    blocks: list[Awaitable[object]] = []
    others: list[Awaitable[object]] = []
    for (a, b), request in zip(pairs[:6], requests, strict=True):
        others.append(service.requests.respond(a, request.id, accept=True, ip=None))
        blocks.append(service.relationships.block(b, f"r{a}", None))
    for a, b in pairs[6:]:
        others.append(service.requests.send(b, f"r{a}", "", None))
        others.append(service.requests.send(a, f"r{b}", "", None))
        blocks.append(service.relationships.block(a, f"r{b}", None))
    block_outcomes, other_outcomes = await asyncio.gather(
        asyncio.gather(*(outcome(call) for call in blocks)),
        asyncio.gather(*(outcome(call) for call in others)),
    )
    assert set(block_outcomes) <= {"OK", "STORAGE_BUSY"}, block_outcomes
    assert set(other_outcomes) <= {
        "OK",
        "REQUEST_NOT_PENDING",
        "REQUEST_PENDING",
        "USER_NOT_FOUND",
        "USER_BLOCKED",
        "STORAGE_BUSY",
    }, other_outcomes
    ids = [user for pair in pairs for user in pair]
    recorded = await other.fetchval(
        "SELECT count(*) FROM user_blocks WHERE blocker_id = ANY($1::bigint[])", ids
    )
    assert recorded == block_outcomes.count("OK")
    # The block rule, and I1-I5, over everything this module's races left behind.
    assert await check_all(other, cap=CAP, window=WINDOW) == []
