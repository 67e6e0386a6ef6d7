"""Cancelled calls and a database that drops connections (SPEC 4.1, 7)."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from tests.conftest import NewUser, RunningServer, Sql
from tests.rich import error_reason
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2


async def test_a_cancelled_call_rolls_back_and_returns_its_connection(
    connections, new_user: NewUser, server: RunningServer, sql: Sql, database_url: str
) -> None:
    sender, receiver = await new_user(), await new_user()
    await connections.Search(pb.SearchRequest(umbral_name="warm-up"), metadata=sender.md)
    db = server.service.db
    # Hold the receiver's row: SendRequest's transaction waits on it, then the client gives up.
    blocker = await asyncpg.connect(database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", receiver.id)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await connections.SendRequest(
                pb.SendRequestRequest(umbral_name=receiver.handle),
                metadata=sender.md,
                timeout=0.3,
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await transaction.rollback()
    finally:
        await blocker.close()
    for _ in range(50):
        if db.checked_out() == 0:
            break
        await asyncio.sleep(0.1)
    assert db.checked_out() == 0
    assert (
        await sql.value("SELECT count(*) FROM connection_requests WHERE sender_id = $1", sender.id)
        == 0
    )
    assert (
        await sql.value(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'umbra-grpc' "
            "AND state LIKE 'idle in transaction%'"
        )
        == 0
    )
    # The pool still works: the same call now goes through.
    await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
    )


async def test_dropped_database_connections_recover_by_themselves(
    connections, new_user: NewUser, server: RunningServer, sql: Sql
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
