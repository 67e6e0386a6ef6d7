"""The Prometheus endpoint: RPC counts and latencies, streams, pool, listener, outbox."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from tests.api.streams import until_synced
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    start_server,
    stop_server,
    test_config,
    until,
)
from umbra_grpc.embedded import free_port
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(
        test_config(database_url, metrics_listen=f"127.0.0.1:{free_port()}")
    )
    try:
        yield running
    finally:
        await stop_server(running)


def scrape(server: RunningServer) -> str:
    url = f"http://{server.service.config.metrics_listen}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text: str = reply.read().decode()
    return text


async def scrape_with(server: RunningServer, line_start: str, within: float = 10.0) -> str:
    """The first scrape holding `line_start`: a refused call is counted as its handler unwinds,
    which can be just after the client has its status."""

    def holding() -> str | None:
        text = scrape(server)
        return (
            text if any(line.startswith(line_start + " ") for line in text.splitlines()) else None
        )

    return await until(holding, within=within, what=f"{line_start} in the scrape")


def value(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in the scrape")


async def test_rpcs_are_counted_by_method_and_code(
    connections: Connections, new_user: NewUser, server: RunningServer
) -> None:
    me = await new_user()
    await connections.Search(pb.SearchRequest(umbral_name="someone"), metadata=me.md)
    with pytest.raises(grpc.aio.AioRpcError):
        await connections.Search(pb.SearchRequest(umbral_name="x"), metadata=me.md)
    search = "/umbra.connections.v1.ConnectionService/Search"
    refused = f'umbra_rpcs_total{{code="INVALID_ARGUMENT",method="{search}"}}'
    text = await scrape_with(server, refused)
    assert value(text, f'umbra_rpcs_total{{code="OK",method="{search}"}}') >= 1
    assert value(text, refused) == 1
    assert value(text, f'umbra_rpc_duration_seconds_count{{method="{search}"}}') >= 2


async def test_live_values_are_read_at_scrape_time(
    connections: Connections, new_user: NewUser, server: RunningServer
) -> None:
    me = await new_user()
    call = connections.WatchIncomingRequests(
        pb.WatchIncomingRequestsRequest(), metadata=me.md, timeout=30
    )
    try:
        await until_synced(call)
        text = scrape(server)
        assert value(text, "umbra_watch_streams") == 1
    finally:
        call.cancel()
    assert value(text, "umbra_listener_up") == 1
    assert value(text, "umbra_db_pool_size") == server.service.config.db_pool_size
    for name in (
        "umbra_db_pool_checked_out",
        "umbra_outbox_backlog",
        "umbra_outbox_sent_total",
        "umbra_outbox_failed_total",
        "umbra_timing_floor_overruns_total",
        "umbra_rate_limited_total",
    ):
        assert value(text, name) >= 0


async def test_overruns_and_refusals_are_counted(database_url: str, new_user: NewUser) -> None:
    """A floor every call outlasts (0 ms) and a limit of one call: each counter moves by
    exactly the calls that overran or were refused."""
    config = test_config(
        database_url,
        metrics_listen=f"127.0.0.1:{free_port()}",
        timing_floors="ListIncomingRequests=0ms",
        rate_limits="ListConnections=1/1h",
    )
    limited = await start_server(config)
    try:
        me = await new_user()
        stub = connections_pb2_grpc.ConnectionServiceStub(limited.channel)
        before = scrape(limited)
        for _ in range(3):
            await stub.ListIncomingRequests(pb.ListIncomingRequestsRequest(), metadata=me.md)
        await stub.ListConnections(pb.ListConnectionsRequest(), metadata=me.md)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListConnections(pb.ListConnectionsRequest(), metadata=me.md)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        after = scrape(limited)
    finally:
        await stop_server(limited)
    for name, moved in (("umbra_timing_floor_overruns_total", 3), ("umbra_rate_limited_total", 2)):
        assert value(after, name) - value(before, name) == moved, name
