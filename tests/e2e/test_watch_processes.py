"""WatchIncomingRequests across processes, at shutdown, with the listener down, in the log.

Real PostgreSQL through the fixtures; a second server is a real `umbra-grpc serve` subprocess
on the same database (SPEC 5: events cross replicas through LISTEN/NOTIFY). Everything here
runs on the session's event loop, which also serves the in-process server: nothing blocks it
(the subprocess is driven through asyncio, health is polled through grpc.aio).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.api.streams import (
    READ_TIMEOUT,
    Event,
    Stub,
    ended_with,
    next_event,
    send,
    until_synced,
    watch,
)
from tests.rich import error_reason
from tests.serve import EXIT_SECONDS, Serve, serving
from tests.support import (
    NewUser,
    RunningServer,
    TestUser,
    separate_channel,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.interceptors.access_log import CORRELATION_ID_KEY
from umbra_grpc.pb import accounts_pb2, connections_pb2
from umbra_grpc.server import CONNECTION_SERVICE

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WATCH_METHOD = f"/{CONNECTION_SERVICE}/WatchIncomingRequests"

PY_SPY = Path(sys.executable).parent / "py-spy"
# Long, so that the bounds below are far above what a loaded machine takes (about a second)
# and far below what a server that waited out its grace would take.
GRACE_SECONDS = 20.0
# Time a process needs after its grace period to close its pool and interpreter.
EXIT_MARGIN_SECONDS = 1.5


async def health_becomes(channel: grpc.aio.Channel, status: int, within: float) -> float:
    """Seconds until grpc health says `status` for the server and ConnectionService."""
    health = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    while time.monotonic() - started < within:
        replies = [
            await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            for name in ("", CONNECTION_SERVICE)
        ]
        if all(reply.status == status for reply in replies):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"health never became {status} within {within}s")


# --- two processes on one database ----------------------------------------------------------


async def test_a_stream_on_one_process_gets_the_events_of_writes_made_through_another(
    connections: Stub, new_user: NewUser, database_url: str, tmp_path: Path
) -> None:
    me, early, late = await new_user(), await new_user(), await new_user()
    async with (
        serving(database_url, tmp_path) as other,
        grpc.aio.insecure_channel(other.target) as channel,
    ):
        elsewhere = Stub(channel)
        pending = await send(elsewhere, early, me)
        # The stream is held by the in-process server; every write goes through the other.
        call = watch(connections, me)
        try:
            snapshot = await until_synced(call)
            assert [event.received.id for event in snapshot] == [pending.id]

            sent = await send(elsewhere, late, me)
            event = await next_event(call)
            assert event.WhichOneof("event") == "received"
            assert event.received.id == sent.id
            assert event.received.sender_umbral_name == late.handle

            await elsewhere.CancelRequest(
                pb.CancelRequestRequest(request_id=sent.id), metadata=late.md, timeout=10
            )
            event = await next_event(call)
            assert event.WhichOneof("event") == "cancelled"
            assert event.cancelled.id == sent.id
            assert event.cancelled.status == pb.ConnectionRequest.STATUS_CANCELLED

            # The watcher answers from "another device", connected to the other process.
            await elsewhere.Respond(
                pb.RespondRequest(request_id=pending.id, action=pb.RespondRequest.ACTION_ACCEPT),
                metadata=me.md,
                timeout=10,
            )
            event = await next_event(call)
            assert event.WhichOneof("event") == "resolved"
            assert event.resolved.id == pending.id
            assert event.resolved.status == pb.ConnectionRequest.STATUS_ACCEPTED
        finally:
            call.cancel()
    assert "Traceback" not in other.stderr


# --- shutdown with 100 open streams ---------------------------------------------------------


async def exit_code(server: Serve) -> int:
    """The server's exit code; a server that does not exit fails the test with its stacks."""
    try:
        return await asyncio.wait_for(server.process.wait(), EXIT_SECONDS)
    except TimeoutError:
        dump = await asyncio.create_subprocess_exec(
            str(PY_SPY),
            "dump",
            "--pid",
            str(server.process.pid),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        stacks, _ = await dump.communicate()
        pytest.fail(
            f"serve did not exit {EXIT_SECONDS}s after SIGTERM; where it is:\n"
            f"{stacks.decode(errors='replace')[-6000:]}\nits log:\n{server.stderr[-3000:]}"
        )


async def test_sigterm_with_100_open_streams_ends_them_unavailable_and_exits_within_grace(
    new_user: NewUser, database_url: str, tmp_path: Path
) -> None:
    # UMBRA_WATCH_MAX_PER_USER is 5 by default: 20 users hold 5 streams each.
    users = [await new_user() for _ in range(20)]
    async with serving(database_url, tmp_path, UMBRA_GRACE_SECONDS=str(GRACE_SECONDS)) as other:
        # Ten connections of ten streams: one HTTP/2 connection allows 100 streams at most.
        channels = [separate_channel(other.target) for _ in range(10)]
        try:
            stubs = [Stub(channel) for channel in channels]
            calls = [watch(stubs[n % 10], users[n % 20]) for n in range(100)]
            await asyncio.gather(*(until_synced(call) for call in calls))

            ended_at: list[float] = []

            async def end_of(call) -> tuple[grpc.StatusCode, str | None]:
                outcome = await ended_with(call)
                ended_at.append(time.monotonic() - signalled)
                return outcome

            signalled = time.monotonic()
            other.process.send_signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*(end_of(call) for call in calls))
            returncode = await exit_code(other)
            exited = time.monotonic() - signalled
        finally:
            for channel in channels:
                await channel.close()
    # The server's own story, without its access lines, for any failure below.
    story = "\n".join(line for line in other.stderr.splitlines() if "umbra.access" not in line)
    assert returncode == 0, story[-3000:]
    assert Counter(outcomes) == {(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"): 100}, story[-3000:]
    # Ended by the server at once, not cut off when the grace period ran out...
    assert max(ended_at) < GRACE_SECONDS / 2, max(ended_at)
    # ...so the process is gone well within it.
    assert exited < GRACE_SECONDS + EXIT_MARGIN_SECONDS, exited
    assert "Traceback" not in other.stderr, story[-3000:]


# --- health follows the listener ------------------------------------------------------------


@pytest.fixture
async def own_server(database_url: str) -> AsyncIterator[RunningServer]:
    """A server of this test's own, so that stopping its listener disturbs no one else."""
    running = await start_server(test_config(database_url, listener_probe_seconds=0.5))
    try:
        yield running
    finally:
        await stop_server(running)


async def test_health_and_streams_follow_the_listener(
    own_server: RunningServer, new_user: NewUser
) -> None:
    stub = Stub(own_server.channel)
    me, sender = await new_user(), await new_user()
    open_call = watch(stub, me)
    await until_synced(open_call)

    await own_server.service.listener.stop()
    await health_becomes(own_server.channel, NOT_SERVING, within=5)
    # Events may be missed while no one listens: the open stream ends, new ones are refused.
    assert await ended_with(open_call) == (grpc.StatusCode.UNAVAILABLE, "FEED_UNAVAILABLE")
    refused = watch(stub, me)
    assert await ended_with(refused) == (grpc.StatusCode.UNAVAILABLE, "FEED_UNAVAILABLE")

    await own_server.service.listener.start()
    await health_becomes(own_server.channel, SERVING, within=10)
    again = watch(stub, me)
    try:
        await until_synced(again)
        request = await send(stub, sender, me)
        assert (await next_event(again)).received.id == request.id
    finally:
        again.cancel()


# --- the access log of a stream -------------------------------------------------------------


def access_lines(
    records: list[logging.LogRecord], user: TestUser, correlation_id: str
) -> list[logging.LogRecord]:
    """Access lines of one call: its correlation id, or its method and caller."""
    return [
        record
        for record in records
        if record.name == "umbra.access"
        and (
            getattr(record, "correlation_id", None) == correlation_id
            or (
                getattr(record, "method", None) == WATCH_METHOD
                and getattr(record, "caller", None) == str(user.id)
            )
        )
    ]


async def drain(call, seen: list[Event]) -> None:
    """Reads, and keeps, every message until the stream ends."""
    while (event := await asyncio.wait_for(call.read(), READ_TIMEOUT)) is not grpc.aio.EOF:
        seen.append(event)


async def test_a_stream_gets_one_access_line_when_it_ends(
    connections: Stub,
    accounts,
    admin,
    new_user: NewUser,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="umbra.access")
    me, first, second, third = [await new_user() for _ in range(4)]
    await send(connections, first, me)
    call = watch(connections, me)
    seen = [await next_event(call, heartbeats=True) for _ in range(2)]
    # The server's stream was open before this (it had sent the snapshot) ...
    snapshot_seen = time.monotonic()
    for sender in (second, third):
        # ... and still open after this: it sends the event for a request made from here on.
        last_sent = time.monotonic()
        await send(connections, sender, me)
        seen.append(await next_event(call, heartbeats=True))
    kinds = [event.WhichOneof("event") for event in seen]
    assert kinds == ["received", "synced", "received", "received"]
    while_open = list(caplog.records)

    # Deactivated: the server ends the stream PERMISSION_DENIED, whenever the test gets here.
    await accounts.UpsertUser(
        accounts_pb2.UpsertUserRequest(
            user=accounts_pb2.User(id=me.id, umbral_name=me.handle, is_active=False)
        ),
        metadata=admin,
    )
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await drain(call, seen)  # heartbeats, if any came, count too
    assert (ended.value.code(), error_reason(ended.value)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    correlation_id = dict(ended.value.trailing_metadata())[CORRELATION_ID_KEY]
    # Nothing was written while the stream was open, whatever its handler had done so far.
    assert access_lines(while_open, me, correlation_id) == []
    deadline = time.monotonic() + 5
    while not access_lines(caplog.records, me, correlation_id):  # it follows the status
        assert time.monotonic() < deadline, "no access line"
        await asyncio.sleep(0.02)
    # A call made after the stream ended has its line written: a second line of the stream,
    # if one were coming, would be in by then.
    searched = time.time()
    await connections.Search(pb.SearchRequest(umbral_name="someone"), metadata=first.md)
    while not [
        record
        for record in caplog.records
        if record.name == "umbra.access"
        and getattr(record, "caller", None) == str(first.id)
        and record.created >= searched
    ]:
        assert time.monotonic() < deadline, "no access line for the later call"
        await asyncio.sleep(0.02)

    lines = access_lines(caplog.records, me, correlation_id)
    assert len(lines) == 1, [line.getMessage() for line in lines]
    line = lines[0]
    assert line.levelno == logging.INFO
    assert line.method == WATCH_METHOD  # type: ignore[attr-defined]
    assert line.correlation_id == correlation_id  # type: ignore[attr-defined]
    assert line.caller == str(me.id)  # type: ignore[attr-defined]
    assert line.code == "PERMISSION_DENIED"  # type: ignore[attr-defined]
    assert line.events_sent == len(seen)  # type: ignore[attr-defined]
    assert line.peer  # type: ignore[attr-defined]
    assert line.getMessage().startswith(f"{WATCH_METHOD} PERMISSION_DENIED ")
    # Its duration covers the whole stream, past the last event: written when it ended. (Only
    # what the server must have spanned is a bound: the client's own open-to-last-event time
    # also holds the call's set-up and the events' way back, which the server never sees.)
    assert line.duration_ms / 1000 >= last_sent - snapshot_seen  # type: ignore[attr-defined]
