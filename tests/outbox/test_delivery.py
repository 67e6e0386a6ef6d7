"""Pushes written by real RPCs, delivered by the in-process worker to a recording ntfy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from tests.outbox.recorder import RECORDER_NETWORKS, Answer, NtfyRecorder
from tests.support import (
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    start_server,
    stop_server,
    test_config,
    until,
)
from umbra_grpc.embedded import free_port
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
if TYPE_CHECKING:
    Connections = connections_pb2_grpc.ConnectionServiceAsyncStub
    Accounts = accounts_pb2_grpc.AccountServiceAsyncStub
TOKEN = "tk_secret-bearer-0123456789"
MAX_ATTEMPTS = 3


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str, recorder: NtfyRecorder) -> AsyncIterator[RunningServer]:
    """Fast retries, three attempts; polling slow enough that only wake-ups explain speed."""
    config = test_config(
        database_url,
        outbox_retry_base_seconds=0.05,
        outbox_retry_cap_seconds=0.2,
        outbox_max_attempts=MAX_ATTEMPTS,
        outbox_poll_seconds=30.0,
        ntfy_timeout_seconds=2.0,
        ntfy_allowed_networks=RECORDER_NETWORKS,
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await stop_server(running)


async def configure_ntfy(
    accounts: Accounts,
    admin: Metadata,
    user: TestUser,
    url: str,
    *,
    token: str = "",
    enabled: bool = True,
    connections_enabled: bool = True,
    topic: str | None = None,
) -> str:
    """Points the user's pushes at `url`; returns the topic (one per user)."""
    topic = f"umbra-{user.id}" if topic is None else topic
    await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=user.id,
            settings=accounts_pb2.Settings(
                ntfy=accounts_pb2.NtfySettings(
                    enabled=enabled,
                    server_url=url,
                    topic=topic,
                    auth_token=token,
                    connections_enabled=connections_enabled,
                )
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["ntfy"]),
        ),
        metadata=admin,
    )
    return topic


async def send(
    connections: Connections, sender: TestUser, receiver: TestUser
) -> pb.ConnectionRequest:
    reply = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
    )
    request: pb.ConnectionRequest = reply.request
    return request


async def settled(sql: Sql, user_id: int, within: float = 10.0) -> asyncpg.Record:
    """The user's single outbox row once it is no longer pending."""

    async def done() -> asyncpg.Record | None:
        rows = await sql.rows("SELECT * FROM outbox WHERE user_id = $1", user_id)
        assert len(rows) == 1, rows
        return None if rows[0]["status"] == "pending" else rows[0]

    return await until(done, within=within, what="the row no longer pending")


async def test_request_and_accept_pushed_with_path_headers_and_body(
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    alice = await new_user(preferred_name="Alice Liddell")
    bob = await new_user(preferred_name="Bob Ünïcode")
    bob_topic = await configure_ntfy(accounts, admin, bob, recorder.url + "/", token=TOKEN)
    alice_topic = await configure_ntfy(accounts, admin, alice, recorder.url)

    request = await send(connections, alice, bob)
    [received] = await recorder.wait_for(bob_topic, 1)
    assert received.method == "POST"
    assert received.path == f"/{bob_topic}"
    assert received.headers["title"] == "New Connection Request"
    assert received.headers["tags"] == "handshake"
    assert received.headers["authorization"] == f"Bearer {TOKEN}"
    assert received.body == "Alice Liddell wants to connect with you"
    row = await settled(sql, bob.id)
    assert (row["status"], row["attempts"], row["kind"]) == ("sent", 1, "request_received")
    assert row["completed_at"] is not None
    # The token lives in settings only, never in the outbox.
    assert TOKEN not in str(dict(row))
    # This server does not trace: the row keeps no trace context (migration 0005).
    assert row["traceparent"] is None

    await connections.Respond(
        pb.RespondRequest(request_id=request.id, action=pb.RespondRequest.ACTION_ACCEPT),
        metadata=bob.md,
    )
    [accepted] = await recorder.wait_for(alice_topic, 1)
    assert accepted.path == f"/{alice_topic}"
    assert accepted.headers["title"] == "Connection Accepted"
    assert accepted.headers["tags"] == "white_check_mark"
    assert "authorization" not in accepted.headers
    assert accepted.body == "Bob Ünïcode accepted your connection request"
    accepted_row = await settled(sql, alice.id)
    assert (accepted_row["status"], accepted_row["traceparent"]) == ("sent", None)
    assert len(recorder.for_topic(bob_topic)) == 1


async def test_switches_read_at_send_time_skip_without_sending(
    server: RunningServer,
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    cases: dict[str, dict[str, Any]] = {
        "master switch off": {"enabled": False},
        "connections toggle off": {"connections_enabled": False},
        "no topic": {"topic": ""},
    }
    skipped_before = server.service.outbox.stats.skipped
    receivers = []
    for switches in cases.values():
        receiver = await new_user()
        await configure_ntfy(accounts, admin, receiver, recorder.url, token=TOKEN, **switches)
        await send(connections, await new_user(), receiver)
        receivers.append(receiver)
    for reason, receiver in zip(cases, receivers, strict=True):
        row = await settled(sql, receiver.id)
        assert row["status"] == "skipped", reason
        assert row["last_error"].startswith("skipped:"), reason
        assert recorder.for_topic(f"umbra-{receiver.id}") == [], reason
    assert server.service.outbox.stats.skipped - skipped_before == len(cases)


async def rescheduled_far(sql: Sql, user_id: int, within: float = 10.0) -> None:
    """Until the user's row waits for a retry an hour away (a 429's Retry-After)."""
    await until(
        lambda: sql.value(
            "SELECT count(*) FROM outbox WHERE user_id = $1 AND status = 'pending'"
            " AND next_attempt_at > now() + interval '10 minutes'",
            user_id,
        ),
        within=within,
        what="the row rescheduled an hour away",
    )


async def test_settings_are_read_again_for_each_attempt(
    server: RunningServer,
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    """Settings changed while a row waits for its retry are the ones the retry uses.

    The retry waits an hour (Retry-After) until the settings have changed, then is made due
    and the worker woken: no race between the changes and a short Retry-After.
    """
    new_token, switched_off = await new_user(), await new_user()
    topics = {}
    for receiver in (new_token, switched_off):
        topics[receiver] = await configure_ntfy(
            accounts, admin, receiver, recorder.url, token="old-token"
        )
        recorder.script(topics[receiver], Answer(429, headers=(("Retry-After", "3600"),)))
        await send(connections, await new_user(), receiver)
    for receiver in (new_token, switched_off):
        await recorder.wait_for(topics[receiver], 1)
        await rescheduled_far(sql, receiver.id)
    await configure_ntfy(accounts, admin, new_token, recorder.url, token="new-token")
    await configure_ntfy(
        accounts, admin, switched_off, recorder.url, token="old-token", connections_enabled=False
    )
    await sql.rows(
        "UPDATE outbox SET next_attempt_at = now() WHERE user_id = ANY($1::bigint[])",
        [new_token.id, switched_off.id],
    )
    server.service.outbox.wake()

    first, second = await recorder.wait_for(topics[new_token], 2)
    assert first.headers["authorization"] == "Bearer old-token"
    assert second.headers["authorization"] == "Bearer new-token"
    row = await settled(sql, switched_off.id)
    assert (row["status"], row["attempts"]) == ("skipped", 2)
    assert len(recorder.for_topic(topics[switched_off])) == 1


async def test_two_500s_then_success_is_delivered(
    server: RunningServer,
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    receiver = await new_user()
    topic = await configure_ntfy(accounts, admin, receiver, recorder.url)
    recorder.script(topic, Answer(500), Answer(503, body="busy"))
    retried_before = server.service.outbox.stats.retried
    await send(connections, await new_user(), receiver)
    row = await settled(sql, receiver.id)
    assert (row["status"], row["attempts"]) == ("sent", 3)
    assert row["last_error"].startswith("HTTP 503")
    assert len(recorder.for_topic(topic)) == 3
    assert server.service.outbox.stats.retried - retried_before == 2


async def test_429_retry_after_is_honoured(
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    receiver = await new_user()
    topic = await configure_ntfy(accounts, admin, receiver, recorder.url)
    recorder.script(topic, Answer(429, headers=(("Retry-After", "1"),)))
    await send(connections, await new_user(), receiver)
    first, second = await recorder.wait_for(topic, 2)
    # Backoff alone would have retried within 0.2 s.
    assert second.at - first.at >= 0.99
    row = await settled(sql, receiver.id)
    assert (row["status"], row["attempts"]) == ("sent", 2)


async def test_max_attempts_exhausted_keeps_failed_row(
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    receiver = await new_user()
    topic = await configure_ntfy(accounts, admin, receiver, recorder.url)
    recorder.script(topic, *[Answer(500, body="x" * 10_000)] * MAX_ATTEMPTS)
    await send(connections, await new_user(), receiver)
    row = await settled(sql, receiver.id)
    assert (row["status"], row["attempts"]) == ("failed", MAX_ATTEMPTS)
    assert row["last_error"].startswith("HTTP 500: xxx")
    assert len(row["last_error"]) <= 300
    assert row["completed_at"] is not None
    # Each attempt is recorded before it is answered, so all are in by now; a failed row is
    # never claimed again.
    assert len(recorder.for_topic(topic)) == MAX_ATTEMPTS


async def test_other_4xx_fails_at_once_without_leaking_the_token(
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = await new_user()
    topic = await configure_ntfy(accounts, admin, receiver, recorder.url, token=TOKEN)
    # A server that echoes the credentials it refused.
    recorder.script(topic, Answer(401, body=f'{{"error":"bad token Bearer {TOKEN}"}}'))
    with caplog.at_level(logging.DEBUG):
        await send(connections, await new_user(), receiver)
        row = await settled(sql, receiver.id)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["last_error"].startswith("HTTP 401")
    assert "[redacted]" in row["last_error"]
    assert TOKEN not in row["last_error"]
    assert TOKEN not in caplog.text
    assert len(recorder.for_topic(topic)) == 1


async def test_unreachable_server_is_retried(
    connections: Connections, accounts: Accounts, admin: Metadata, new_user: NewUser, sql: Sql
) -> None:
    receiver = await new_user()
    # Nothing listens there: connection refused, retried, then failed.
    await configure_ntfy(accounts, admin, receiver, f"http://127.0.0.1:{free_port()}")
    await send(connections, await new_user(), receiver)
    row = await settled(sql, receiver.id)
    assert (row["status"], row["attempts"]) == ("failed", MAX_ATTEMPTS)
    assert "ConnectError" in row["last_error"]


async def test_refused_requests_write_no_outbox_row(
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    receiver = await new_user()
    topic = await configure_ntfy(accounts, admin, receiver, recorder.url)
    senders = [await new_user() for _ in range(6)]
    for sender in senders[:5]:
        await send(connections, sender, receiver)
    for sender in (senders[0], senders[5]):  # REQUEST_PENDING, then TOO_MANY_PENDING
        with pytest.raises(grpc.aio.AioRpcError):
            await send(connections, sender, receiver)
    assert await sql.value("SELECT count(*) FROM outbox WHERE user_id = $1", receiver.id) == 5
    # Every row delivered: nothing else can be pushed.

    async def delivered() -> bool:
        return not await sql.value(
            "SELECT count(*) FROM outbox WHERE user_id = $1 AND status = 'pending'", receiver.id
        )

    await until(delivered, within=10, what="no row left pending")
    assert len(recorder.for_topic(topic)) == 5


async def test_racing_opposite_requests_leave_one_row_per_pair(
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    """A->B and B->A at once: the loser's transaction is rolled back with its outbox row."""
    pairs = [(await new_user(), await new_user()) for _ in range(8)]
    for a, b in pairs:
        await configure_ntfy(accounts, admin, a, recorder.url)
        await configure_ntfy(accounts, admin, b, recorder.url)
    await asyncio.gather(
        *(send(connections, x, y) for a, b in pairs for x, y in ((a, b), (b, a))),
        return_exceptions=True,
    )
    for a, b in pairs:
        rows = await sql.rows(
            "SELECT user_id FROM outbox WHERE user_id = ANY($1::bigint[])", [a.id, b.id]
        )
        requests = await sql.rows(
            "SELECT receiver_id FROM connection_requests WHERE receiver_id = ANY($1::bigint[])",
            [a.id, b.id],
        )
        assert [r["user_id"] for r in rows] == [r["receiver_id"] for r in requests]
        assert len(rows) == 1


async def test_rolled_back_transaction_sends_nothing(
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    database_url: str,
    sql: Sql,
) -> None:
    receiver = await new_user()
    topic = await configure_ntfy(accounts, admin, receiver, recorder.url)
    connection = await asyncpg.connect(database_url)
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute(
            "INSERT INTO outbox (user_id, kind, display_name) VALUES ($1, 'request_received', 'x')",
            receiver.id,
        )
        await connection.execute("SELECT pg_notify('umbra_outbox', '')")
        await transaction.rollback()
        assert (
            await connection.fetchval("SELECT count(*) FROM outbox WHERE user_id = $1", receiver.id)
            == 0
        )
    finally:
        await connection.close()
    # A real request afterwards: once its push is out, the worker has been past anything the
    # rolled-back transaction could have left.
    await send(connections, await new_user(), receiver)
    assert (await settled(sql, receiver.id))["status"] == "sent"
    assert len(recorder.for_topic(topic)) == 1
