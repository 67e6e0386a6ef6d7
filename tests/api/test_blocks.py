"""BlockUser, UnblockUser and ListBlockedUsers through the real stubs (SPEC 11).

A block is one transaction that leaves nothing between the two (connection, pending requests
both ways, their notifications and unsent pushes), tells the blocked user nothing, and from
then on makes the blocker look to them exactly like a handle nobody has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from tests.api.statements import rpc_statements
from tests.api.streams import next_event, until_synced, watch
from tests.invariants import check_all
from tests.rich import expect_error, status_details
from tests.support import (
    Accounts,
    Connections,
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.pb import accounts_pb2, connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
ACCEPT = pb.RespondRequest.ACTION_ACCEPT
NONE = pb.RELATIONSHIP_STATE_NONE
BLOCKED = pb.RELATIONSHIP_STATE_BLOCKED


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """No outbox worker: a push stays pending, so a block can be seen skipping it."""
    running = await start_server(test_config(database_url, outbox_enabled=False))
    try:
        yield running
    finally:
        await stop_server(running)


async def send(
    connections: Connections, sender: TestUser, receiver: TestUser, message: str = ""
) -> pb.ConnectionRequest:
    reply = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle, message=message), metadata=sender.md
    )
    return reply.request


async def connect(connections: Connections, a: TestUser, b: TestUser) -> pb.Connection:
    request = await send(connections, a, b)
    reply = await connections.Respond(
        pb.RespondRequest(request_id=request.id, action=ACCEPT), metadata=b.md
    )
    return reply.connection


async def block(connections: Connections, blocker: TestUser, handle: str) -> pb.BlockUserResponse:
    return await connections.BlockUser(pb.BlockUserRequest(umbral_name=handle), metadata=blocker.md)


async def state(connections: Connections, caller: TestUser, handle: str) -> int:
    reply = await connections.GetRelationships(
        pb.GetRelationshipsRequest(umbral_names=[handle]), metadata=caller.md
    )
    return reply.relationships[0].state


async def rows_between(sql: Sql, a: TestUser, b: TestUser) -> dict[str, object]:
    """Everything that joins the two, read straight from the tables."""
    pair = [a.id, b.id]
    return {
        "connections": await sql.value(
            "SELECT count(*) FROM user_connections"
            " WHERE user_id = ANY($1::bigint[]) AND connected_user_id = ANY($1::bigint[])",
            pair,
        ),
        "pending": await sql.value(
            "SELECT count(*) FROM connection_requests WHERE status = 'pending'"
            " AND sender_id = ANY($1::bigint[]) AND receiver_id = ANY($1::bigint[])",
            pair,
        ),
        "linked_cards": await sql.value(
            "SELECT count(*) FROM persons WHERE owner_user_id = ANY($1::bigint[])"
            " AND linked_user_id = ANY($1::bigint[])",
            pair,
        ),
    }


async def test_a_block_removes_the_connection_silently(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    a, b = await new_user(), await new_user()
    await connect(connections, a, b)
    notes_of_b = await sql.value("SELECT count(*) FROM notifications WHERE user_id = $1", b.id)
    pushes_of_b = await sql.value("SELECT count(*) FROM outbox WHERE user_id = $1", b.id)

    await block(connections, a, b.handle)

    assert await rows_between(sql, a, b) == {"connections": 0, "pending": 0, "linked_cards": 0}
    # Both cards stay, detached, as RemoveConnection leaves them.
    cards = await sql.rows(
        "SELECT is_umbral_contact FROM persons WHERE owner_user_id = ANY($1::bigint[])",
        [a.id, b.id],
    )
    assert [card["is_umbral_contact"] for card in cards] == [False, False]
    audits = await sql.rows(
        "SELECT action, target_id, detail FROM audit_log WHERE actor_id = $1"
        " AND action IN ('user.blocked', 'connection.removed') ORDER BY action",
        a.id,
    )
    assert [(row["action"], row["target_id"]) for row in audits] == [
        ("connection.removed", b.id),
        ("user.blocked", b.id),
    ]
    assert await sql.value(
        "SELECT count(*) FROM user_blocks WHERE blocker_id = $1 AND blocked_id = $2", a.id, b.id
    )
    # B is never told: nothing new for them, no push.
    assert (
        await sql.value("SELECT count(*) FROM notifications WHERE user_id = $1", b.id) == notes_of_b
    )
    assert await sql.value("SELECT count(*) FROM outbox WHERE user_id = $1", b.id) == pushes_of_b


async def test_a_block_cancels_pending_requests_both_ways(
    server: RunningServer, connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    # One direction here (I1 allows one pending request per pair), the other below.
    a, b, c = await new_user(), await new_user(), await new_user()
    to_a = await send(connections, b, a, "hi a")  # the blocked user's request
    unrelated = await send(connections, a, c)  # A's request to someone else: must stay
    a_stream, b_stream = watch(connections, a), watch(connections, b)
    try:
        await until_synced(a_stream)
        await until_synced(b_stream)
        await block(connections, a, b.handle)
        told = await next_event(a_stream)
        assert told.WhichOneof("event") == "cancelled"
        assert told.cancelled.id == to_a.id
        assert told.cancelled.status == pb.ConnectionRequest.STATUS_CANCELLED
    finally:
        a_stream.cancel()
        b_stream.cancel()

    rows = await sql.rows(
        "SELECT status, cancelled_by_receiver, resolved_at IS NOT NULL AS resolved"
        " FROM connection_requests WHERE id = $1",
        to_a.id,
    )
    assert [tuple(row) for row in rows] == [("cancelled", True, True)]
    assert (
        await sql.value("SELECT status FROM connection_requests WHERE id = $1", unrelated.id)
        == "pending"
    )
    # The request's notification is withdrawn and its unsent push skipped.
    assert not await sql.value(
        "SELECT count(*) FROM notifications WHERE source_type = 'connection_request'"
        " AND source_id = $1",
        to_a.id,
    )
    pushes = await sql.rows("SELECT status, last_error FROM outbox WHERE request_id = $1", to_a.id)
    assert [tuple(row) for row in pushes] == [("skipped", "skipped: cancelled")]


async def test_a_blockers_own_request_is_cancelled_as_theirs(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    a, b = await new_user(), await new_user()
    mine = await send(connections, a, b)
    b_stream = watch(connections, b)
    try:
        assert [e.received.id for e in await until_synced(b_stream)] == [mine.id]
        await block(connections, a, b.handle)
        told = await next_event(b_stream)
        # To B it is a plain cancel, exactly what CancelRequest would have sent.
        assert told.WhichOneof("event") == "cancelled" and told.cancelled.id == mine.id
    finally:
        b_stream.cancel()
    flags = await sql.rows(
        "SELECT status, cancelled_by_receiver FROM connection_requests WHERE id = $1", mine.id
    )
    assert [tuple(row) for row in flags] == [("cancelled", False)]
    # A cancelled it, so A's resend cooldown holds once A unblocks.
    await connections.UnblockUser(pb.UnblockUserRequest(umbral_name=b.handle), metadata=a.md)
    await expect_error(
        send(connections, a, b), grpc.StatusCode.RESOURCE_EXHAUSTED, "RESEND_TOO_SOON"
    )


async def test_the_blocked_user_sees_a_nonexistent_handle(
    connections: Connections, new_user: NewUser
) -> None:
    a, b = await new_user(), await new_user()
    await block(connections, a, b.handle)

    search = await connections.Search(pb.SearchRequest(umbral_name=a.handle), metadata=b.md)
    assert search.found is False
    blocked_answer = await expect_error(
        send(connections, b, a), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"
    )
    nobody_answer = await expect_error(
        connections.SendRequest(pb.SendRequestRequest(umbral_name="nobody-at-all"), metadata=b.md),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    # Byte for byte the same answer as a handle nobody has.
    assert blocked_answer.details() == nobody_answer.details()
    assert (
        status_details(blocked_answer).SerializeToString()
        == status_details(nobody_answer).SerializeToString()
    )
    assert await state(connections, b, a.handle) == NONE

    # The blocker is told why, and sees the block.
    await expect_error(send(connections, a, b), grpc.StatusCode.FAILED_PRECONDITION, "USER_BLOCKED")
    assert await state(connections, a, b.handle) == BLOCKED
    assert (
        await connections.Search(pb.SearchRequest(umbral_name=b.handle), metadata=a.md)
    ).found is False


async def test_a_blocker_learns_nothing_about_a_hidden_blocked_user(
    connections: Connections, new_user: NewUser
) -> None:
    a, hidden = await new_user(), await new_user(accept=False)
    await block(connections, a, hidden.handle)
    # USER_BLOCKED would say the handle exists (nobody's handle records no block): a hidden
    # user gets the NOT_FOUND every unreachable handle gets, blocked or not.
    await expect_error(send(connections, a, hidden), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    assert await state(connections, a, hidden.handle) == NONE


async def test_block_answers_alike_for_any_handle_and_again(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    a, b = await new_user(), await new_user()
    closed, inactive = await new_user(accept=False), await new_user(active=False)
    replies = [
        (await block(connections, a, handle)).SerializeToString()
        for handle in (b.handle, "nobody-by-that-name", closed.handle, inactive.handle)
    ]
    assert set(replies) == {pb.BlockUserResponse().SerializeToString()}
    # A handle nobody has writes nothing; the existing users are blocked, whatever their state.
    blocked = await sql.rows(
        "SELECT blocked_id FROM user_blocks WHERE blocker_id = $1 ORDER BY blocked_id", a.id
    )
    assert [row["blocked_id"] for row in blocked] == sorted([b.id, closed.id, inactive.id])

    audit_before = await sql.value("SELECT count(*) FROM audit_log WHERE actor_id = $1", a.id)
    await block(connections, a, b.handle.upper())  # again, in another letter case
    assert await sql.value("SELECT count(*) FROM user_blocks WHERE blocker_id = $1", a.id) == 3
    assert (
        await sql.value("SELECT count(*) FROM audit_log WHERE actor_id = $1", a.id) == audit_before
    )


async def test_block_refuses_the_callers_own_and_malformed_handles(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    a = await new_user()
    await expect_error(
        block(connections, a, a.handle), grpc.StatusCode.INVALID_ARGUMENT, "SELF_BLOCK"
    )
    await expect_error(
        block(connections, a, "x"), grpc.StatusCode.INVALID_ARGUMENT, "HANDLE_INVALID"
    )
    await expect_error(
        connections.UnblockUser(pb.UnblockUserRequest(umbral_name="x"), metadata=a.md),
        grpc.StatusCode.INVALID_ARGUMENT,
        "HANDLE_INVALID",
    )
    assert not await sql.value("SELECT count(*) FROM user_blocks WHERE blocker_id = $1", a.id)


async def test_unblock_lifts_the_block_and_restores_nothing(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    a, b = await new_user(), await new_user()
    await connect(connections, a, b)
    await block(connections, a, b.handle)
    lifted = await connections.UnblockUser(
        pb.UnblockUserRequest(umbral_name=b.handle), metadata=a.md
    )
    assert lifted == pb.UnblockUserResponse()
    assert await rows_between(sql, a, b) == {"connections": 0, "pending": 0, "linked_cards": 0}
    assert await state(connections, a, b.handle) == NONE
    assert await state(connections, b, a.handle) == NONE
    assert (await connections.Search(pb.SearchRequest(umbral_name=a.handle), metadata=b.md)).found
    audit = await sql.value(
        "SELECT count(*) FROM audit_log WHERE action = 'user.unblocked' AND actor_id = $1", a.id
    )
    assert audit == 1
    # Unblocking again, or someone never blocked, or nobody at all: the same empty answer.
    for handle in (b.handle, (await new_user()).handle, "nobody-by-that-name"):
        again = await connections.UnblockUser(
            pb.UnblockUserRequest(umbral_name=handle), metadata=a.md
        )
        assert again == pb.UnblockUserResponse()
    assert (
        await sql.value(
            "SELECT count(*) FROM audit_log WHERE action = 'user.unblocked' AND actor_id = $1",
            a.id,
        )
        == 1
    )


async def test_after_unblock_a_request_swept_by_the_block_looks_rejected_to_its_sender(
    connections: Connections, new_user: NewUser
) -> None:
    a, b = await new_user(), await new_user()
    await send(connections, b, a)
    await block(connections, a, b.handle)
    await connections.UnblockUser(pb.UnblockUserRequest(umbral_name=b.handle), metadata=a.md)
    # No resend cooldown (B never cancelled anything) and no place taken in A's cap.
    again = await send(connections, b, a)
    assert again.status == pb.ConnectionRequest.STATUS_PENDING


async def test_list_blocked_users_newest_first_in_keyset_pages(
    connections: Connections, accounts: Accounts, admin: Metadata, new_user: NewUser, sql: Sql
) -> None:
    me = await new_user()
    blocked = [await new_user(preferred_name=f"Blocked {n}") for n in range(5)]
    for user in blocked:
        await block(connections, me, user.handle)
    hidden = await new_user(accept=False)
    gone = await new_user(active=False)
    for user in (hidden, gone):
        await block(connections, me, user.handle)
    # Out of creation order, so that the order is the list's, not the ids'.
    await sql.rows(
        "UPDATE user_blocks SET created_at = now() - interval '1 hour' WHERE blocked_id = $1",
        blocked[2].id,
    )

    seen: list[pb.BlockedUser] = []
    token = ""
    pages = 0
    while True:
        page = await connections.ListBlockedUsers(
            pb.ListBlockedUsersRequest(page_size=2, page_token=token), metadata=me.md
        )
        seen.extend(page.blocked_users)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    expected = [*reversed([u for u in blocked if u is not blocked[2]]), blocked[2]]
    assert [user.umbral_name for user in seen] == [u.handle for u in expected]
    assert seen[0].preferred_name == "Blocked 4"
    assert seen[0].create_time.seconds >= seen[-1].create_time.seconds
    assert pages == 3
    # The hidden and the inactive user are not shown (Search would not find them either);
    # their blocks still hold, and show once they are visible again.
    await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=hidden.id,
            settings=accounts_pb2.Settings(accept_connections=True),
            update_mask=field_mask_pb2.FieldMask(paths=["accept_connections"]),
        ),
        metadata=admin,
    )
    first = await connections.ListBlockedUsers(
        pb.ListBlockedUsersRequest(page_size=1), metadata=me.md
    )
    assert [user.umbral_name for user in first.blocked_users] == [hidden.handle]
    # A page token is the caller's own.
    other = await new_user()
    await expect_error(
        connections.ListBlockedUsers(
            pb.ListBlockedUsersRequest(page_token=first.next_page_token), metadata=other.md
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_INVALID",
    )


async def test_statement_budgets(
    server: RunningServer, connections: Connections, new_user: NewUser
) -> None:
    a, b, c = await new_user(), await new_user(), await new_user()
    await connect(connections, a, b)
    await send(connections, c, a)

    async def counted(call: Awaitable[object]) -> int:
        server.statements.reset()
        await call
        return rpc_statements(server)

    # The heaviest block: a connection to remove and (from C) a request to cancel.
    assert await counted(block(connections, a, b.handle)) == 3
    assert await counted(block(connections, a, c.handle)) == 3
    assert await counted(block(connections, a, "nobody-by-that-name")) == 3
    assert (
        await counted(
            connections.UnblockUser(pb.UnblockUserRequest(umbral_name=b.handle), metadata=a.md)
        )
        == 3
    )
    assert (
        await counted(connections.ListBlockedUsers(pb.ListBlockedUsersRequest(), metadata=a.md))
        == 1
    )
    handles = [b.handle, c.handle, "nobody-by-that-name", *(f"someone{n}" for n in range(97))]
    assert (
        await counted(
            connections.GetRelationships(
                pb.GetRelationshipsRequest(umbral_names=handles), metadata=a.md
            )
        )
        == 1
    )


async def test_the_invariants_hold_after_this_module(database_url: str) -> None:
    """I1-I5 and the block rule, over every row the tests above left behind."""
    conn = await asyncpg.connect(database_url)
    try:
        assert await check_all(conn) == []
    finally:
        await conn.close()
