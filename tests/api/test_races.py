"""Invariants under real concurrent clients (SPEC 2): each race is run many times.

Each client gets its own channel and TCP connection, so the calls really meet in
the server and in PostgreSQL at the same time. That they met is shown, not hoped for: a
second connection holds the contested rows while the racers start, and lets go only once
PostgreSQL shows them all waiting on it (every racer inside its statement, none done). After
every round the rows are read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import pytest
import pytest_asyncio

from tests.locks import until_waiting
from tests.rich import error_reason
from tests.support import Connections, NewUser, RunningServer, Sql, TestUser, separate_channel
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
ROUNDS = 5


@pytest_asyncio.fixture(loop_scope="session")
async def clients(
    server: RunningServer,
) -> AsyncIterator[list[Connections]]:
    channels = [separate_channel(server.target) for _ in range(24)]
    try:
        yield [connections_pb2_grpc.ConnectionServiceStub(channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close()


async def outcome(call: Awaitable[object]) -> str:
    """OK, or the ErrorInfo reason of the failure."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error_reason(error)
    return "OK"


@contextlib.asynccontextmanager
async def held(database_url: str, table: str, *ids: int) -> AsyncIterator[None]:
    """Holds rows of `table` (FOR UPDATE) from a connection of the test's own."""
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute(f"SELECT 1 FROM {table} WHERE id = ANY($1) FOR UPDATE", ids)
            yield
    finally:
        await blocker.close()


async def met(
    sql: Sql, server: RunningServer, calls: list[Awaitable[str]], waiting: int | None = None
) -> list[asyncio.Task[str]]:
    """Starts the racers (inside `held`) and returns once `waiting` of them (all, or as many
    as the pool has connections) wait on the held rows, none of them finished."""
    racers = [asyncio.ensure_future(call) for call in calls]
    if waiting is None:
        waiting = min(len(racers), server.service.config.db_pool_size)
    await until_waiting(sql, waiting)
    assert not any(racer.done() for racer in racers)
    return racers


async def test_many_senders_one_receiver_respect_the_cap(
    clients: list[Connections],
    new_user: NewUser,
    sql: Sql,
    server: RunningServer,
    database_url: str,
) -> None:
    for _ in range(ROUNDS):
        receiver = await new_user()
        senders = [await new_user() for _ in range(24)]
        async with held(database_url, "users", receiver.id):
            racers = await met(
                sql,
                server,
                [
                    outcome(
                        stub.SendRequest(
                            pb.SendRequestRequest(umbral_name=receiver.handle),
                            metadata=sender.md,
                        )
                    )
                    for stub, sender in zip(clients, senders, strict=True)
                ],
            )
        results = await asyncio.gather(*racers)
        assert results.count("OK") == 5
        assert results.count("TOO_MANY_PENDING") == 19
        assert (
            await sql.value(
                "SELECT count(*) FROM connection_requests WHERE receiver_id = $1 "
                "AND status = 'pending'",
                receiver.id,
            )
            == 5
        )
        assert (
            await sql.value("SELECT count(*) FROM notifications WHERE user_id = $1", receiver.id)
            == 5
        )
        assert await sql.value("SELECT count(*) FROM outbox WHERE user_id = $1", receiver.id) == 5


async def test_crossed_requests_leave_one_pending(
    clients: list[Connections],
    new_user: NewUser,
    sql: Sql,
    server: RunningServer,
    database_url: str,
) -> None:
    for _ in range(ROUNDS * 4):
        a, b = await new_user(), await new_user()
        async with held(database_url, "users", a.id, b.id):
            racers = await met(
                sql,
                server,
                [
                    outcome(
                        clients[0].SendRequest(
                            pb.SendRequestRequest(umbral_name=b.handle), metadata=a.md
                        )
                    ),
                    outcome(
                        clients[1].SendRequest(
                            pb.SendRequestRequest(umbral_name=a.handle), metadata=b.md
                        )
                    ),
                ],
            )
        results = await asyncio.gather(*racers)
        assert sorted(results) == ["OK", "REQUEST_PENDING"]
        rows = await sql.rows(
            "SELECT status FROM connection_requests WHERE $1 IN (sender_id, receiver_id)", a.id
        )
        assert [row["status"] for row in rows] == ["pending"]
        assert (
            await sql.value(
                "SELECT count(*) FROM audit_log WHERE action = 'connection.request_sent' "
                "AND actor_id IN ($1, $2)",
                a.id,
                b.id,
            )
            == 1
        )


async def pending_request(clients: list[Connections], sender: TestUser, receiver: TestUser) -> int:
    reply = await clients[0].SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
    )
    return reply.request.id


async def test_concurrent_accepts_have_one_winner(
    clients: list[Connections],
    new_user: NewUser,
    sql: Sql,
    server: RunningServer,
    database_url: str,
) -> None:
    for _ in range(ROUNDS):
        sender, receiver = await new_user(), await new_user()
        request_id = await pending_request(clients, sender, receiver)
        accept = pb.RespondRequest(request_id=request_id, action=pb.RespondRequest.ACTION_ACCEPT)
        async with held(database_url, "connection_requests", request_id):
            racers = await met(
                sql,
                server,
                [outcome(stub.Respond(accept, metadata=receiver.md)) for stub in clients[:10]],
            )
        results = await asyncio.gather(*racers)
        assert results.count("OK") == 1
        assert results.count("REQUEST_NOT_PENDING") == 9
        assert (
            await sql.value(
                "SELECT count(*) FROM user_connections WHERE $1 IN (user_id, connected_user_id)",
                sender.id,
            )
            == 2
        )
        assert (
            await sql.value(
                "SELECT count(*) FROM persons WHERE $1 IN (owner_user_id, linked_user_id)",
                sender.id,
            )
            == 2
        )
        assert (
            await sql.value(
                "SELECT count(*) FROM audit_log WHERE action = 'connection.accepted' "
                "AND actor_id = $1",
                receiver.id,
            )
            == 1
        )


async def test_accept_racing_cancel_has_one_winner(
    clients: list[Connections],
    new_user: NewUser,
    sql: Sql,
    server: RunningServer,
    database_url: str,
) -> None:
    """Both wait on the request's row; the one that queued first wins (PostgreSQL's row lock
    queue), so each side is made to win in turn, and the other must lose cleanly."""
    for round_number in range(ROUNDS * 4):
        sender, receiver = await new_user(), await new_user()
        request_id = await pending_request(clients, sender, receiver)
        # Calls start when they are made: only once the row is held.
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "accept": functools.partial(
                clients[1].Respond,
                pb.RespondRequest(request_id=request_id, action=pb.RespondRequest.ACTION_ACCEPT),
                metadata=receiver.md,
            ),
            "cancel": functools.partial(
                clients[2].CancelRequest,
                pb.CancelRequestRequest(request_id=request_id),
                metadata=sender.md,
            ),
        }
        winner, loser = ("accept", "cancel") if round_number % 2 == 0 else ("cancel", "accept")
        async with held(database_url, "connection_requests", request_id):
            racers = await met(sql, server, [outcome(calls[winner]())])
            racers += await met(sql, server, [outcome(calls[loser]())], waiting=2)
        results = dict(zip((winner, loser), await asyncio.gather(*racers), strict=True))
        assert results == {winner: "OK", loser: "REQUEST_NOT_PENDING"}
        status = await sql.value("SELECT status FROM connection_requests WHERE id = $1", request_id)
        links = await sql.value(
            "SELECT count(*) FROM user_connections WHERE $1 IN (user_id, connected_user_id)",
            sender.id,
        )
        assert (status, links) == (("accepted", 2) if winner == "accept" else ("cancelled", 0))
