"""Timing floors and rate limits on the full server stack (defaults on, as in production)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2

from tests.rich import error_reason, status_details
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
FLOOR = 0.050


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """This module's server runs with the default floors and a small Search limit."""
    config = test_config(
        database_url, timing_floors="default", rate_limits="Search=40/60s,SendRequest=10/30s"
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await stop_server(running)


async def timed(call: Awaitable[object]) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        await call
        result = "OK"
    except grpc.aio.AioRpcError as error:
        result = error.code().name
    return time.perf_counter() - started, result


async def test_every_search_outcome_waits_for_the_floor(
    connections: Connections, new_user: NewUser
) -> None:
    me = await new_user()
    not_opted_in = await new_user(accept=False)
    reachable = await new_user()
    closed = await new_user(accept=False)
    inactive = await new_user(active=False)
    cases = [
        (me, reachable.handle, "OK"),
        (me, "nobody-by-that-name", "OK"),
        (me, inactive.handle, "OK"),
        (me, closed.handle, "OK"),
        (me, me.handle, "OK"),
        (not_opted_in, reachable.handle, "OK"),
        (me, "x", "INVALID_ARGUMENT"),
    ]
    for caller, handle, expected in cases:
        elapsed, result = await timed(
            connections.Search(pb.SearchRequest(umbral_name=handle), metadata=caller.md)
        )
        assert result == expected
        assert elapsed >= FLOOR, (handle, elapsed)


async def test_send_request_not_found_waits_for_the_floor(
    connections: Connections, new_user: NewUser
) -> None:
    me = await new_user()
    closed = await new_user(accept=False)
    inactive = await new_user(active=False)
    for handle in ("nobody-by-that-name", closed.handle, inactive.handle):
        elapsed, result = await timed(
            connections.SendRequest(pb.SendRequestRequest(umbral_name=handle), metadata=me.md)
        )
        assert result == "NOT_FOUND"
        assert elapsed >= FLOOR


async def test_search_is_rate_limited_per_caller(
    connections: Connections, new_user: NewUser
) -> None:
    noisy, quiet = await new_user(), await new_user()
    request = pb.SearchRequest(umbral_name="someone")
    for _ in range(40):
        await connections.Search(request, metadata=noisy.md)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connections.Search(request, metadata=noisy.md)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(caught.value) == "RATE_LIMITED"
    retry = [
        info
        for detail in status_details(caught.value).details
        if detail.Unpack(info := error_details_pb2.RetryInfo())
    ]
    # "40/60s": a burst of 40, then one token every 60 s.
    assert retry and 0 < retry[0].retry_delay.ToTimedelta().total_seconds() <= 60
    # Another caller has a bucket of its own.
    assert (await connections.Search(request, metadata=quiet.md)).found is False
