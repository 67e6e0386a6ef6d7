"""The client address of audit rows is the access log's peer, computed once per call.

Behind a trusted proxy every `x-forwarded-for` entry counts, joined in order into one list
(RFC 9110 section 5.3), and the rightmost address that is not a trusted proxy is the client.
Audit rows once computed it again from the last entry alone, which differs when a chain is
split over several entries; grpc-python clients cannot send that (they keep the last one of
a repeated key), so these tests check that the two records agree, whatever the chain.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.support import NewUser, RunningServer, Sql, start_server, stop_server, test_config
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
CLIENT = "198.51.100.7"
PROXY = "127.0.0.1"  # the test's own connection: a trusted proxy here


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(test_config(database_url, trusted_proxies=(PROXY,)))
    try:
        yield running
    finally:
        await stop_server(running)


@pytest.mark.parametrize(
    "headers",
    [
        [CLIENT],
        [f"{CLIENT}, {PROXY}"],
        [f"203.0.113.1, {CLIENT}, {PROXY}, {PROXY}"],
    ],
)
async def test_audit_rows_and_the_access_log_name_the_same_client(
    server: RunningServer,
    new_user: NewUser,
    sql: Sql,
    caplog: pytest.LogCaptureFixture,
    headers: list[str],
) -> None:
    connections = connections_pb2_grpc.ConnectionServiceStub(server.channel)
    sender, receiver = await new_user(), await new_user()
    forwarded = tuple(("x-forwarded-for", value) for value in headers)
    with caplog.at_level(logging.INFO):
        await connections.SendRequest(
            connections_pb2.SendRequestRequest(umbral_name=receiver.handle),
            metadata=(*sender.md, *forwarded),
        )
    audited = await sql.value(
        "SELECT host(ip) FROM audit_log WHERE actor_id = $1 AND action = 'connection.request_sent'",
        sender.id,
    )
    logged = [
        record.__dict__.get("peer")
        for record in caplog.records
        if record.__dict__.get("method", "").endswith("/SendRequest")
        and record.__dict__.get("peer") is not None
    ]
    assert audited == CLIENT
    assert logged == [CLIENT]
