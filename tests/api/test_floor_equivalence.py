"""No timing oracle in Search and SendRequest (SPEC 8, 10.2), measured through a real server
with the production floors: Search of a handle that is found takes as long as of one nobody
has, and SendRequest's NOT_FOUND takes as long for a user who does not accept connections
as for nobody. The method (paired differences, a positive control) is
`tests/api/equivalence.py`'s, shared with the blocks' test.
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


async def search(new_user: NewUser) -> Pair:
    target = await new_user()

    def call(stub: Connections, caller: TestUser, first: bool) -> Awaitable[object]:
        handle = target.handle if first else NOBODY
        return stub.Search(pb.SearchRequest(umbral_name=handle), metadata=caller.md)

    return Pair([await new_user() for _ in range(LANES)], call, grpc.StatusCode.OK)


async def send_request(new_user: NewUser) -> Pair:
    closed = await new_user(accept=False)

    def call(stub: Connections, caller: TestUser, first: bool) -> Awaitable[object]:
        handle = closed.handle if first else NOBODY
        return stub.SendRequest(pb.SendRequestRequest(umbral_name=handle), metadata=caller.md)

    return Pair([await new_user() for _ in range(LANES)], call, grpc.StatusCode.NOT_FOUND)


PAIRS = {
    "Search: found vs nonexistent": search,
    "SendRequest NOT_FOUND: not accepting vs nonexistent": send_request,
}


@pytest.mark.parametrize("label", list(PAIRS))
async def test_found_and_not_found_take_the_same_time_and_a_control_is_told_apart(
    server: RunningServer, new_user: NewUser, label: str
) -> None:
    await assert_equivalent(server, await PAIRS[label](new_user), label)
