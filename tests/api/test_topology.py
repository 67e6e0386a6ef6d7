"""Failover paths through the API: a demoted primary's refusals, a multi-host URL (SPEC 12).

Straight to PostgreSQL even under `make test-pgbouncer`: the subject is the service dropping
its own sessions to a read-only node. Behind a pooler those sessions are the pooler's, which
outlive the service's (a demoted node's postgres restarts under Patroni, which ends them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
import pytest_asyncio

from tests.api.streams import Stub, delivers, send
from tests.rich import error_reason
from tests.storage.test_topology import multi_host
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    Sql,
    session_config,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(session_config(database_url))
    try:
        yield running
    finally:
        await stop_server(running)


async def test_writes_refused_by_a_read_only_node_are_retryable_unavailable(
    connections: Connections, new_user: NewUser, server: RunningServer, sql: Sql, database_url: str
) -> None:
    me, other = await new_user(), await new_user()
    name = database_url.rpartition("/")[2]
    # Every new session of this database is read-only, as on a primary just demoted; the
    # server's sessions are cut, so its next ones are such sessions.
    await sql.rows(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    await sql.rows(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'umbra-grpc' AND datname = $1",
        name,
    )
    try:
        outcomes = set()
        for _ in range(3):
            try:
                await send(connections, me, other)
                outcomes.add("OK")
            except grpc.aio.AioRpcError as error:
                outcomes.add(f"{error.code().name} {error_reason(error)}")
        assert outcomes == {"UNAVAILABLE STORAGE_UNAVAILABLE"}
    finally:
        writable = await asyncpg.connect(
            database_url, server_settings={"default_transaction_read_only": "off"}
        )
        try:
            await writable.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        finally:
            await writable.close()
    # The read-only sessions were dropped, not kept: the next write goes through.
    request = await send(connections, me, other)
    assert request.status == pb.ConnectionRequest.STATUS_PENDING
    assert (
        await sql.value("SELECT count(*) FROM connection_requests WHERE sender_id = $1", me.id) == 1
    )


async def test_a_server_on_a_multi_host_url_serves_and_listens(
    database_url: str, connections: Connections, new_user: NewUser
) -> None:
    running = await start_server(test_config(multi_host(database_url)))
    try:
        stub = Stub(running.channel)
        me, sender = await new_user(), await new_user()
        await delivers(stub, stub, sender, me)
    finally:
        await stop_server(running)
