"""watch_incoming() on stream endings the real server cannot produce on cue (scripted.py):
STREAM_TOO_SLOW, an expired token, a silent stream, final errors, a late ending event.

The restart of a real server mid-watch is in test_watch_incoming.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.client.scripted import (
    SYNCED,
    ScriptedServer,
    Stream,
    cancelled,
    received,
)
from umbra_grpc.client import IncomingWatch, UmbraClient, error_reason
from umbra_grpc.pb import connections_pb2

pb = connections_pb2
READ_TIMEOUT = 10.0


def described(event: pb.WatchIncomingRequestsResponse) -> str:
    """`kind` or `kind id`, with `?` for a request whose ending is not known."""
    kind = event.WhichOneof("event")
    if kind in ("synced", "heartbeat"):
        return str(kind)
    request = getattr(event, str(kind))
    unknown = "?" if request.status == pb.ConnectionRequest.STATUS_UNSPECIFIED else ""
    return f"{kind} {request.id}{unknown}"


async def take(watch: IncomingWatch, count: int) -> list[str]:
    return [described(await asyncio.wait_for(anext(watch), READ_TIMEOUT)) for _ in range(count)]


async def test_too_slow_reopens_and_each_event_comes_once(scripted: ScriptedServer) -> None:
    scripted.script.streams = [
        Stream(
            [received(1), received(2), SYNCED, received(3)],
            "STREAM_TOO_SLOW",
        ),
        # 2 was answered meanwhile; 4 came; 1 and 3 are still pending.
        Stream([received(1), received(3), received(4), SYNCED, cancelled(4)]),
    ]
    async with UmbraClient(scripted.target, "t") as client, client.watch_incoming() as watch:
        assert await take(watch, 4) == ["received 1", "received 2", "synced", "received 3"]
        assert await take(watch, 4) == ["received 4", "resolved 2?", "synced", "cancelled 4"]
        assert watch.reconnects == 1
        assert watch.in_sync
        assert sorted(watch.pending) == [1, 3]
    assert len(scripted.script.seen("WatchIncomingRequests")) == 2


async def test_an_ending_after_a_reconnect_is_not_repeated(scripted: ScriptedServer) -> None:
    scripted.script.streams = [
        Stream([received(1), SYNCED], "SHUTTING_DOWN"),
        # Cancelled between the new stream's subscription and its snapshot: the server
        # sends the live event too.
        Stream([SYNCED, cancelled(1), received(2)]),
    ]
    async with UmbraClient(scripted.target, "t") as client, client.watch_incoming() as watch:
        assert await take(watch, 2) == ["received 1", "synced"]
        assert await take(watch, 3) == ["resolved 1?", "synced", "received 2"]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS"),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"),  # a fixed token stays expired
    ],
)
async def test_final_errors_end_the_iteration(
    scripted: ScriptedServer, code: grpc.StatusCode, reason: str
) -> None:
    scripted.script.streams = [Stream([received(1), SYNCED], reason)]
    async with UmbraClient(scripted.target, "fixed") as client, client.watch_incoming() as watch:
        assert await take(watch, 2) == ["received 1", "synced"]
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await take(watch, 1)
    assert (ended.value.code(), error_reason(ended.value)) == (code, reason)
    assert len(scripted.script.seen("WatchIncomingRequests")) == 1


async def test_an_expired_token_reopens_with_a_fresh_one(scripted: ScriptedServer) -> None:
    scripted.script.streams = [
        Stream([SYNCED], "TOKEN_EXPIRED"),
        Stream([received(7), SYNCED]),
    ]
    tokens = iter(["old", "new"])
    client = UmbraClient(scripted.target, lambda: next(tokens))
    async with client, client.watch_incoming() as watch:
        assert await take(watch, 3) == ["synced", "received 7", "synced"]
    sent = [seen["authorization"] for seen in scripted.script.seen("WatchIncomingRequests")]
    assert sent == ["Bearer old", "Bearer new"]


async def test_a_silent_stream_is_reopened(scripted: ScriptedServer) -> None:
    scripted.script.streams = [Stream([SYNCED]), Stream([received(5), SYNCED])]
    client = UmbraClient(scripted.target, "t")
    async with client, client.watch_incoming(stall_timeout=0.3) as watch:
        assert await take(watch, 3) == ["synced", "received 5", "synced"]
        assert watch.reconnects == 1
