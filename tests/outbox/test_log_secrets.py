"""SPEC 10.5: no log line at any level holds an ntfy topic, URL userinfo, ntfy token, JWT or
page token. Real RPCs and real deliveries (sent, retried, dead-lettered), every record of
every logger captured at DEBUG from before the server starts, each rendered by both of the
service's formatters (message, extra fields, traceback)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from tests.api.streams import next_event, until_synced, watch
from tests.outbox.recorder import RECORDER_NETWORKS, Answer, NtfyRecorder
from tests.support import (
    TEST_SECRET,
    Accounts,
    Connections,
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    bearer,
    start_server,
    stop_server,
    test_config,
    until,
)
from umbra_grpc.logs import JsonFormatter, TextFormatter
from umbra_grpc.pb import accounts_pb2, connections_pb2, connections_pb2_grpc
from umbra_grpc.tokens import mint_token

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
TOKEN = "ntfy-tk-9f1c2e7a5b3d"
TOPIC = "topic9d8e7f6a5b4c"
ECHOED_TOPIC = "echoed3c4d5e6f7a8b"
USERINFO = "pw7e6d5c4b3a"


class Everything(logging.Handler):
    """Keeps every record, rendered as the service would write it (both formats)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._formats = (JsonFormatter(), TextFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(formatter.format(record) for formatter in self._formats)


@pytest.fixture(scope="module")
def captured() -> Iterator[Everything]:
    root = logging.getLogger()
    handler, level = Everything(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str, captured: Everything) -> AsyncIterator[RunningServer]:
    config = test_config(
        database_url,
        log_level="DEBUG",
        ntfy_allowed_networks=RECORDER_NETWORKS,
        outbox_retry_base_seconds=0.05,
        outbox_retry_cap_seconds=0.1,
        outbox_max_attempts=2,
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await stop_server(running)


async def push_to(
    accounts: Accounts, admin: Metadata, user: TestUser, url: str, topic: str
) -> None:
    await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=user.id,
            settings=accounts_pb2.Settings(
                ntfy=accounts_pb2.NtfySettings(
                    enabled=True,
                    server_url=url,
                    topic=topic,
                    auth_token=TOKEN,
                    connections_enabled=True,
                )
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["ntfy"]),
        ),
        metadata=admin,
    )


async def settled(sql: Sql, *user_ids: int) -> None:
    query = "SELECT count(*) FROM outbox WHERE user_id = ANY($1::bigint[]) AND status = 'pending'"

    async def done() -> bool:
        return not await sql.value(query, list(user_ids))

    await until(done, within=10, what="no row of theirs pending")


async def test_no_secret_reaches_any_log_line(
    captured: Everything,
    server: RunningServer,
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    alice, bob, carol, dave = [await new_user() for _ in range(4)]
    await push_to(accounts, admin, alice, recorder.url, TOPIC)
    # Bob's ntfy answers 500 then 401, echoing the topic and token in its bodies.
    await push_to(accounts, admin, bob, recorder.url + "/", ECHOED_TOPIC)
    echo = f"topic {ECHOED_TOPIC} token {TOKEN} url {recorder.url}/{ECHOED_TOPIC}"
    # (The 500's Location header quotes the topic too.)
    echoed_location = (("Location", f"{recorder.url}/{ECHOED_TOPIC}"),)
    recorder.script(ECHOED_TOPIC, Answer(500, echoed_location, body=echo), Answer(401, body=echo))
    # A URL with userinfo is refused when saved; one written around the rule, when sent.
    with pytest.raises(grpc.aio.AioRpcError):
        await push_to(accounts, admin, carol, f"https://user:{USERINFO}@ntfy.example", TOPIC)
    await push_to(accounts, admin, carol, recorder.url, TOPIC)
    await sql.rows(
        "UPDATE settings SET ntfy_server_url = $1 WHERE user_id = $2",
        f"http://user:{USERINFO}@127.0.0.1:{recorder.port}",
        carol.id,
    )

    stream = watch(connections_pb2_grpc.ConnectionServiceStub(server.channel), alice)
    try:
        await until_synced(stream)
        for sender in (bob, carol, dave):
            await connections.SendRequest(
                pb.SendRequestRequest(umbral_name=alice.handle), metadata=sender.md
            )
            await next_event(stream)
    finally:
        stream.cancel()
    page = await connections.ListIncomingRequests(
        pb.ListIncomingRequestsRequest(page_size=1), metadata=alice.md
    )
    page_token = page.next_page_token
    assert page_token
    await connections.ListIncomingRequests(
        pb.ListIncomingRequestsRequest(page_size=1, page_token=page_token), metadata=alice.md
    )
    for tampered in (page_token[:-2] + "AA", page_token):
        with pytest.raises(grpc.aio.AioRpcError):
            await connections.ListIncomingRequests(
                pb.ListIncomingRequestsRequest(page_token=tampered), metadata=bob.md
            )
    # Accepting pushes to Bob (retried, then dead-lettered) and to Carol (refused).
    incoming = await connections.ListIncomingRequests(
        pb.ListIncomingRequestsRequest(), metadata=alice.md
    )
    for request in incoming.requests:
        await connections.Respond(
            pb.RespondRequest(request_id=request.id, action=pb.RespondRequest.ACTION_ACCEPT),
            metadata=alice.md,
        )
    expired = mint_token(TEST_SECRET, subject=str(alice.id), now=time.time() - 3600, ttl_seconds=60)
    forged = mint_token("another-secret-0123456789-abcdefghijklmnop", subject=str(alice.id))
    for token in (expired, forged, "not.a.jwt"):
        with pytest.raises(grpc.aio.AioRpcError):
            await connections.ListConnections(pb.ListConnectionsRequest(), metadata=bearer(token))
    await recorder.wait_for(TOPIC, 1)
    await settled(sql, alice.id, bob.id, carol.id)
    rows = {
        row["user_id"]: row["status"]
        for row in await sql.rows(
            "SELECT user_id, status FROM outbox WHERE user_id = ANY($1::bigint[])",
            [bob.id, carol.id],
        )
    }
    assert rows == {bob.id: "failed", carol.id: "failed"}
    assert len(recorder.for_topic(ECHOED_TOPIC)) == 2

    jwts = [md[0][1].removeprefix("Bearer ") for md in (admin, alice.md, bob.md, carol.md)]
    secrets = {TOKEN, TOPIC, ECHOED_TOPIC, USERINFO, page_token, expired, forged, *jwts}
    # The loggers that see the secrets were heard: httpx, the access log, auth, the worker.
    for heard in ("HTTP Request: POST", "umbra.access", "bearer token refused", "outbox push"):
        assert any(heard in line for line in captured.lines), heard
    leaks = [(secret, line) for line in captured.lines for secret in secrets if secret in line]
    assert leaks == [], "\n".join(f"{secret}: {line}" for secret, line in leaks)
