"""UMBRA_MAX_CONCURRENT_RPCS caps unary calls in progress; watch streams count on their own.

A test-only method (`Hold/Wait`, served behind the product's interceptors) keeps calls in
progress until the test releases them, so the cap is reached exactly, without timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.api.streams import Stub, until_synced, watch
from tests.rich import error_reason
from tests.support import (
    Metadata,
    NewUser,
    RunningServer,
    TestUser,
    Watch,
    raw_unary_unary,
    separate_channel,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.interceptors.concurrency import TOO_MANY_CALLS

pytestmark = pytest.mark.asyncio(loop_scope="session")
CAP = 3
STREAMS = 2
ANONYMOUS = 2
HOLD_METHOD = "/umbra.test.v1.Hold/Wait"


class Hold:
    """`Hold/Wait`: answers once released; counts the calls inside it."""

    def __init__(self) -> None:
        self.inside = 0
        self._changed = asyncio.Condition()
        self._release = asyncio.Event()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "umbra.test.v1.Hold", {"Wait": grpc.unary_unary_rpc_method_handler(self._wait)}
        )

    async def _wait(self, request: bytes, context: object) -> bytes:
        async with self._changed:
            self.inside += 1
            self._changed.notify_all()
        await self._release.wait()
        async with self._changed:
            self.inside -= 1
        return request

    async def until_inside(self, count: int) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.inside == count), 30)

    def release(self) -> None:
        self._release.set()

    def close_again(self) -> None:
        self._release = asyncio.Event()


def add_generic_handler(handler: grpc.GenericRpcHandler, server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture(scope="module")
def hold() -> Hold:
    return Hold()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str, hold: Hold) -> AsyncIterator[RunningServer]:
    """A server whose caps are small: CAP unary calls, STREAMS watch streams."""
    config = test_config(database_url, max_concurrent_rpcs=CAP, watch_max_streams=STREAMS)
    running = await start_server(config, extra_servicers=[(add_generic_handler, hold.handler())])
    try:
        yield running
    finally:
        await stop_server(running)


async def hold_calls(
    channel: grpc.aio.Channel, user: TestUser, count: int
) -> list[asyncio.Task[bytes]]:
    wait = raw_unary_unary(channel, HOLD_METHOD)
    return [
        asyncio.ensure_future(wait(b"held", metadata=user.md, timeout=60)) for _ in range(count)
    ]


async def refused_reason(channel: grpc.aio.Channel, metadata: Metadata) -> str:
    """A health check (unary, no token needed) must be refused: its ErrorInfo reason."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return error_reason(refused.value)


async def test_the_cap_holds_for_unary_calls_and_streams_count_apart(
    server: RunningServer, hold: Hold, new_user: NewUser
) -> None:
    user = await new_user()
    channel = separate_channel(server.target)
    streams = []
    try:
        # CAP calls in progress: the next unary call of any kind is refused.
        held = await hold_calls(channel, user, CAP)
        await hold.until_inside(CAP)
        assert await refused_reason(channel, user.md) == TOO_MANY_CALLS
        # Watch streams are not unary calls: they open while the unary cap is full.
        stub = Stub(channel)
        streams = [watch(stub, user) for _ in range(STREAMS)]
        for stream in streams:
            await until_synced(stream)
        hold.release()
        assert await asyncio.gather(*held) == [b"held"] * CAP

        # With every watch stream allowed open, CAP unary calls still fit, and the one after
        # them is refused by the unary cap (not by grpc's backstop, which has no ErrorInfo).
        hold.close_again()
        held = await hold_calls(channel, user, CAP)
        await hold.until_inside(CAP)
        assert await refused_reason(channel, user.md) == TOO_MANY_CALLS
        hold.release()
        assert await asyncio.gather(*held) == [b"held"] * CAP
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for stream in streams:
            stream.cancel()
        await channel.close()


async def stream_refusal(call: Watch) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    return error_reason(refused.value)


async def test_with_every_limit_full_refusals_still_carry_their_reason(
    database_url: str, new_user: NewUser
) -> None:
    # grpc's own limit (a backstop) has room past all three limits: were it only their sum,
    # the call after them would be refused by grpc, bare, instead of by the limit it hit.
    # On a server of its own, so that no call of another test is still being counted.
    hold = Hold()
    server = await start_server(
        test_config(
            database_url,
            max_concurrent_rpcs=CAP,
            watch_max_streams=STREAMS,
            max_anonymous_streams=ANONYMOUS,
        ),
        extra_servicers=[(add_generic_handler, hold.handler())],
    )
    user = await new_user()
    channel = separate_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    streams: list[grpc.aio.UnaryStreamCall[Any, Any]] = []  # ours and health's (untyped)
    try:
        held = await hold_calls(channel, user, CAP)
        await hold.until_inside(CAP)
        for _ in range(STREAMS):
            streams.append(watch(Stub(channel), user))
            await until_synced(streams[-1])
        for _ in range(ANONYMOUS):
            streams.append(health.Watch(health_pb2.HealthCheckRequest(), timeout=60))
            await streams[-1].read()  # the current status: open on the server

        assert await refused_reason(channel, user.md) == TOO_MANY_CALLS
        assert await stream_refusal(watch(Stub(channel), user)) == "TOO_MANY_STREAMS"
        anonymous = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert await stream_refusal(anonymous) == "TOO_MANY_ANONYMOUS_STREAMS"
        hold.release()
        assert await asyncio.gather(*held) == [b"held"] * CAP
    finally:
        hold.release()
        for stream in streams:
            stream.cancel()
        await channel.close()
        await stop_server(server)
