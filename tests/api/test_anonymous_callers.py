"""SPEC 10.1: nothing a caller without a token does grows the process or starves the others."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.api.streams import until_synced, watch
from tests.rich import error_reason
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    raw_unary_unary,
    separate_channel,
    start_server,
    stop_server,
    test_config,
    until,
)
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
ANONYMOUS_CAP = 10
WAVES, WAVE = 10, 200  # 2,000 attempts, 200 at once
# Room for one wave in flight (refusals take a moment too), and far less than the attempts:
# if they held their slots, token holders would be refused.
MAX_CONCURRENT_RPCS = WAVE
# Streams per client connection stay below UMBRA_MAX_CONCURRENT_STREAMS (100), so a wave
# reaches the server at once instead of queueing in the client.
PER_CHANNEL = 50


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """Small call limits, so that a few hundred held calls would fill the server."""
    config = test_config(
        database_url,
        max_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        watch_max_streams=10,
        max_anonymous_streams=ANONYMOUS_CAP,
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await stop_server(running)


def rpc_method_labels(server: RunningServer) -> set[str]:
    """The `method` label values of the per-call metrics (counter and histogram)."""
    labels: set[str] = set()
    for family in server.service.metrics.registry.collect():
        if family.name in ("umbra_rpcs", "umbra_rpc_duration_seconds"):
            labels.update(sample.labels["method"] for sample in family.samples)
    return labels


async def test_random_paths_are_one_metrics_label(server: RunningServer) -> None:
    before = rpc_method_labels(server)

    async def probe() -> None:
        path = f"/{secrets.token_hex(6)}.Svc/{secrets.token_hex(6)}"
        unknown = raw_unary_unary(server.channel, path)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await unknown(b"", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED

    for _ in range(10):
        await asyncio.gather(*(probe() for _ in range(100)))
    added = rpc_method_labels(server) - before
    assert added <= {"unknown"}, f"{len(added)} new method labels"
    assert "unknown" in rpc_method_labels(server)


Outcome = tuple[grpc.StatusCode, str | None]
# Health and reflection calls: their stubs are untyped (grpc_health, grpc_reflection).
AnonymousCall = grpc.aio.UnaryStreamCall[Any, Any] | grpc.aio.StreamStreamCall[Any, Any]
REFUSED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ANONYMOUS_STREAMS")


async def ending(call: AnonymousCall) -> Outcome:
    """Reads a stream until its first message (OK) or its end (the code and reason)."""
    try:
        first = await asyncio.wait_for(call.read(), 30)
    except grpc.aio.AioRpcError as error:
        return error.code(), error_reason(error)
    assert first is not grpc.aio.EOF
    return grpc.StatusCode.OK, None


async def test_anonymous_streams_are_capped_and_token_holders_keep_working(
    server: RunningServer, connections: Connections, new_user: NewUser
) -> None:
    channels = [separate_channel(server.target) for _ in range(WAVE // PER_CHANNEL + 1)]
    held: list[AnonymousCall] = []
    attempts: list[AnonymousCall] = []
    me, sender = await new_user(), await new_user()
    try:
        health = health_pb2_grpc.HealthStub(channels[0])
        held = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(ANONYMOUS_CAP)]
        opened = await asyncio.gather(*(ending(call) for call in held))
        assert opened == [(grpc.StatusCode.OK, None)] * ANONYMOUS_CAP
        assert server.service.anonymous_streams.open_streams == ANONYMOUS_CAP

        # Thousands more, health Watch and reflection alike, never cancelled by the client:
        # each must end at once rather than hold a call slot, while token holders are served.
        for _ in range(WAVES):
            wave: list[AnonymousCall] = []
            for index in range(WAVE):
                channel = channels[1 + index // PER_CHANNEL]
                if index % 2:
                    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                    request = reflection_pb2.ServerReflectionRequest(list_services="")
                    wave.append(stub.ServerReflectionInfo(iter([request])))
                else:
                    stub = health_pb2_grpc.HealthStub(channel)
                    wave.append(stub.Watch(health_pb2.HealthCheckRequest()))
            attempts.extend(wave)
            during = await asyncio.gather(
                *(ending(call) for call in wave),
                connections.Search(pb.SearchRequest(umbral_name=sender.handle), metadata=me.md),
            )
            outcomes, search = during[:-1], during[-1]
            assert set(outcomes) == {REFUSED}
            assert isinstance(search, pb.SearchResponse)
            assert search.found
        # Afterwards too, with the cap's worth of anonymous streams still open.
        assert server.service.anonymous_streams.open_streams == ANONYMOUS_CAP
        stream = watch(connections_pb2_grpc.ConnectionServiceStub(server.channel), me)
        try:
            await until_synced(stream)
            sent = await connections.SendRequest(
                pb.SendRequestRequest(umbral_name=me.handle), metadata=sender.md
            )
            event = await asyncio.wait_for(stream.read(), 10)
            assert isinstance(event, pb.WatchIncomingRequestsResponse)
            assert event.received.id == sent.request.id
        finally:
            stream.cancel()
    finally:
        for call in [*held, *attempts]:
            call.cancel()
        for channel in channels:
            await channel.close()
    await until(
        lambda: server.service.anonymous_streams.open_streams == 0,
        within=10,
        what="every anonymous stream closed",
        every=0.05,
    )
