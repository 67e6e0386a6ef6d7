"""Blocks and relationship states are held to the Search timing floor (SPEC 11), on a server
with the default floors: whether a handle exists, is blocked, or blocks the caller, the
answer takes at least the floor. (The KS test that the times cannot be told apart is the
bench's: `make bench`, section "timing floor"; a timed unit test on this shared machine
could only check the floor itself.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest
import pytest_asyncio

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
    running = await start_server(test_config(database_url, timing_floors="default"))
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


async def test_block_unblock_and_relationships_wait_for_the_floor(
    connections: Connections, new_user: NewUser
) -> None:
    me, someone = await new_user(), await new_user()
    hidden = await new_user(accept=False)
    outcomes = set()
    for handle in (someone.handle, "nobody-by-that-name", hidden.handle, me.handle, "x"):
        # A call starts when it is made: each is made inside `timed`.
        for elapsed, result in (
            await timed(
                connections.BlockUser(pb.BlockUserRequest(umbral_name=handle), metadata=me.md)
            ),
            await timed(
                connections.UnblockUser(pb.UnblockUserRequest(umbral_name=handle), metadata=me.md)
            ),
            await timed(
                connections.GetRelationships(
                    pb.GetRelationshipsRequest(umbral_names=[handle]), metadata=me.md
                )
            ),
        ):
            outcomes.add(result)
            assert elapsed >= FLOOR, (handle, result, elapsed)
    assert outcomes == {"OK", "INVALID_ARGUMENT"}  # the self-block and the malformed handle


async def test_the_blocked_users_answers_wait_for_the_floor(
    connections: Connections, new_user: NewUser
) -> None:
    blocker, blocked = await new_user(), await new_user()
    await connections.BlockUser(
        pb.BlockUserRequest(umbral_name=blocked.handle), metadata=blocker.md
    )
    for handle in (blocker.handle, "nobody-by-that-name"):
        elapsed, result = await timed(
            connections.SendRequest(pb.SendRequestRequest(umbral_name=handle), metadata=blocked.md)
        )
        assert (result, elapsed >= FLOOR) == ("NOT_FOUND", True), elapsed
        elapsed, result = await timed(
            connections.Search(pb.SearchRequest(umbral_name=handle), metadata=blocked.md)
        )
        assert (result, elapsed >= FLOOR) == ("OK", True), elapsed
