"""WatchIncomingRequests tests: each test on a database, a server and stubs of its own.

A stream hears every NOTIFY on its database, so on a module's shared database one test's
events, rows and streams left open could reach the next test's streams. Here the suite's
fixtures are rebound per test: `database_url` is `fresh_database` (a clone of the migrated
template), and the server, stubs, users and SQL follow it. A module's own fixtures on
`database_url` are per test too. Under `UMBRA_TEST_POOLER` the server reaches its clone
through the pooler like any other (PgBouncer's `*` entry serves every database).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.support import (
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    running_server,
    test_config,
    user_creator,
)
from umbra_grpc.pb import accounts_pb2_grpc, connections_pb2_grpc


@pytest.fixture
def database_url(fresh_database: str) -> str:
    """This test's own migrated database."""
    return fresh_database


@pytest_asyncio.fixture(loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """A real grpc.aio server on a free port, on this test's database."""
    async with running_server(test_config(database_url)) as running:
        yield running


@pytest.fixture
def connections(server: RunningServer) -> connections_pb2_grpc.ConnectionServiceAsyncStub:
    """ConnectionService stub."""
    return connections_pb2_grpc.ConnectionServiceStub(server.channel)


@pytest.fixture
def accounts(server: RunningServer) -> accounts_pb2_grpc.AccountServiceAsyncStub:
    """AccountService stub."""
    return accounts_pb2_grpc.AccountServiceStub(server.channel)


@pytest.fixture
def new_user(accounts: accounts_pb2_grpc.AccountServiceAsyncStub, admin: Metadata) -> NewUser:
    """Creates users with fresh ids (opted in unless told otherwise)."""
    return user_creator(accounts, admin)


@pytest.fixture
def sql(database_url: str) -> Sql:
    """Direct SQL on this test's database."""
    return Sql(database_url)
