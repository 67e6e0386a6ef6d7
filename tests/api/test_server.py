"""The assembled server: health, reflection, server options and error hygiene (SPEC 4.1, 7).

Everything goes through a real channel to a real `grpc.aio` server; the servers started here
(beyond the module's `server`) are stopped in `finally` blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.rich import error_reason
from tests.support import (
    TEST_SECRET,
    Connections,
    Metadata,
    NewUser,
    RunningServer,
    raw_unary_unary,
    start_server,
    stop_server,
    test_config,
    user_metadata,
)
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc
from umbra_grpc.server import Service, server_options
from umbra_grpc.storage.database import Database
from umbra_grpc.tokens import mint_token

pytestmark = pytest.mark.asyncio(loop_scope="session")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CONNECTION_SERVICE = "umbra.connections.v1.ConnectionService"
ACCOUNT_SERVICE = "umbra.accounts.v1.AccountService"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
HEALTH_NAMES = ("", CONNECTION_SERVICE, ACCOUNT_SERVICE)
# Nothing listens on port 1: every connection attempt is refused at once.
DEAD_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/postgres"
# Words that would show a driver error or a traceback leaking into a status message.
LEAK_MARKERS = ("select", "sql", "traceback", "error", "refused", "asyncpg", "127.0.0.1", "port")


async def check(channel: grpc.aio.Channel, service: str) -> int:
    """The health status of `service`, asked without any token."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    status: int = reply.status
    return status


async def test_health_is_serving_without_a_token(server: RunningServer) -> None:
    for name in HEALTH_NAMES:
        assert await check(server.channel, name) == SERVING, name


@pytest_asyncio.fixture(loop_scope="session")
async def own_server(database_url: str) -> AsyncIterator[RunningServer]:
    """A server of this test's own, free to be stopped (stopping it twice is harmless)."""
    running = await start_server(test_config(database_url))
    try:
        yield running
    finally:
        await stop_server(running)


async def test_health_is_not_serving_during_shutdown(own_server: RunningServer) -> None:
    service = own_server.service
    for name in HEALTH_NAMES:
        assert await check(own_server.channel, name) == SERVING
    seen: dict[str, int] = {}
    stop_listening = service.server.stop

    async def stop_after_probing(grace: float | None) -> None:
        # Service.stop flips health before it closes the port: ask while the port is open.
        for name in HEALTH_NAMES:
            seen[name] = await check(own_server.channel, name)
        await stop_listening(grace)

    # Stands in for the server's own stop, to look at health between Service.stop's steps.
    service.server.stop = stop_after_probing  # type: ignore[method-assign]
    try:
        await service.stop(0.5)
    finally:
        del service.server.stop  # the fixture's own stop must not probe a closed channel
    assert seen == dict.fromkeys(HEALTH_NAMES, NOT_SERVING)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(own_server.channel, "")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest_asyncio.fixture(loop_scope="session")
async def dead_database_server() -> AsyncIterator[tuple[Service, grpc.aio.Channel]]:
    """A server whose database never answers (start_server would wait for SERVING forever)."""
    config = test_config(DEAD_DATABASE_URL, db_pool_timeout_seconds=2.0)
    service = Service(config, Database.connect(config))
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield service, channel
    finally:
        await channel.close()
        await service.stop(0.5)


async def test_health_is_not_serving_while_the_database_is_unreachable(
    dead_database_server: tuple[Service, grpc.aio.Channel],
) -> None:
    _, channel = dead_database_server
    for name in HEALTH_NAMES:
        assert await check(channel, name) == NOT_SERVING, name


async def test_rpc_fails_unavailable_while_the_database_is_unreachable(
    dead_database_server: tuple[Service, grpc.aio.Channel],
) -> None:
    _, channel = dead_database_server
    stub = connections_pb2_grpc.ConnectionServiceStub(channel)
    token = mint_token(TEST_SECRET, subject="1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Search(
            connections_pb2.SearchRequest(umbral_name="someone"),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert error_reason(error) == "STORAGE_UNAVAILABLE"
    details = (error.details() or "").lower()
    assert not any(marker in details for marker in LEAK_MARKERS), details


async def test_reflection_lists_every_service(server: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    replies = [reply async for reply in call]
    assert len(replies) == 1
    names = {service.name for service in replies[0].list_services_response.service}
    assert names == {CONNECTION_SERVICE, ACCOUNT_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE}


async def test_reflection_serves_the_proto_of_a_service(server: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=CONNECTION_SERVICE)]),
        timeout=5,
    )
    replies = [reply async for reply in call]
    files = replies[0].file_descriptor_response.file_descriptor_proto
    assert files, replies[0]
    assert any(b"WatchIncomingRequests" in file for file in files)


async def test_request_over_64_kib_is_resource_exhausted(
    server: RunningServer, connections: Connections, new_user: NewUser
) -> None:
    caller = await new_user()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connections.Search(
            connections_pb2.SearchRequest(umbral_name="a" * 70_000), metadata=caller.md, timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Just under the limit the same call is answered (a malformed handle, not a size error).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connections.Search(
            connections_pb2.SearchRequest(umbral_name="a" * 60_000), metadata=caller.md, timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_server_options_are_set_on_purpose() -> None:
    config = test_config("postgresql://postgres@127.0.0.1:1/postgres")
    options = dict(server_options(config))
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.max_receive_message_length"] == 64 * 1024
    assert options["grpc.max_concurrent_streams"] == config.max_concurrent_streams
    assert options["grpc.keepalive_time_ms"] > 0
    assert options["grpc.keepalive_timeout_ms"] > 0
    assert options["grpc.http2.min_ping_interval_without_data_ms"] > 0
    assert options["grpc.http2.max_ping_strikes"] > 0
    assert options["grpc.max_connection_age_ms"] == config.max_connection_age_seconds * 1000
    assert (
        options["grpc.max_connection_age_grace_ms"]
        == config.max_connection_age_grace_seconds * 1000
    )


async def test_second_server_on_the_same_port_fails_loudly(server: RunningServer) -> None:
    port = server.service.port
    second = grpc.aio.server(options=server_options(server.service.config))
    try:
        # grpcio 1.85 raises rather than returning port 0.
        with pytest.raises(RuntimeError, match="Failed to bind"):
            second.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        await second.stop(None)


async def test_without_the_option_grpc_would_share_the_port() -> None:
    # The control for the test above: grpc's default on Linux is SO_REUSEPORT, so two
    # servers bind the same port and split its connections without a word.
    first = grpc.aio.server()
    second = grpc.aio.server()
    try:
        port = first.add_insecure_port("127.0.0.1:0")
        await first.start()
        assert second.add_insecure_port(f"127.0.0.1:{port}") == port
    finally:
        await second.stop(None)
        await first.stop(None)


async def test_undecodable_request_bytes_are_invalid_argument(
    server: RunningServer, new_user: NewUser
) -> None:
    caller = await new_user()
    search = raw_unary_unary(server.channel, f"/{CONNECTION_SERVICE}/Search")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await search(b"\xff\xff\xff\xff", metadata=caller.md, timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error_reason(error) == "MALFORMED_REQUEST"
    assert "decode" in (error.details() or "")
    assert "truncated" not in (error.details() or "").lower()


async def test_undecodable_bytes_are_refused_before_authentication(
    server: RunningServer,
) -> None:
    # Even a caller with no user row gets INVALID_ARGUMENT, not PERMISSION_DENIED.
    metadata: Metadata = user_metadata(987_654)
    search = raw_unary_unary(server.channel, f"/{CONNECTION_SERVICE}/Search")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await search(b"\xff\xff\xff\xff", metadata=metadata, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
