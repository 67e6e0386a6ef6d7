"""GetRelationships through the real stubs (SPEC 11): every state, and no existence oracle."""

from __future__ import annotations

import grpc
import pytest

from tests.rich import expect_error
from tests.support import Connections, NewUser, Sql, TestUser
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
ACCEPT = pb.RespondRequest.ACTION_ACCEPT
S = pb.RelationshipState


async def send(
    connections: Connections, sender: TestUser, receiver: TestUser
) -> pb.ConnectionRequest:
    reply = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
    )
    return reply.request


async def states(
    connections: Connections, caller: TestUser, *handles: str
) -> list[tuple[str, int]]:
    reply = await connections.GetRelationships(
        pb.GetRelationshipsRequest(umbral_names=list(handles)), metadata=caller.md
    )
    return [(item.umbral_name, item.state) for item in reply.relationships]


async def test_every_state_in_the_order_asked(connections: Connections, new_user: NewUser) -> None:
    me = await new_user()
    friend, asked, asking, blocked, stranger = [await new_user() for _ in range(5)]
    request = await send(connections, me, friend)
    await connections.Respond(
        pb.RespondRequest(request_id=request.id, action=ACCEPT), metadata=friend.md
    )
    await send(connections, me, asked)
    await send(connections, asking, me)
    await connections.BlockUser(pb.BlockUserRequest(umbral_name=blocked.handle), metadata=me.md)

    answer = await states(
        connections,
        me,
        stranger.handle,
        friend.handle.upper(),
        asked.handle,
        asking.handle,
        blocked.handle,
        friend.handle,
    )
    assert answer == [
        (stranger.handle, S.RELATIONSHIP_STATE_NONE),
        (friend.handle, S.RELATIONSHIP_STATE_CONNECTED),
        (asked.handle, S.RELATIONSHIP_STATE_OUTGOING_PENDING),
        (asking.handle, S.RELATIONSHIP_STATE_INCOMING_PENDING),
        (blocked.handle, S.RELATIONSHIP_STATE_BLOCKED),
        (friend.handle, S.RELATIONSHIP_STATE_CONNECTED),
    ]
    # The other sides see the mirror states.
    assert await states(connections, asked, me.handle) == [
        (me.handle, S.RELATIONSHIP_STATE_INCOMING_PENDING)
    ]
    assert await states(connections, friend, me.handle) == [
        (me.handle, S.RELATIONSHIP_STATE_CONNECTED)
    ]
    assert await states(connections, me) == []


async def test_nothing_the_caller_may_not_know_is_told(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    me = await new_user()
    hidden = await new_user(accept=False)
    inactive = await new_user(active=False)
    blocker = await new_user()
    hidden_and_blocked = await new_user(accept=False)
    await connections.BlockUser(pb.BlockUserRequest(umbral_name=me.handle), metadata=blocker.md)
    await connections.BlockUser(
        pb.BlockUserRequest(umbral_name=hidden_and_blocked.handle), metadata=me.md
    )
    handles = (
        "nobody-by-that-name",
        hidden.handle,
        inactive.handle,
        blocker.handle,
        me.handle,
        hidden_and_blocked.handle,
    )
    answer = await states(connections, me, *handles)
    assert answer == [(handle, S.RELATIONSHIP_STATE_NONE) for handle in handles]

    # A connection with someone who has since deactivated: NONE too.
    friend = await new_user()
    request = await send(connections, me, friend)
    await connections.Respond(
        pb.RespondRequest(request_id=request.id, action=ACCEPT), metadata=friend.md
    )
    await sql.rows("UPDATE users SET is_active = false WHERE id = $1", friend.id)
    assert await states(connections, me, friend.handle) == [
        (friend.handle, S.RELATIONSHIP_STATE_NONE)
    ]


async def test_an_expired_request_is_no_relationship(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    me, other = await new_user(), await new_user()
    request = await send(connections, me, other)
    assert await states(connections, me, other.handle) == [
        (other.handle, S.RELATIONSHIP_STATE_OUTGOING_PENDING)
    ]
    await sql.rows(
        "UPDATE connection_requests SET created_at = now() - interval '30 days 1 second'"
        " WHERE id = $1",
        request.id,
    )
    assert await states(connections, me, other.handle) == [
        (other.handle, S.RELATIONSHIP_STATE_NONE)
    ]
    assert await states(connections, other, me.handle) == [(me.handle, S.RELATIONSHIP_STATE_NONE)]


async def test_bad_lists_are_refused(connections: Connections, new_user: NewUser) -> None:
    me = await new_user()
    await expect_error(
        connections.GetRelationships(
            pb.GetRelationshipsRequest(umbral_names=[f"user-{n}" for n in range(101)]),
            metadata=me.md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_INVALID",
    )
    await expect_error(
        connections.GetRelationships(
            pb.GetRelationshipsRequest(umbral_names=["fine-handle", "no spaces allowed"]),
            metadata=me.md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "HANDLE_INVALID",
    )
    hundred = [f"user-{n}" for n in range(100)]
    assert len(await states(connections, me, *hundred)) == 100
