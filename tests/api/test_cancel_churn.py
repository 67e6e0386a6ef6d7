"""No churn through cancel (SPEC 10.3).

Cancelling must not hand a sender a fresh slot: the cancelled request keeps counting toward
the receiver's cap until its window ends, the same sender must wait out a cooldown before
sending to the same receiver again, and what the request put in front of the receiver (the
in-app notification, a push not yet sent) is withdrawn in the cancel's own transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from tests.api.statements import rpc_statements
from tests.rich import expect_error, retry_delay
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
COOLDOWN = 3600  # the default of UMBRA_RESEND_COOLDOWN_SECONDS


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """No outbox worker here: a push stays pending until a test says otherwise."""
    running = await start_server(test_config(database_url, outbox_enabled=False))
    try:
        yield running
    finally:
        await stop_server(running)


async def send(
    connections: Connections, sender: TestUser, receiver: TestUser
) -> pb.ConnectionRequest:
    reply = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
    )
    return reply.request


async def cancel(
    connections: Connections, sender: TestUser, request_id: int
) -> pb.ConnectionRequest:
    reply = await connections.CancelRequest(
        pb.CancelRequestRequest(request_id=request_id), metadata=sender.md
    )
    return reply.request


async def test_cancelled_requests_keep_counting_toward_the_cap(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    receiver = await new_user()
    senders = [await new_user() for _ in range(6)]
    for sender in senders[:5]:
        await cancel(connections, sender, (await send(connections, sender, receiver)).id)
    # Five requests sent and withdrawn within the window: the receiver is at the cap.
    await expect_error(
        send(connections, senders[5], receiver),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "TOO_MANY_PENDING",
    )
    await sql.rows(
        "UPDATE connection_requests SET created_at = now() - interval '11 minutes',"
        " resolved_at = now() - interval '11 minutes' WHERE receiver_id = $1",
        receiver.id,
    )
    # Past the window they no longer count (nor does the cooldown hold them: see below).
    await send(connections, senders[5], receiver)


async def test_resending_after_a_cancel_waits_for_the_cooldown(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    sender, receiver, other = await new_user(), await new_user(), await new_user()
    first = await send(connections, sender, receiver)
    await cancel(connections, sender, first.id)
    error = await expect_error(
        send(connections, sender, receiver),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RESEND_TOO_SOON",
    )
    assert COOLDOWN - 60 < retry_delay(error) <= COOLDOWN
    assert (
        await sql.value("SELECT count(*) FROM connection_requests WHERE sender_id = $1", sender.id)
        == 1
    )
    # The cooldown binds this sender to this receiver only.
    await send(connections, other, receiver)
    await send(connections, receiver, sender)

    # The receiver withdraws theirs, so the pair has nothing pending; 3,000 s later what is
    # left of the sender's cooldown is what RetryInfo says.
    outgoing = await connections.ListOutgoingRequests(
        pb.ListOutgoingRequestsRequest(), metadata=receiver.md
    )
    await cancel(connections, receiver, outgoing.requests[0].id)
    await sql.rows(
        "UPDATE connection_requests SET resolved_at = resolved_at - interval '3000 seconds'"
        " WHERE id = $1",
        first.id,
    )
    error = await expect_error(
        send(connections, sender, receiver),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RESEND_TOO_SOON",
    )
    assert COOLDOWN - 3000 - 60 < retry_delay(error) <= COOLDOWN - 3000
    await sql.rows(
        "UPDATE connection_requests SET resolved_at = now() - interval '3601 seconds'"
        " WHERE id = $1",
        first.id,
    )
    again = await send(connections, sender, receiver)
    assert again.status == pb.ConnectionRequest.STATUS_PENDING


async def test_cancel_withdraws_the_notification_and_skips_the_unsent_push(
    connections: Connections, new_user: NewUser, sql: Sql, server: RunningServer
) -> None:
    receiver = await new_user()
    stays, goes = await new_user(), await new_user()
    kept = await send(connections, stays, receiver)
    withdrawn = await send(connections, goes, receiver)
    server.statements.reset()
    await cancel(connections, goes, withdrawn.id)
    # BEGIN, the one statement, COMMIT: the withdrawal rides in the cancel's statement.
    assert rpc_statements(server) == 3

    listed = await connections.ListNotifications(
        pb.ListNotificationsRequest(), metadata=receiver.md
    )
    assert [n.source_id for n in listed.notifications] == [kept.id]
    pushes = await sql.rows(
        "SELECT request_id, status, last_error, completed_at, attempts FROM outbox"
        " WHERE user_id = $1 ORDER BY id",
        receiver.id,
    )
    assert [(row["request_id"], row["status"]) for row in pushes] == [
        (kept.id, "pending"),
        (withdrawn.id, "skipped"),
    ]
    assert pushes[1]["last_error"] == "skipped: cancelled"
    assert pushes[1]["completed_at"] is not None and pushes[1]["attempts"] == 0
    # The audit row stays: the cancel itself happened.
    assert (
        await sql.value(
            "SELECT count(*) FROM audit_log WHERE action = 'connection.request_cancelled'"
            " AND actor_id = $1",
            goes.id,
        )
        == 1
    )


async def test_a_push_already_completed_is_left_as_it_was(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    sender, receiver = await new_user(), await new_user()
    request = await send(connections, sender, receiver)
    await sql.rows(
        "UPDATE outbox SET status = 'sent', completed_at = now() WHERE request_id = $1",
        request.id,
    )
    await cancel(connections, sender, request.id)
    row = (
        await sql.rows("SELECT status, last_error FROM outbox WHERE request_id = $1", request.id)
    )[0]
    assert (row["status"], row["last_error"]) == ("sent", None)
