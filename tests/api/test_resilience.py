"""Cancelled calls and a database that drops connections (SPEC 4.1, 7)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
import pytest

from tests.locks import until_none_waiting, until_waiting
from tests.rich import error_reason
from tests.support import Connections, NewUser, RunningServer, Sql, until
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
# Time enough for the server to reach the lock on a busy machine; the wait is seen first.
CALL_SECONDS = 1.0


async def _deadline_while_locked(
    database_url: str,
    sql: Sql,
    lock_sql: str,
    row_id: int,
    call: Callable[[], grpc.aio.UnaryUnaryCall[Any, Any]],
) -> None:
    """Holds a row lock while `call` waits on it past its deadline, then lets the lock go.

    The server is seen waiting on the lock (pg_stat_activity) while the call is still in
    flight, so the deadline fires during the wait, not before the server got there. The
    lock goes as soon as the server has stopped waiting on it (it noticed the deadline): a
    write the server did not roll back would go through at that moment. (Released before
    the server notices, the write may rightly commit: the client's deadline and the server's
    cancellation are a few milliseconds apart, and no server can undo a commit.) `call`
    starts the RPC (a grpc.aio call starts when it is made, not when it is awaited) with a
    deadline of CALL_SECONDS.
    """
    blocker = await asyncpg.connect(database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute(lock_sql, row_id)
        running = call()
        await until_waiting(sql)
        assert not running.done(), "the call ended before the server waited on the lock"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until_none_waiting(sql)
        await transaction.rollback()
    finally:
        await blocker.close()


async def _settled(server: RunningServer, sql: Sql) -> None:
    """Every pooled connection is back (so a write that escaped the rollback has landed),
    and none of them was left idle in a transaction."""
    db = server.service.db
    await until(
        lambda: not db.checked_out(),
        within=10,
        what="every pooled connection given back",
        every=0.01,
    )
    assert (
        await sql.value(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'umbra-grpc' "
            "AND state LIKE 'idle in transaction%'"
        )
        == 0
    )


@pytest.mark.parametrize("attempt", range(3))
async def test_a_cancelled_send_rolls_back_and_returns_its_connection(
    connections: Connections,
    new_user: NewUser,
    server: RunningServer,
    sql: Sql,
    database_url: str,
    attempt: int,
) -> None:
    sender, receiver = await new_user(), await new_user()
    await connections.Search(pb.SearchRequest(umbral_name="warm-up"), metadata=sender.md)
    # SendRequest waits on the receiver's row (the I3 lock), then the client gives up.
    send = pb.SendRequestRequest(umbral_name=receiver.handle)
    await _deadline_while_locked(
        database_url,
        sql,
        "SELECT 1 FROM users WHERE id = $1 FOR UPDATE",
        receiver.id,
        lambda: connections.SendRequest(send, metadata=sender.md, timeout=CALL_SECONDS),
    )
    await _settled(server, sql)
    assert (
        await sql.value("SELECT count(*) FROM connection_requests WHERE sender_id = $1", sender.id)
        == 0
    )
    # The pool still works: the same call now goes through.
    await connections.SendRequest(send, metadata=sender.md)


@pytest.mark.parametrize("attempt", range(3))
async def test_a_cancelled_single_statement_write_rolls_back(
    connections: Connections,
    new_user: NewUser,
    server: RunningServer,
    sql: Sql,
    database_url: str,
    attempt: int,
) -> None:
    """Respond is one statement: cancelled while it waits on the request's row, no write."""
    sender, receiver = await new_user(), await new_user()
    sent = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
    )
    accept = pb.RespondRequest(request_id=sent.request.id, action=pb.RespondRequest.ACTION_ACCEPT)
    await _deadline_while_locked(
        database_url,
        sql,
        "SELECT 1 FROM connection_requests WHERE id = $1 FOR UPDATE",
        sent.request.id,
        lambda: connections.Respond(accept, metadata=receiver.md, timeout=CALL_SECONDS),
    )
    await _settled(server, sql)
    assert (
        await sql.value("SELECT status FROM connection_requests WHERE id = $1", sent.request.id)
        == "pending"
    )
    assert (
        await sql.value("SELECT count(*) FROM user_connections WHERE user_id = $1", receiver.id)
        == 0
    )
    # Nothing stuck: the same answer goes through now.
    answered = await connections.Respond(accept, metadata=receiver.md)
    assert answered.request.status == pb.ConnectionRequest.STATUS_ACCEPTED


async def test_dropped_database_connections_recover_by_themselves(
    connections: Connections, new_user: NewUser, server: RunningServer, sql: Sql
) -> None:
    me, other = await new_user(), await new_user()
    for _ in range(3):
        await connections.Search(pb.SearchRequest(umbral_name=other.handle), metadata=me.md)
    listener_pid = server.service.listener.backend_pid
    # Kill every pooled connection of the server (not the listener: that has its own test).
    await sql.rows(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'umbra-grpc' AND pid <> $1",
        listener_pid,
    )
    outcomes = []
    for _ in range(12):
        try:
            reply = await connections.Search(
                pb.SearchRequest(umbral_name=other.handle), metadata=me.md
            )
            outcomes.append("found" if reply.found else "not found")
        except grpc.aio.AioRpcError as error:
            # A lost connection is UNAVAILABLE with a reason, never INTERNAL or UNKNOWN.
            outcomes.append(f"{error.code().name} {error_reason(error)}")
    assert set(outcomes) <= {"found", "UNAVAILABLE STORAGE_UNAVAILABLE"}
    assert outcomes[-3:] == ["found"] * 3  # recovered without a restart
