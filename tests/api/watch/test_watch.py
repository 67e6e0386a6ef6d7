"""WatchIncomingRequests on real PostgreSQL through the real stubs (SPEC 5)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio

from tests.api.streams import Event, ended_with, next_event, send, until_synced, watch
from tests.support import (
    TEST_SECRET,
    Connections,
    NewUser,
    RunningServer,
    Sql,
    Watch,
    bearer,
    separate_channel,
    start_server,
    stop_server,
    test_config,
    until,
)
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc
from umbra_grpc.tokens import mint_token

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
# Enough events (15,000, about 1.5 MB) to fill what gRPC buffers for a client that does not read.
BURSTS, BURST = 300, 50


@pytest_asyncio.fixture(loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """Quick heartbeats and small limits so that every rule shows within seconds."""
    config = test_config(
        database_url,
        watch_heartbeat_seconds=0.5,
        watch_max_per_user=3,
        watch_max_streams=300,
        listener_probe_seconds=0.5,
        watch_write_timeout_seconds=2.0,
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await stop_server(running)


async def test_snapshot_synced_then_live_events(
    connections: Connections, new_user: NewUser
) -> None:
    me = await new_user()
    first, second, third = await new_user(), await new_user(), await new_user()
    old = [await send(connections, first, me), await send(connections, second, me)]
    call = watch(connections, me)
    try:
        snapshot = await until_synced(call)
        assert [e.received.id for e in snapshot] == [r.id for r in old]  # oldest first
        assert snapshot[0].received.sender_umbral_name == first.handle

        live = await send(connections, third, me)
        event = await next_event(call)
        assert event.WhichOneof("event") == "received"
        assert event.received.id == live.id
        assert event.received.sender_umbral_name == third.handle

        await connections.CancelRequest(
            pb.CancelRequestRequest(request_id=live.id), metadata=third.md
        )
        event = await next_event(call)
        assert event.WhichOneof("event") == "cancelled"
        assert event.cancelled.id == live.id
        assert event.cancelled.status == pb.ConnectionRequest.STATUS_CANCELLED

        # Answered "from another device": the stream is told it was resolved.
        await connections.Respond(
            pb.RespondRequest(request_id=old[0].id, action=pb.RespondRequest.ACTION_ACCEPT),
            metadata=me.md,
        )
        event = await next_event(call)
        assert event.WhichOneof("event") == "resolved"
        assert event.resolved.id == old[0].id
        assert event.resolved.status == pb.ConnectionRequest.STATUS_ACCEPTED
    finally:
        call.cancel()


async def test_heartbeat_after_quiet_interval(connections: Connections, new_user: NewUser) -> None:
    me = await new_user()
    call = watch(connections, me)
    try:
        await until_synced(call)
        event = await next_event(call, heartbeats=True)
        assert event.WhichOneof("event") == "heartbeat"
    finally:
        call.cancel()


async def test_stream_ends_when_the_token_expires(
    connections: Connections, new_user: NewUser
) -> None:
    me = await new_user()
    short = bearer(mint_token(TEST_SECRET, subject=str(me.id), ttl_seconds=2))
    call = watch(connections, me, metadata=short)
    await until_synced(call)
    assert await ended_with(call) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")


async def test_per_user_stream_limit(
    connections: Connections, new_user: NewUser, server: RunningServer
) -> None:
    me = await new_user()
    feed = server.service.feed
    before = feed.open_streams
    calls = [watch(connections, me) for _ in range(3)]
    try:
        for call in calls:
            await until_synced(call)
        extra = watch(connections, me)
        assert await ended_with(extra) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS")
    finally:
        for call in calls:
            call.cancel()
    # Closed streams free their places (once the server has seen them go).
    await until(
        lambda: feed.open_streams <= before,
        within=10,
        what="cancelled streams freeing their places",
        every=0.01,
    )
    again = watch(connections, me)
    try:
        await until_synced(again)
    finally:
        again.cancel()


async def events_until_quiet(call: Watch) -> list[Event]:
    """Events (heartbeats aside) until a heartbeat follows at least one of them."""
    events: list[Event] = []
    while (event := await next_event(call, heartbeats=True)).WhichOneof(
        "event"
    ) != "heartbeat" or not events:
        if event.WhichOneof("event") != "heartbeat":
            events.append(event)
    return events


async def test_200_watchers_each_get_exactly_their_own_events(
    connections: Connections, new_user: NewUser, server: RunningServer
) -> None:
    watchers = [await new_user() for _ in range(200)]
    senders = [await new_user() for _ in range(200)]
    channels = [separate_channel(server.target) for _ in range(10)]
    stubs = [connections_pb2_grpc.ConnectionServiceStub(channel) for channel in channels]
    calls = [watch(stubs[n % 10], user) for n, user in enumerate(watchers)]
    try:
        await asyncio.gather(*(until_synced(call) for call in calls))
        sent = await asyncio.gather(
            *(
                send(stubs[n % 10], sender, watcher)
                for n, (sender, watcher) in enumerate(zip(senders, watchers, strict=True))
            )
        )
        # Every event of every watcher, up to a quiet interval after the first: only their own.
        received = await asyncio.gather(*(events_until_quiet(call) for call in calls))
        assert [[event.received.id for event in events] for events in received] == [
            [request.id] for request in sent
        ]
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


async def test_slow_consumer_is_ended_while_others_carry_on(
    connections: Connections, new_user: NewUser, server: RunningServer, database_url: str, sql: Sql
) -> None:
    slow_user, fast_user, sender = await new_user(), await new_user(), await new_user()
    slow_request = await send(connections, sender, slow_user)
    fast_request = await send(connections, sender, fast_user)
    # Resolved, so that the feed (which checks each event against its row) believes the
    # `resolved` notifications sent below; by SQL, not Respond, whose own notification could
    # reach the listener after the streams below subscribed and add one event to the count.
    await sql.rows(
        "UPDATE connection_requests SET status = 'rejected', resolved_at = now()"
        " WHERE id = ANY($1::bigint[])",
        [slow_request.id, fast_request.id],
    )
    slow = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.api.slow_watcher",
        server.target,
        mint_token(TEST_SECRET, subject=str(slow_user.id)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[3],
    )
    fast = watch(connections, fast_user)
    try:
        assert slow.stdout is not None
        assert slow.stdin is not None
        line = await asyncio.wait_for(slow.stdout.readline(), 30)
        assert line.strip() == b"synced"
        await until_synced(fast)
        # Bursts of events for both; the fast client keeps up, the slow one reads nothing.
        connection = await asyncpg.connect(database_url)
        try:
            for _ in range(BURSTS):
                for user, request in ((slow_user, slow_request), (fast_user, fast_request)):
                    payload = {"kind": "resolved", "request_id": request.id, "receiver_id": user.id}
                    await connection.execute(
                        "SELECT pg_notify('umbra_requests', $1 || n || '}') "
                        "FROM generate_series(1, $2) AS n",
                        json.dumps(payload)[:-1] + ', "n": ',
                        BURST,
                    )
                for _ in range(BURST):
                    assert (await next_event(fast)).resolved.id == fast_request.id
                await asyncio.sleep(0.01)
        finally:
            await connection.close()
        slow.stdin.write(b"read\n")
        await slow.stdin.drain()
        ended = await asyncio.wait_for(slow.stdout.readline(), 60)
        assert ended.split() == [b"RESOURCE_EXHAUSTED", b"STREAM_TOO_SLOW"]
        # The fast one is still open and live.
        late = await send(connections, await new_user(), fast_user)
        assert (await next_event(fast)).received.id == late.id
    finally:
        fast.cancel()
        if slow.returncode is None:
            slow.kill()
        await slow.wait()


async def test_listener_loss_ends_streams_and_recovers(
    connections: Connections, new_user: NewUser, server: RunningServer, sql: Sql
) -> None:
    me, sender = await new_user(), await new_user()
    call = watch(connections, me)
    await until_synced(call)
    pid = server.service.listener.backend_pid
    await sql.rows("SELECT pg_terminate_backend($1)", pid)
    assert await ended_with(call) == (grpc.StatusCode.UNAVAILABLE, "FEED_UNAVAILABLE")
    # Within seconds a new stream works again, and events flow.

    async def synced() -> Watch | None:
        again = watch(connections, me)
        try:
            await until_synced(again)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return None
        return again

    again = await until(synced, within=10, what="a stream after losing the listener", every=0.1)
    try:
        assert server.service.listener.backend_pid != pid
        request = await send(connections, sender, me)
        assert (await next_event(again)).received.id == request.id
    finally:
        again.cancel()
