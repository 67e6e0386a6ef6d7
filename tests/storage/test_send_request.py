"""SendRequest's database function (migration 0002): its races played out step by step.

In the race tests another connection holds a transaction open at the exact point where a
racing sender would be, so they show what the function does when it meets that sender, every
time, where tests/api/test_races.py can only hope the calls meet.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import pytest_asyncio

from tests.support import clone_database, test_config, until
from umbra_grpc.domain.errors import RequestPending, TooManyPending
from umbra_grpc.domain.pages import PageTokens
from umbra_grpc.domain.requests import Requests
from umbra_grpc.storage import migrate
from umbra_grpc.storage.database import Database, constraint_name

on_session_loop = pytest.mark.asyncio(loop_scope="session")
CAP = 3
WINDOW = dt.timedelta(minutes=10)
COOLDOWN = dt.timedelta(hours=1)
TTL = dt.timedelta(days=30)
FUNCTION = "umbra_send_request"
_ids = itertools.count(5000)


@pytest_asyncio.fixture(loop_scope="session")
async def requests(database_url: str) -> AsyncIterator[Requests]:
    db = Database.connect(test_config(database_url))
    try:
        yield Requests(
            db, PageTokens(b"k" * 32), cap=CAP, window=WINDOW, cooldown=COOLDOWN, ttl=TTL
        )
    finally:
        await db.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def other(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The racing sender's connection."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def new_user(conn: asyncpg.Connection, preferred_name: str | None = None) -> int:
    user_id = next(_ids)
    await conn.execute(
        "INSERT INTO users (id, umbral_name) VALUES ($1, $2)",
        user_id,
        f"user{user_id}",
    )
    await conn.execute(
        "INSERT INTO settings (user_id, accept_connections, preferred_name) VALUES ($1, true, $2)",
        user_id,
        preferred_name,
    )
    return user_id


async def wait_until_blocked(url: str, within: float = 10.0) -> None:
    """Until a backend running the function waits for a lock (however long a loaded machine
    takes to get it there).

    Read from a connection of its own: inside a transaction, pg_stat_activity keeps showing
    what it showed the first time.
    """
    conn = await asyncpg.connect(url)
    try:
        await until(
            lambda: conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE $1",
                f"%{FUNCTION}(%",
            ),
            within=within,
            what="the send waiting on a lock",
            every=0.01,
        )
    finally:
        await conn.close()


@on_session_loop
async def test_the_cap_is_counted_after_the_lock(
    requests: Requests, other: asyncpg.Connection, database_url: str
) -> None:
    receiver = await new_user(other)
    for _ in range(CAP - 1):
        await requests.send(await new_user(other), f"user{receiver}", "", None)
    late = await new_user(other)
    async with other.transaction():
        # A racing sender has locked the receiver and written the last request the cap allows.
        written = await other.fetchrow(
            f"SELECT * FROM {FUNCTION}($1, $2, $3, $4, $5, NULL)",
            await new_user(other),
            f"user{receiver}",
            CAP,
            WINDOW,
            COOLDOWN,
        )
        assert written is not None and written["request_id"] is not None
        sent = asyncio.create_task(requests.send(late, f"user{receiver}", "", None))
        await wait_until_blocked(database_url)
    # Had the count's snapshot been taken before the lock, it would miss that request.
    with pytest.raises(TooManyPending):
        await sent
    pending = await other.fetchval(
        "SELECT count(*) FROM connection_requests WHERE receiver_id = $1 AND status = 'pending'",
        receiver,
    )
    assert pending == CAP


@on_session_loop
async def test_crossed_requests_meet_at_the_pending_pair_index(
    requests: Requests, other: asyncpg.Connection, database_url: str
) -> None:
    a, b = await new_user(other), await new_user(other)
    async with other.transaction():
        # A->B is written but not committed: B->A locks another row, so it does not queue
        # behind A and its check cannot see A's request; the unique index makes it wait.
        await other.execute(
            f"SELECT * FROM {FUNCTION}($1, $2, $3, $4, $5, NULL)",
            a,
            f"user{b}",
            CAP,
            WINDOW,
            COOLDOWN,
        )
        sent = asyncio.create_task(requests.send(b, f"user{a}", "", None))
        await wait_until_blocked(database_url)
    with pytest.raises(RequestPending) as caught:
        await sent
    # Raised inside the function, the violation still names its index.
    assert caught.value.__cause__ is not None
    assert constraint_name(caught.value.__cause__) == "uq_connection_requests_pending_pair"
    rows = await other.fetch(
        "SELECT sender_id FROM connection_requests WHERE $1 IN (sender_id, receiver_id)", a
    )
    assert [row["sender_id"] for row in rows] == [a]
    audits = await other.fetchval(
        "SELECT count(*) FROM audit_log WHERE actor_id = ANY($1::bigint[])", [a, b]
    )
    assert audits == 1


@on_session_loop
async def test_an_empty_preferred_name_falls_back_to_the_handle(
    requests: Requests, other: asyncpg.Connection
) -> None:
    sender, receiver = await new_user(other, preferred_name=""), await new_user(other)
    request = await requests.send(sender, f"user{receiver}", "", None)
    message = await other.fetchval(
        "SELECT message FROM notifications WHERE source_id = $1", request.id
    )
    display = await other.fetchval("SELECT display_name FROM outbox WHERE user_id = $1", receiver)
    assert message == f"user{sender} wants to connect with you"
    assert display == f"user{sender}"


@pytest.fixture
def fresh_database(pg_server_url: str, template_database: str) -> Iterator[str]:
    yield from clone_database(pg_server_url, template_database)


def test_downgrade_drops_the_function(fresh_database: str) -> None:
    async def exists() -> bool:
        conn = await asyncpg.connect(fresh_database)
        try:
            return bool(
                await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname = $1", FUNCTION)
            )
        finally:
            await conn.close()

    assert asyncio.run(exists())  # the template is migrated to head
    migrate.downgrade(fresh_database, "0001")
    assert not asyncio.run(exists())
    migrate.upgrade(fresh_database)
    assert asyncio.run(exists())
