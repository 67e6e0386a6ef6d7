"""Request expiry (SPEC 11): exact at read time; the sweeper only finalises.

Requests are aged by SQL (`created_at` moved back past the TTL). This module's server does
not sweep by itself (UMBRA_EXPIRY_SWEEP_SECONDS=0), so what the reads do before any sweep is
seen alone, and each test sweeps when it says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
import pytest_asyncio

from tests.api.streams import next_event, until_synced, watch
from tests.invariants import check_all
from tests.rich import expect_error
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    start_server,
    stop_server,
    test_config,
    until,
)
from umbra_grpc.pb import connections_pb2
from umbra_grpc.storage import expiry as store

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
TTL = dt.timedelta(days=30)
EXPIRED = pb.ConnectionRequest.STATUS_EXPIRED


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(
        test_config(database_url, expiry_sweep_seconds=0.0, outbox_enabled=False)
    )
    try:
        yield running
    finally:
        await stop_server(running)


async def send(
    connections: Connections, sender: TestUser, receiver: TestUser
) -> pb.ConnectionRequest:
    reply = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
    )
    return reply.request


async def age(sql: Sql, request_id: int, past_ttl: str = "1 second") -> None:
    """Moves a request's creation back to `past_ttl` beyond the TTL."""
    await sql.rows(
        "UPDATE connection_requests SET created_at = now() - interval '30 days'"
        f" - interval '{past_ttl}' WHERE id = $1",
        request_id,
    )


async def listed(connections: Connections, user: TestUser) -> tuple[list[int], list[int]]:
    incoming = await connections.ListIncomingRequests(
        pb.ListIncomingRequestsRequest(), metadata=user.md
    )
    outgoing = await connections.ListOutgoingRequests(
        pb.ListOutgoingRequestsRequest(), metadata=user.md
    )
    return [r.id for r in incoming.requests], [r.id for r in outgoing.requests]


async def test_a_request_past_its_ttl_is_gone_at_once(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    sender, receiver = await new_user(), await new_user()
    request = await send(connections, sender, receiver)
    # A second short of the TTL it is still there...
    await sql.rows(
        "UPDATE connection_requests SET created_at = now() - interval '30 days'"
        " + interval '2 seconds' WHERE id = $1",
        request.id,
    )
    assert await listed(connections, receiver) == ([request.id], [])
    assert await listed(connections, sender) == ([], [request.id])
    # ...and past it, gone from everything, before any sweep.
    await age(sql, request.id)
    assert await listed(connections, receiver) == ([], [])
    assert await listed(connections, sender) == ([], [])
    stream = watch(connections, receiver)
    try:
        assert await until_synced(stream) == []
    finally:
        stream.cancel()
    await expect_error(
        connections.Respond(
            pb.RespondRequest(request_id=request.id, action=pb.RespondRequest.ACTION_ACCEPT),
            metadata=receiver.md,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REQUEST_NOT_PENDING",
    )
    await expect_error(
        connections.CancelRequest(
            pb.CancelRequestRequest(request_id=request.id), metadata=sender.md
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REQUEST_NOT_PENDING",
    )
    # Still marked pending in the table: nothing but the clock decided.
    status = await sql.value("SELECT status FROM connection_requests WHERE id = $1", request.id)
    assert status == "pending"


@pytest.mark.parametrize("direction", ["same", "reverse"])
async def test_an_expired_request_stops_blocking_its_pair_at_once(
    connections: Connections, new_user: NewUser, sql: Sql, direction: str
) -> None:
    sender, receiver = await new_user(), await new_user()
    old = await send(connections, sender, receiver)
    await age(sql, old.id)
    new_sender, new_receiver = (sender, receiver) if direction == "same" else (receiver, sender)
    new_stream = watch(connections, receiver)
    try:
        await until_synced(new_stream)
        new = await send(connections, new_sender, new_receiver)
        # The new request's own transaction finalised the old one (I1 needs it gone). Sent
        # the same way, the new request reaches the receiver too, in either order: the feed
        # reads each event's row, and the two reads can finish either way round.
        told = [await next_event(new_stream) for _ in range(2 if direction == "same" else 1)]
        kinds = {event.WhichOneof("event"): event for event in told}
        assert sorted(kinds, key=str) == (
            ["received", "resolved"] if direction == "same" else ["resolved"]
        )
        assert (kinds["resolved"].resolved.id, kinds["resolved"].resolved.status) == (
            old.id,
            EXPIRED,
        )
        if direction == "same":
            assert kinds["received"].received.id == new.id
    finally:
        new_stream.cancel()
    assert new.status == pb.ConnectionRequest.STATUS_PENDING
    rows = await sql.rows(
        "SELECT status, resolved_at = created_at + interval '30 days' AS exact"
        " FROM connection_requests WHERE id = $1",
        old.id,
    )
    assert [tuple(row) for row in rows] == [("expired", True)]
    assert not await sql.value(
        "SELECT count(*) FROM notifications WHERE source_type = 'connection_request'"
        " AND source_id = $1",
        old.id,
    )


async def test_the_sweeper_finalises_and_tells_the_receiver(
    server: RunningServer, connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    sender, receiver = await new_user(), await new_user()
    stale = await send(connections, sender, receiver)
    fresh = await send(connections, await new_user(), receiver)
    stream = watch(connections, receiver)
    try:
        synced = await until_synced(stream)
        assert {e.received.id for e in synced} == {stale.id, fresh.id}
        await age(sql, stale.id, "3 hours")
        swept = await server.service.expiry.sweep()
        assert swept is not None and swept >= 1
        told = await next_event(stream)
        assert told.WhichOneof("event") == "resolved"
        assert told.resolved.id == stale.id
        assert told.resolved.status == EXPIRED
        # resolve_time is the moment the TTL ran out, not the sweep's.
        created = told.resolved.create_time.ToDatetime(dt.UTC)
        assert told.resolved.resolve_time.ToDatetime(dt.UTC) - created == TTL
    finally:
        stream.cancel()
    rows = await sql.rows(
        "SELECT id, status FROM connection_requests WHERE id = ANY($1::bigint[]) ORDER BY id",
        [stale.id, fresh.id],
    )
    assert [tuple(row) for row in rows] == [(stale.id, "expired"), (fresh.id, "pending")]
    notes = await sql.rows(
        "SELECT source_id FROM notifications WHERE source_type = 'connection_request'"
        " AND source_id = ANY($1::bigint[])",
        [stale.id, fresh.id],
    )
    assert [row["source_id"] for row in notes] == [fresh.id]
    pushes = await sql.rows(
        "SELECT request_id, status, last_error FROM outbox WHERE request_id = ANY($1::bigint[])"
        " ORDER BY request_id",
        [stale.id, fresh.id],
    )
    assert [tuple(row) for row in pushes] == [
        (stale.id, "skipped", "skipped: expired"),
        (fresh.id, "pending", None),
    ]
    # Answered or not, an expired request is no longer anyone's to answer.
    assert await server.service.expiry.sweep() == 0


async def test_one_replica_sweeps_at_a_time_in_bounded_batches(
    server: RunningServer, new_user: NewUser, database_url: str
) -> None:
    receiver = await new_user()
    stale = store.BATCH_SIZE + 1
    conn = await asyncpg.connect(database_url)
    try:
        # More stale requests than one batch holds (one sender each: I1), straight into the
        # tables (with the audit rows SendRequest writes, one hour apart: I3), and a
        # statement trigger that logs how many rows each sweep UPDATE took.
        await conn.execute(
            """
            INSERT INTO users (id, umbral_name) SELECT g, 'stale' || g
            FROM generate_series(900001, 900000 + $1) AS g;
            WITH sent AS (
                INSERT INTO connection_requests (sender_id, receiver_id, created_at)
                SELECT g, $2, now() - interval '31 days' - (900000 + $1 - g) * interval '1 hour'
                FROM generate_series(900001, 900000 + $1) AS g
                RETURNING id, sender_id, receiver_id
            )
            INSERT INTO audit_log (action, actor_id, target_id, detail)
            SELECT 'connection.request_sent', sender_id, receiver_id,
                   jsonb_build_object('request_id', id)
            FROM sent;
            """.replace("$1", str(stale)).replace("$2", str(receiver.id))
        )
        await conn.execute(
            """
            CREATE TABLE sweep_batches (expired bigint NOT NULL);
            CREATE FUNCTION log_sweep_batch() RETURNS trigger LANGUAGE plpgsql
            SET search_path = public, pg_temp AS $$
            BEGIN
                INSERT INTO sweep_batches SELECT count(*) FROM changed;
                RETURN NULL;
            END $$;
            CREATE TRIGGER log_sweep AFTER UPDATE ON connection_requests
            REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
            EXECUTE FUNCTION log_sweep_batch();
            """
        )
        try:
            holder = await asyncpg.connect(database_url)
            try:
                await holder.execute("SELECT pg_advisory_lock($1)", store.LOCK_KEY)
                assert await server.service.expiry.sweep() is None  # another replica sweeps
                await holder.execute("SELECT pg_advisory_unlock($1)", store.LOCK_KEY)
            finally:
                await holder.close()
            assert await server.service.expiry.sweep() == stale
            batches = [row["expired"] for row in await conn.fetch("SELECT * FROM sweep_batches")]
            assert sorted(batches, reverse=True) == [store.BATCH_SIZE, 1]
        finally:
            await conn.execute(
                "DROP TRIGGER log_sweep ON connection_requests;"
                " DROP FUNCTION log_sweep_batch(); DROP TABLE sweep_batches"
            )
    finally:
        await conn.close()


async def test_each_sweep_batch_is_served_by_an_index(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        plan = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) {store._SWEEP.sql}",
            *store._SWEEP.args({"ttl": TTL, "batch": store.BATCH_SIZE}),
        )
    finally:
        await conn.close()
    assert "Seq Scan" not in plan and "ix_connection_requests_pending_age" in plan, plan


async def test_serve_sweeps_periodically(
    database_url: str, new_user: NewUser, connections: Connections, sql: Sql
) -> None:
    sender, receiver = await new_user(), await new_user()
    request = await send(connections, sender, receiver)
    await age(sql, request.id)
    sweeping = await start_server(test_config(database_url, expiry_sweep_seconds=0.2))
    try:

        async def expired() -> bool:
            status: str = await sql.value(
                "SELECT status FROM connection_requests WHERE id = $1", request.id
            )
            return status == "expired"

        await until(expired, within=10, what="the request swept to expired")
    finally:
        await stop_server(sweeping)


async def test_the_invariants_hold_after_this_module(database_url: str) -> None:
    """I1-I5 and the block rule, over every row the tests above left behind."""
    conn = await asyncpg.connect(database_url)
    try:
        assert await check_all(conn) == []
    finally:
        await conn.close()
