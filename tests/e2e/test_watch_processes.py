"""WatchIncomingRequests across `umbra-grpc serve` processes, and at their shutdown.

Real PostgreSQL through the fixtures; a second server is a real `umbra-grpc serve` subprocess
on the same database (SPEC 5: events cross replicas through LISTEN/NOTIFY). Everything here
runs on the session's event loop, which also serves the in-process server: nothing blocks it
(the subprocess is driven through asyncio, health is polled through grpc.aio).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from tests.api.streams import Stub, ended_with, next_event, send, until_synced, watch
from tests.serve import EXIT_SECONDS, Serve, serving
from tests.support import Connections, NewUser, Watch, separate_channel
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2

PY_SPY = Path(sys.executable).parent / "py-spy"
# Long, so that the bounds below are far above what a loaded machine takes (about a second)
# and far below what a server that waited out its grace would take.
GRACE_SECONDS = 20.0
# Time a process needs after its grace period to close its pool and interpreter.
EXIT_MARGIN_SECONDS = 1.5


# --- two processes on one database ----------------------------------------------------------


async def test_a_stream_on_one_process_gets_the_events_of_writes_made_through_another(
    connections: Connections, new_user: NewUser, database_url: str, tmp_path: Path
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

            async def end_of(call: Watch) -> tuple[grpc.StatusCode, str | None]:
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
