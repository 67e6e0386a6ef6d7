"""No timing oracle in blocks (SPEC 11), measured through a real server with the production
floors: BlockUser of an existing handle takes as long as of a handle nobody has, and a
blocked user's Search and SendRequest aimed at their blocker take as long as aimed at
nobody. The method (paired differences, a positive control) is `tests/api/equivalence.py`'s,
shared with the Search and SendRequest floors' test (`test_floor_equivalence.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest

from tests.api.equivalence import (  # noqa: F401 (floored_server is the `server` fixture)
    LANES,
    NOBODY,
    Pair,
    Stub,
    assert_equivalent,
    floored_server,
)
from tests.support import Connections, NewUser, RunningServer, TestUser
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2


async def block_user(new_user: NewUser, connections: Connections) -> Pair:
    target = await new_user()

    def call(stub: Connections, caller: TestUser, first: bool) -> Awaitable[object]:
        handle = target.handle if first else NOBODY
        return stub.BlockUser(pb.BlockUserRequest(umbral_name=handle), metadata=caller.md)

    return Pair([await new_user() for _ in range(LANES)], call, grpc.StatusCode.OK)


async def _blocked_callers(
    new_user: NewUser, connections: Connections
) -> tuple[TestUser, list[TestUser]]:
    blocker = await new_user()
    callers = [await new_user() for _ in range(LANES)]
    for caller in callers:
        await connections.BlockUser(
            pb.BlockUserRequest(umbral_name=caller.handle), metadata=blocker.md
        )
    return blocker, callers


async def blocked_search(new_user: NewUser, connections: Connections) -> Pair:
    blocker, callers = await _blocked_callers(new_user, connections)

    def call(stub: Connections, caller: TestUser, first: bool) -> Awaitable[object]:
        handle = blocker.handle if first else NOBODY
        return stub.Search(pb.SearchRequest(umbral_name=handle), metadata=caller.md)

    return Pair(callers, call, grpc.StatusCode.OK)


async def blocked_send(new_user: NewUser, connections: Connections) -> Pair:
    blocker, callers = await _blocked_callers(new_user, connections)

    def call(stub: Connections, caller: TestUser, first: bool) -> Awaitable[object]:
        handle = blocker.handle if first else NOBODY
        return stub.SendRequest(pb.SendRequestRequest(umbral_name=handle), metadata=caller.md)

    return Pair(callers, call, grpc.StatusCode.NOT_FOUND)


PAIRS = {
    "BlockUser: existing vs nonexistent handle": block_user,
    "blocked user's Search: blocker vs nonexistent": blocked_search,
    "blocked user's SendRequest: blocker vs nonexistent": blocked_send,
}


@pytest.mark.parametrize("label", list(PAIRS))
async def test_the_two_answers_take_the_same_time_and_a_control_is_told_apart(
    server: RunningServer, new_user: NewUser, connections: Connections, label: str
) -> None:
    await assert_equivalent(server, await PAIRS[label](new_user, connections), label)
