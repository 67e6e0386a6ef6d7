"""Helpers for tests of WatchIncomingRequests streams."""

from __future__ import annotations

import asyncio

import grpc

from tests.rich import DETAILS_KEY, error_reason
from tests.support import Connections, TestUser, Watch
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc

pb = connections_pb2
Event = pb.WatchIncomingRequestsResponse
Stub = connections_pb2_grpc.ConnectionServiceStub
READ_TIMEOUT = 10.0


def watch(
    stub: Connections, user: TestUser, metadata: tuple[tuple[str, str], ...] | None = None
) -> Watch:
    # A deadline, so that no test can hang on a stream (grpc reads ignore cancellation).
    return stub.WatchIncomingRequests(
        pb.WatchIncomingRequestsRequest(), metadata=metadata or user.md, timeout=60
    )


async def next_event(call: Watch, *, heartbeats: bool = False) -> Event:
    """The next event, skipping heartbeats unless asked for."""
    while True:
        event = await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert isinstance(event, Event), event
        if heartbeats or event.WhichOneof("event") != "heartbeat":
            return event


async def until_synced(call: Watch) -> list[Event]:
    events: list[Event] = []
    while (event := await next_event(call)).WhichOneof("event") != "synced":
        events.append(event)
    return events


async def ended_with(call: Watch) -> tuple[grpc.StatusCode, str | None]:
    """Reads until the stream ends: its code and ErrorInfo reason (None without details)."""
    try:
        while await asyncio.wait_for(call.read(), READ_TIMEOUT) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as error:
        has_details = any(key == DETAILS_KEY for key, _ in error.trailing_metadata() or ())
        return error.code(), error_reason(error) if has_details else None
    raise AssertionError("the stream ended OK")


async def send(stub: Connections, sender: TestUser, receiver: TestUser) -> pb.ConnectionRequest:
    reply = await stub.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md, timeout=10
    )
    return reply.request


async def delivers(
    watcher: Connections, writer: Connections, sender: TestUser, receiver: TestUser
) -> None:
    """A new stream of `receiver`'s (through `watcher`), once in sync, gets live the request
    `sender` then sends (through `writer`)."""
    call = watch(watcher, receiver)
    try:
        await until_synced(call)
        request = await send(writer, sender, receiver)
        assert (await next_event(call)).received.id == request.id
    finally:
        call.cancel()
