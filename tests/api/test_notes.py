"""Request notes and withdrawn notifications (SPEC 11).

A note is shown to the receiver (lists, streams, the notification's data, Respond) and to
nobody else: the sender's own views leave it empty (they wrote it), and it never reaches a
push (tests/outbox/test_note_push.py). A request's notification is marked read once the
request is answered and deleted once it is cancelled, expired or swept away by a block.
"""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from tests.api.streams import next_event, until_synced, watch
from tests.invariants import check_all
from tests.rich import expect_error
from tests.support import Connections, NewUser, Sql, TestUser
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
ACCEPT = pb.RespondRequest.ACTION_ACCEPT
REJECT = pb.RespondRequest.ACTION_REJECT
NOTE = "Hi! We met at the Zoë Ångström talk 🦊"


async def send(
    connections: Connections, sender: TestUser, receiver: TestUser, message: str = ""
) -> pb.ConnectionRequest:
    reply = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle, message=message), metadata=sender.md
    )
    return reply.request


async def test_only_the_receiver_sees_the_note(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    sender, receiver = await new_user(), await new_user()
    stream = watch(connections, receiver)
    try:
        await until_synced(stream)
        sent = await send(connections, sender, receiver, NOTE)
        live = await next_event(stream)
        assert live.received.message == NOTE
    finally:
        stream.cancel()
    again = watch(connections, receiver)
    try:
        [snapshot] = await until_synced(again)
        assert snapshot.received.message == NOTE
    finally:
        again.cancel()
    incoming = await connections.ListIncomingRequests(
        pb.ListIncomingRequestsRequest(), metadata=receiver.md
    )
    assert [r.message for r in incoming.requests] == [NOTE]
    notifications = await connections.ListNotifications(
        pb.ListNotificationsRequest(), metadata=receiver.md
    )
    assert notifications.notifications[0].data["message"] == NOTE
    assert notifications.notifications[0].data["sender_umbral_name"] == sender.handle

    # The sender's views: empty.
    assert sent.message == ""
    outgoing = await connections.ListOutgoingRequests(
        pb.ListOutgoingRequestsRequest(), metadata=sender.md
    )
    assert [r.message for r in outgoing.requests] == [""]
    # Nowhere else: not in the audit row, not in the push.
    assert NOTE not in str(await sql.rows("SELECT * FROM audit_log WHERE actor_id = $1", sender.id))
    assert NOTE not in str(await sql.rows("SELECT * FROM outbox WHERE user_id = $1", receiver.id))

    answered = await connections.Respond(
        pb.RespondRequest(request_id=sent.id, action=ACCEPT), metadata=receiver.md
    )
    assert answered.request.message == NOTE
    accepted = await connections.ListNotifications(
        pb.ListNotificationsRequest(), metadata=sender.md
    )
    assert all("message" not in n.data for n in accepted.notifications)


async def test_a_cancelled_request_shows_its_sender_no_note(
    connections: Connections, new_user: NewUser
) -> None:
    sender, receiver = await new_user(), await new_user()
    sent = await send(connections, sender, receiver, NOTE)
    cancelled = await connections.CancelRequest(
        pb.CancelRequestRequest(request_id=sent.id), metadata=sender.md
    )
    assert cancelled.request.message == ""


async def test_notes_are_nfc_and_clean_and_short(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    sender = await new_user()
    composed = await send(connections, sender, await new_user(), "Zoe\u0308" + "x" * 276)
    stored = await sql.value("SELECT message FROM connection_requests WHERE id = $1", composed.id)
    assert stored == "Zoë" + "x" * 276  # 280 after NFC: allowed
    for bad in ("Alice\u202egnp.exe", "zero\u200bwidth", "line\nbreak", "x" * 281):
        await expect_error(
            send(connections, sender, await new_user(), bad),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TEXT_INVALID",
        )
    before = await sql.value(
        "SELECT count(*) FROM connection_requests WHERE sender_id = $1", sender.id
    )
    assert before == 1
    plain = await send(connections, sender, await new_user())
    assert (
        await sql.value("SELECT message FROM connection_requests WHERE id = $1", plain.id) is None
    )


async def notification_of(sql: Sql, request_id: int) -> list[bool]:
    """The read flags of a request's notifications (none once withdrawn)."""
    rows = await sql.rows(
        "SELECT read FROM notifications WHERE source_type = 'connection_request'"
        " AND source_id = $1",
        request_id,
    )
    return [row["read"] for row in rows]


@pytest.mark.parametrize("action", [ACCEPT, REJECT])
async def test_an_answered_requests_notification_is_marked_read(
    connections: Connections,
    new_user: NewUser,
    sql: Sql,
    action: pb.RespondRequest.Action.ValueType,
) -> None:
    sender, receiver = await new_user(), await new_user()
    sent = await send(connections, sender, receiver)
    assert await notification_of(sql, sent.id) == [False]
    await connections.Respond(
        pb.RespondRequest(request_id=sent.id, action=action), metadata=receiver.md
    )
    assert await notification_of(sql, sent.id) == [True]
    unread = await connections.ListNotifications(
        pb.ListNotificationsRequest(unread_only=True), metadata=receiver.md
    )
    assert list(unread.notifications) == []


async def test_an_accept_for_a_deactivated_sender_marks_it_read_too(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    sender, receiver = await new_user(), await new_user()
    sent = await send(connections, sender, receiver)
    await sql.rows("UPDATE users SET is_active = false WHERE id = $1", sender.id)
    await expect_error(
        connections.Respond(
            pb.RespondRequest(request_id=sent.id, action=ACCEPT), metadata=receiver.md
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SENDER_INACTIVE",
    )
    assert await notification_of(sql, sent.id) == [True]


@pytest.mark.parametrize(
    "how", ["cancelled", "expired", "blocked by the receiver", "blocked by the sender"]
)
async def test_a_withdrawn_requests_notification_is_deleted(
    connections: Connections, new_user: NewUser, sql: Sql, how: str
) -> None:
    sender, receiver = await new_user(), await new_user()
    sent = await send(connections, sender, receiver)
    assert await notification_of(sql, sent.id) == [False]
    if how == "cancelled":
        await connections.CancelRequest(
            pb.CancelRequestRequest(request_id=sent.id), metadata=sender.md
        )
    elif how == "expired":
        await sql.rows(
            "UPDATE connection_requests SET created_at = now() - interval '31 days' WHERE id = $1",
            sent.id,
        )
        await send(connections, receiver, sender)  # the pair writes again: it expires here
    else:
        blocker, blocked = (
            (receiver, sender) if how == "blocked by the receiver" else (sender, receiver)
        )
        await connections.BlockUser(
            pb.BlockUserRequest(umbral_name=blocked.handle), metadata=blocker.md
        )
    assert await notification_of(sql, sent.id) == []


async def test_the_invariants_hold_after_this_module(database_url: str) -> None:
    """I1-I5 and the block rule, over every row the tests above left behind."""
    conn = await asyncpg.connect(database_url)
    try:
        assert await check_all(conn) == []
    finally:
        await conn.close()
