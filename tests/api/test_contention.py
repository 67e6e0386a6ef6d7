"""Contention is not a bug (SPEC 10.8).

A statement that runs out of time (statement_timeout), a lock wait that does (lock_timeout),
and a deadlock or serialization failure still there after the bounded retries are
UNAVAILABLE `STORAGE_BUSY`, which clients may retry: never INTERNAL, and logged at WARNING
without a traceback. Each is provoked for real: a lock held from another connection, and a
deadlock set up afresh for every attempt of a transaction.

The servers with timeouts of their own go straight to PostgreSQL even under
`make test-pgbouncer`: the service sets its timeouts as startup parameters, which PgBouncer
does not forward (behind it they are the role's, deploy/roles.sql, or the pooler's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
import pytest_asyncio

from tests.rich import expect_error
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    Sql,
    session_config,
    start_server,
    stop_server,
    test_config,
    until,
)
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc
from umbra_grpc.storage.database import (
    TRANSACTION_ATTEMPTS,
    Conn,
    Database,
    Query,
    StorageBusy,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
DATABASE_LOGGER = "umbra_grpc.storage.database"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """Lock waits give up after 200 ms here."""
    running = await start_server(session_config(database_url, db_lock_timeout_ms=200))
    try:
        yield running
    finally:
        await stop_server(running)


@pytest_asyncio.fixture(loop_scope="session")
async def blocker(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another session with a transaction open, as a long-running writer would hold one."""
    connection = await asyncpg.connect(database_url)
    await connection.execute("BEGIN")
    try:
        yield connection
    finally:
        await connection.close()  # rolls back whatever it holds


def busy_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the server logged about the database being busy; fails on any ERROR line."""
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, [record.getMessage() for record in errors]
    return [record for record in caplog.records if record.name == DATABASE_LOGGER]


def assert_one_warning(caplog: pytest.LogCaptureFixture, sqlstate: str) -> None:
    [line] = busy_lines(caplog)
    assert line.levelno == logging.WARNING
    assert line.exc_info is None and line.exc_text is None
    assert getattr(line, "sqlstate", None) == sqlstate


async def test_a_lock_wait_past_lock_timeout_is_storage_busy(
    connections: Connections,
    new_user: NewUser,
    blocker: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender, receiver = await new_user(), await new_user()
    request = (
        await connections.SendRequest(
            pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
        )
    ).request
    await blocker.execute("SELECT 1 FROM connection_requests WHERE id = $1 FOR UPDATE", request.id)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        await expect_error(
            connections.Respond(
                pb.RespondRequest(request_id=request.id, action=pb.RespondRequest.ACTION_ACCEPT),
                metadata=receiver.md,
            ),
            grpc.StatusCode.UNAVAILABLE,
            "STORAGE_BUSY",
        )
    assert_one_warning(caplog, "55P03")


async def test_a_read_kept_waiting_by_a_table_lock_is_storage_busy(
    connections: Connections,
    new_user: NewUser,
    blocker: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    me = await new_user()
    await connections.Search(pb.SearchRequest(umbral_name="warm-up"), metadata=me.md)
    await blocker.execute("LOCK TABLE connection_requests IN ACCESS EXCLUSIVE MODE")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        await expect_error(
            connections.ListIncomingRequests(pb.ListIncomingRequestsRequest(), metadata=me.md),
            grpc.StatusCode.UNAVAILABLE,
            "STORAGE_BUSY",
        )
    assert_one_warning(caplog, "55P03")


async def test_a_statement_past_statement_timeout_is_storage_busy(
    database_url: str,
    new_user: NewUser,
    blocker: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server whose statements may run 300 ms and whose lock waits never time out by
    # themselves: a send queued behind a held lock is simply a statement that runs too long.
    slow = await start_server(
        session_config(database_url, db_statement_timeout_ms=300, db_lock_timeout_ms=0)
    )
    try:
        stub = connections_pb2_grpc.ConnectionServiceStub(slow.channel)
        sender, receiver = await new_user(), await new_user()
        await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", receiver.id)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            await expect_error(
                stub.SendRequest(
                    pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
                ),
                grpc.StatusCode.UNAVAILABLE,
                "STORAGE_BUSY",
            )
        assert_one_warning(caplog, "57014")
    finally:
        await stop_server(slow)


async def _wait_until_waiting(sql: Sql, pid: int) -> None:
    await until(
        lambda: sql.value(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        ),
        within=10,
        what="the other session waiting on the lock",
        every=0.01,
    )


async def test_a_deadlock_on_every_attempt_is_storage_busy(
    database_url: str, new_user: NewUser, sql: Sql, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = await new_user(), await new_user()
    lock = Query("SELECT 1 FROM users WHERE id = :id FOR UPDATE")
    other = await asyncpg.connect(database_url)
    # The other session is never the victim: it waits far longer before it looks for
    # deadlocks than the unit of work does (SET LOCAL below).
    await other.execute("SET deadlock_timeout = '60s'")
    other_pid = other.get_server_pid()
    db = Database.connect(test_config(database_url))
    attempts = 0
    crossing: asyncio.Task[str] | None = None

    async def finish_crossing() -> None:
        # Once the unit of work rolled back, the other session got its lock: let it go.
        nonlocal crossing
        if crossing is not None:
            await crossing
            await other.execute("ROLLBACK")
            crossing = None

    async def deadlocked(conn: Conn) -> None:
        nonlocal attempts, crossing
        attempts += 1
        await finish_crossing()
        await conn.execute(Query("SET LOCAL deadlock_timeout = '20ms'"))
        await conn.execute(lock, id=first.id)
        await other.execute("BEGIN")
        await other.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", second.id)
        crossing = asyncio.create_task(
            other.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", first.id)
        )
        await _wait_until_waiting(sql, other_pid)
        await conn.execute(lock, id=second.id)  # each holds what the other wants

    caplog.clear()
    try:
        with caplog.at_level(logging.INFO), pytest.raises(StorageBusy):
            await db.transaction(deadlocked)
        await finish_crossing()
    finally:
        await db.dispose()
        await other.close()
    assert attempts == TRANSACTION_ATTEMPTS
    retried = [line for line in busy_lines(caplog) if line.levelno == logging.INFO]
    assert len(retried) == TRANSACTION_ATTEMPTS - 1
    [warning] = [line for line in busy_lines(caplog) if line.levelno == logging.WARNING]
    assert warning.exc_info is None and getattr(warning, "sqlstate", None) == "40P01"


async def test_busy_is_answered_unavailable_not_internal_through_the_rpc(
    connections: Connections, new_user: NewUser, blocker: asyncpg.Connection
) -> None:
    """The same holds for a write whose lock wait ends it; the client may simply retry."""
    sender, receiver = await new_user(), await new_user()
    await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", receiver.id)
    send = pb.SendRequestRequest(umbral_name=receiver.handle)
    await expect_error(
        connections.SendRequest(send, metadata=sender.md),
        grpc.StatusCode.UNAVAILABLE,
        "STORAGE_BUSY",
    )
    await blocker.execute("ROLLBACK")
    retried = await connections.SendRequest(send, metadata=sender.md)
    assert retried.request.status == pb.ConnectionRequest.STATUS_PENDING
