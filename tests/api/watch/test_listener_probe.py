"""The LISTEN connection is proved to hear, not trusted: a self-NOTIFY probe (SPEC 5, 12).

The listener goes through `UMBRA_LISTEN_DATABASE_URL`, here a proxy that can drop every
notification on its way (`tests/pg_proxy.py`), as a transaction pooler does to LISTEN; the
pool goes straight to the database. Events are sent through the test's other server.
Health and open streams follow the listener when it stops and starts again.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.api.streams import Stub, delivers, ended_with, next_event, send, until_synced, watch
from tests.api.test_metrics import value
from tests.pg_proxy import NotificationDroppingProxy
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
from umbra_grpc.server import CONNECTION_SERVICE, Service
from umbra_grpc.storage.database import Database

pytestmark = pytest.mark.asyncio(loop_scope="session")
PROBE_SECONDS = 0.2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest_asyncio.fixture(loop_scope="session")
async def proxy(database_url: str) -> AsyncIterator[NotificationDroppingProxy]:
    running = NotificationDroppingProxy(database_url)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def health_becomes(channel: grpc.aio.Channel, status: int, within: float) -> float:
    """Seconds until grpc health says `status` for the server and ConnectionService."""
    health = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()

    async def says_status() -> bool:
        replies = [
            await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            for name in ("", CONNECTION_SERVICE)
        ]
        return all(reply.status == status for reply in replies)

    await until(says_status, within=within, what=f"health {status}", every=0.1)
    return time.monotonic() - started


def serving_gauge(service: Service) -> float:
    """What the metrics endpoint says load balancers should do (deploy/haproxy.cfg reads it)."""
    url = f"http://{service.config.metrics_listen}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        return value(reply.read().decode(), "umbra_serving")


async def test_a_listener_that_hears_nothing_is_never_up(
    database_url: str, proxy: NotificationDroppingProxy, connections: Connections, new_user: NewUser
) -> None:
    proxy.deaf = True
    config = test_config(
        database_url,
        listen_database_url=proxy.url,
        listener_probe_seconds=PROBE_SECONDS,
        metrics_listen=f"127.0.0.1:{free_port()}",
    )
    service = Service(config, Database.connect(config))
    went_up: list[float] = []
    service.listener.on_up(lambda: went_up.append(time.monotonic()))
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        # LISTEN went through, the probe's NOTIFY was dropped, and the listener tried again.
        await until(
            lambda: proxy.connections >= 2 and proxy.dropped >= 1,
            within=30,
            what="the listener connected and a probe dropped",
            every=0.05,
        )
        assert went_up == []
        assert not service.listener.connected
        await health_becomes(channel, NOT_SERVING, within=5)
        assert serving_gauge(service) == 0

        # The same route letting notifications through: up, serving, and events arrive on it.
        proxy.deaf = False
        await health_becomes(channel, SERVING, within=20)
        assert serving_gauge(service) == 1
        me, sender = await new_user(), await new_user()
        await delivers(Stub(channel), connections, sender, me)
    finally:
        await channel.close()
        await service.stop(0.5)


async def test_a_listener_that_goes_deaf_is_lost_until_it_hears_again(
    database_url: str, proxy: NotificationDroppingProxy, connections: Connections, new_user: NewUser
) -> None:
    running = await start_server(
        test_config(
            database_url,
            listen_database_url=proxy.url,
            listener_probe_seconds=PROBE_SECONDS,
            # Off, as they too use the listener's URL (for a session of their own each run).
            retention_interval_seconds=0,
            expiry_sweep_seconds=0,
        )
    )
    try:
        assert proxy.connections == 1  # the listener, and only it, goes through the proxy
        stub = Stub(running.channel)
        me, sender = await new_user(), await new_user()
        call = watch(stub, me)
        await until_synced(call)

        proxy.deaf = True
        assert await ended_with(call) == (grpc.StatusCode.UNAVAILABLE, "FEED_UNAVAILABLE")
        await health_becomes(running.channel, NOT_SERVING, within=10)

        proxy.deaf = False
        await health_becomes(running.channel, SERVING, within=20)
        assert proxy.connections >= 2
        await delivers(stub, connections, sender, me)
    finally:
        await stop_server(running)


async def test_one_lost_echo_is_not_a_lost_connection(
    database_url: str, proxy: NotificationDroppingProxy, connections: Connections, new_user: NewUser
) -> None:
    """A single probe echo late or lost (a busy machine) keeps the connection and its streams;
    only `MISSES_TO_LOSE` in a row end them (the test above)."""
    running = await start_server(
        test_config(
            database_url, listen_database_url=proxy.url, listener_probe_seconds=PROBE_SECONDS
        )
    )
    went_down: list[float] = []
    running.service.listener.on_down(lambda: went_down.append(time.monotonic()))
    try:
        stub = Stub(running.channel)
        me, sender = await new_user(), await new_user()
        call = watch(stub, me)
        await until_synced(call)

        proxy.drop_next = 1
        await until(lambda: proxy.dropped == 1, within=10, what="one probe dropped", every=0.05)
        heard = proxy.forwarded
        await until(  # two probes answered since
            lambda: proxy.forwarded >= heard + 2,
            within=20,
            what="two probes answered",
            every=0.05,
        )
        assert went_down == []
        assert running.service.listener.connected
        request = await send(connections, sender, me)
        assert (await next_event(call)).received.id == request.id
        call.cancel()
    finally:
        await stop_server(running)


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
    await delivers(stub, stub, sender, me)
