"""A WatchIncomingRequests stream gets one access line, written when it ends (SPEC 4.1)."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest

from tests.api.streams import READ_TIMEOUT, Event, next_event, send, watch
from tests.rich import error_reason
from tests.support import (
    AccessLine,
    Accounts,
    Connections,
    Metadata,
    NewUser,
    TestUser,
    Watch,
    access_line,
    until,
)
from umbra_grpc.interceptors.access_log import CORRELATION_ID_KEY
from umbra_grpc.pb import accounts_pb2, connections_pb2
from umbra_grpc.server import CONNECTION_SERVICE

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
WATCH_METHOD = f"/{CONNECTION_SERVICE}/WatchIncomingRequests"


def access_lines(
    records: list[logging.LogRecord], user: TestUser, correlation_id: str
) -> list[AccessLine]:
    """Access lines of one call: its correlation id, or its method and caller."""
    return [
        access_line(record)
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


async def drain(call: Watch, seen: list[Event]) -> None:
    """Reads, and keeps, every message until the stream ends."""
    while isinstance(event := await asyncio.wait_for(call.read(), READ_TIMEOUT), Event):
        seen.append(event)


async def test_a_stream_gets_one_access_line_when_it_ends(
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
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
    started = time.monotonic()  # both waits below share 5 s
    await until(  # the line follows the status
        lambda: access_lines(caplog.records, me, correlation_id),
        within=5,
        what="the stream's access line",
    )
    # A call made after the stream ended has its line written: a second line of the stream,
    # if one were coming, would be in by then.
    searched = time.time()
    await connections.Search(pb.SearchRequest(umbral_name="someone"), metadata=first.md)
    await until(
        lambda: [
            record
            for record in caplog.records
            if record.name == "umbra.access"
            and getattr(record, "caller", None) == str(first.id)
            and record.created >= searched
        ],
        within=5 - (time.monotonic() - started),
        what="the access line of the later call",
    )

    lines = access_lines(caplog.records, me, correlation_id)
    assert len(lines) == 1, [line.getMessage() for line in lines]
    line = lines[0]
    assert line.levelno == logging.INFO
    assert line.method == WATCH_METHOD
    assert line.correlation_id == correlation_id
    assert line.caller == str(me.id)
    assert line.code == "PERMISSION_DENIED"
    assert line.events_sent == len(seen)
    assert line.peer
    assert line.getMessage().startswith(f"{WATCH_METHOD} PERMISSION_DENIED ")
    # Its duration covers the whole stream, past the last event: written when it ended. (Only
    # what the server must have spanned is a bound: the client's own open-to-last-event time
    # also holds the call's set-up and the events' way back, which the server never sees.)
    assert line.duration_ms / 1000 >= last_sent - snapshot_seen
