"""CancelRequest against the outbox worker (SPEC 10.3): what holds, interleaving by interleaving.

The cancel's one statement marks the request's pending outbox row `skipped` ("skipped:
cancelled") in the cancel's transaction; the worker claims rows with FOR UPDATE SKIP LOCKED
(see `storage.outbox`). So:
1. cancel committed before a claim starts: no claim ever takes the row, nothing is sent;
2. cancel's transaction open while a claim runs: the claim skips the locked row, and once the
   cancel commits the row is no longer pending: nothing is sent;
3. a claim committed before the cancel: the push is already in flight and may be delivered,
   once. The cancel still marks the row skipped, the worker's outcome write is refused by
   the claim's fence (the row is no longer pending), and no retry follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import pytest
import pytest_asyncio

from tests.outbox.recorder import HOLD, RECORDER_NETWORKS, NtfyRecorder
from tests.outbox.test_delivery import configure_ntfy
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
from umbra_grpc.pb import accounts_pb2_grpc, connections_pb2, connections_pb2_grpc
from umbra_grpc.storage import outbox
from umbra_grpc.storage import requests as request_store
from umbra_grpc.storage.database import Conn
from umbra_grpc.storage.requests import CANCELLED_PUSH

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
if TYPE_CHECKING:
    Connections = connections_pb2_grpc.ConnectionServiceAsyncStub
    Accounts = accounts_pb2_grpc.AccountServiceAsyncStub


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """The worker starts only when a test starts it; a failed attempt is retried at once."""
    config = test_config(
        database_url,
        outbox_enabled=False,
        outbox_max_attempts=3,
        outbox_retry_base_seconds=0.01,
        outbox_retry_cap_seconds=0.01,
        outbox_poll_seconds=30.0,
        ntfy_timeout_seconds=5.0,
        ntfy_allowed_networks=RECORDER_NETWORKS,
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await stop_server(running)


async def send(connections: Connections, sender: TestUser, receiver: TestUser) -> int:
    reply = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
    )
    return int(reply.request.id)


async def cancel(connections: Connections, sender: TestUser, request_id: int) -> None:
    await connections.CancelRequest(
        pb.CancelRequestRequest(request_id=request_id), metadata=sender.md
    )


async def push_row(sql: Sql, request_id: int) -> asyncpg.Record:
    [row] = await sql.rows(
        "SELECT id, status, last_error, attempts FROM outbox WHERE request_id = $1", request_id
    )
    return row


async def delivered(sql: Sql, request_id: int, within: float = 10.0) -> None:
    """Until the push of `request_id` is sent."""

    async def sent() -> asyncpg.Record | None:
        row = await push_row(sql, request_id)
        return row if row["status"] == "sent" else None

    await until(sent, within=within, what=f"the push of request {request_id} sent")


@dataclass(frozen=True)
class Cast:
    """A sender, a receiver whose pushes go to `topic` on the recorder, and a control user
    whose push, sent last, shows the worker has been past everything before it (rows are
    claimed oldest first)."""

    sender: TestUser
    receiver: TestUser
    topic: str
    control: TestUser


@pytest_asyncio.fixture(loop_scope="session")
async def cast(
    accounts: Accounts, admin: Metadata, new_user: NewUser, recorder: NtfyRecorder
) -> Cast:
    sender, receiver, control = await new_user(), await new_user(), await new_user()
    topic = await configure_ntfy(accounts, admin, receiver, recorder.url)
    await configure_ntfy(accounts, admin, control, recorder.url)
    return Cast(sender, receiver, topic, control)


@contextlib.asynccontextmanager
async def worker_running(server: RunningServer) -> AsyncIterator[None]:
    worker = server.service.outbox
    await worker.start()
    try:
        yield
    finally:
        await worker.stop()


async def assert_cancelled_push(sql: Sql, request_id: int, *, attempts: int) -> None:
    row = await push_row(sql, request_id)
    assert (row["status"], row["last_error"], row["attempts"]) == (
        "skipped",
        CANCELLED_PUSH,
        attempts,
    )


async def test_a_claim_while_the_cancel_is_uncommitted_skips_the_row(
    server: RunningServer, connections: Connections, cast: Cast, sql: Sql
) -> None:
    request_id = await send(connections, cast.sender, cast.receiver)
    row_id = (await push_row(sql, request_id))["id"]
    db = server.service.db
    cancelled, commit = asyncio.Event(), asyncio.Event()

    async def cancel_and_hold(conn: Conn) -> None:
        # The cancel's own statement, then its transaction stays open until told.
        row = await request_store.cancel(
            conn, caller=cast.sender.id, request_id=request_id, ttl=dt.timedelta(days=30), ip=None
        )
        assert row is not None
        cancelled.set()
        await commit.wait()

    cancelling = asyncio.create_task(db.transaction(cancel_and_hold))
    try:
        await cancelled.wait()
        async with db.background() as conn:
            during = await outbox.claim(conn, limit=100, lease=30.0)
        assert row_id not in [push.id for push in during.pushes]
    finally:
        commit.set()
        await cancelling
    async with db.background() as conn:
        after = await outbox.claim(conn, limit=100, lease=30.0)
    assert row_id not in [push.id for push in after.pushes]
    await assert_cancelled_push(sql, request_id, attempts=0)


async def test_a_push_cancelled_before_any_claim_is_never_sent(
    server: RunningServer, connections: Connections, cast: Cast, recorder: NtfyRecorder, sql: Sql
) -> None:
    withdrawn = await send(connections, cast.sender, cast.receiver)
    await cancel(connections, cast.sender, withdrawn)
    async with worker_running(server):
        await delivered(sql, await send(connections, cast.sender, cast.control))
    assert recorder.for_topic(cast.topic) == []
    await assert_cancelled_push(sql, withdrawn, attempts=0)


async def test_a_push_already_in_flight_goes_once_and_is_never_retried(
    server: RunningServer, connections: Connections, cast: Cast, recorder: NtfyRecorder, sql: Sql
) -> None:
    recorder.script(cast.topic, HOLD)
    async with worker_running(server):
        request_id = await send(connections, cast.sender, cast.receiver)
        await recorder.wait_for(cast.topic, 1)  # claimed, and the POST is on the wire
        await cancel(connections, cast.sender, request_id)
        recorder.release()  # the in-flight attempt ends (unanswered: it would be retried)
        await delivered(sql, await send(connections, cast.sender, cast.control))
    assert len(recorder.for_topic(cast.topic)) == 1
    await assert_cancelled_push(sql, request_id, attempts=1)
