"""SPEC 10.6: a deactivated user loses their open watch streams, on every replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from tests.api.streams import until_synced, watch
from tests.rich import error_reason
from tests.support import (
    Accounts,
    Metadata,
    NewUser,
    RunningServer,
    Watch,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.pb import accounts_pb2, connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
WITHIN = 2.0  # seconds, SPEC 10.6


@pytest_asyncio.fixture(loop_scope="session")
async def other_replica(database_url: str) -> AsyncIterator[RunningServer]:
    """A second server on the same database, with its own listener and caller cache."""
    running = await start_server(test_config(database_url))
    try:
        yield running
    finally:
        await stop_server(running)


async def outcome(call: Watch) -> tuple[grpc.StatusCode, str, str, float]:
    """Reads a stream to its end: code, reason, message, and when it ended (monotonic)."""
    try:
        while await asyncio.wait_for(call.read(), 30) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code(), error_reason(error), error.details() or "", time.monotonic()
    raise AssertionError("the stream ended OK")


async def test_deactivation_ends_streams_here_and_on_another_replica_as_permission_denied(
    server: RunningServer,
    other_replica: RunningServer,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
) -> None:
    me, bystander, sender = await new_user(), await new_user(), await new_user()
    here = connections_pb2_grpc.ConnectionServiceStub(server.channel)
    there = connections_pb2_grpc.ConnectionServiceStub(other_replica.channel)
    # The other replica knows both users as active (cached for an hour in the tests).
    for stub in (here, there):
        await stub.ListIncomingRequests(pb.ListIncomingRequestsRequest(), metadata=me.md)
    streams = [watch(here, me), watch(there, me), watch(there, bystander)]
    try:
        for call in streams:
            await until_synced(call)
        endings = [asyncio.ensure_future(outcome(call)) for call in streams[:2]]
        await accounts.UpsertUser(
            accounts_pb2.UpsertUserRequest(
                user=accounts_pb2.User(id=me.id, umbral_name=me.handle, is_active=False)
            ),
            metadata=admin,
        )
        deactivated = time.monotonic()
        ended = await asyncio.wait_for(asyncio.gather(*endings), 10 * WITHIN)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await there.ListIncomingRequests(pb.ListIncomingRequestsRequest(), metadata=me.md)
        expected = (unary.value.code(), error_reason(unary.value), unary.value.details())
        assert expected[:2] == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        for code, reason, message, at in ended:
            assert (code, reason, message) == expected
            assert at - deactivated < WITHIN
        # Someone else's stream on that replica lives on.
        sent = await here.SendRequest(
            pb.SendRequestRequest(umbral_name=bystander.handle), metadata=sender.md
        )
        event = await asyncio.wait_for(streams[2].read(), 10)
        assert isinstance(event, pb.WatchIncomingRequestsResponse)
        assert event.received.id == sent.request.id
    finally:
        for call in streams:
            call.cancel()
