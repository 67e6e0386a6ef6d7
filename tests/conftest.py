"""Shared fixtures: a throwaway PostgreSQL, a migrated template, a real server per module.

PostgreSQL: `UMBRA_TEST_DATABASE_URL` when set (any server where we may CREATE DATABASE),
else a private cluster started for this run (pgserver's PostgreSQL 16, or the machine's).
`UMBRA_TEST_POOLER=host:port` (set by `make test-pgbouncer`) puts a transaction-mode pooler
in front of the service under test: its pool goes through the pooler, its LISTEN connection,
the fixtures' DDL and the tests' own SQL go straight to PostgreSQL (`tests.support.app_settings`).
Helpers that tests import by name live in `tests/support.py`; only fixtures live here.
Every API test module gets its own database cloned from a template migrated to head, and its
own `grpc.aio` server on a free port, called through the generated stubs; a test that needs a
database of its own (the stream tests in tests/api/watch/, the process tests) takes
`fresh_database`, cloned the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.outbox.recorder import NtfyRecorder
from tests.support import (
    TEST_SECRET,
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    admin_sql,
    bearer,
    clone_database,
    running_server,
    test_config,
    user_creator,
    with_database,
)
from umbra_grpc.embedded import EmbeddedPostgres
from umbra_grpc.pb import accounts_pb2_grpc, connections_pb2_grpc
from umbra_grpc.storage import migrate
from umbra_grpc.tokens import mint_token

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is marked `e2e` (`-m "not e2e"` leaves it out)."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A PostgreSQL server URL for the whole run."""
    configured = os.environ.get("UMBRA_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    # Not under pytest's tmp_path: that is private to root, and PostgreSQL runs as another
    # user when the tests run as root.
    data_dir = Path(tempfile.mkdtemp(prefix="umbra-test-pg-"))
    cluster = EmbeddedPostgres(data_dir, durable=False)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(pg_server_url: str) -> Iterator[str]:
    """A database migrated to head, cloned by every test module."""
    name = f"umbra_template_{uuid.uuid4().hex[:12]}"
    admin_sql(pg_server_url, f'CREATE DATABASE "{name}"')
    try:
        migrate.upgrade(with_database(pg_server_url, name))
        yield name
    finally:
        admin_sql(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def database_url(pg_server_url: str, template_database: str) -> Iterator[str]:
    """A fresh migrated database for one test module."""
    yield from clone_database(pg_server_url, template_database)


@pytest.fixture
def fresh_database(pg_server_url: str, template_database: str) -> Iterator[str]:
    """A fresh migrated database for one test, dropped (its connections ended) after it."""
    yield from clone_database(pg_server_url, template_database)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """A real grpc.aio server on a free port, on this module's database."""
    async with running_server(test_config(database_url)) as running:
        yield running


@pytest.fixture(scope="module")
def connections(server: RunningServer) -> connections_pb2_grpc.ConnectionServiceAsyncStub:
    """ConnectionService stub."""
    return connections_pb2_grpc.ConnectionServiceStub(server.channel)


@pytest.fixture(scope="module")
def accounts(server: RunningServer) -> accounts_pb2_grpc.AccountServiceAsyncStub:
    """AccountService stub."""
    return accounts_pb2_grpc.AccountServiceStub(server.channel)


@pytest.fixture(scope="session")
def admin() -> Metadata:
    """Metadata of a backend service holding the admin scope."""
    return bearer(mint_token(TEST_SECRET, subject="backend-tests", scopes=["umbra.admin"]))


@pytest.fixture(scope="module")
def new_user(accounts: accounts_pb2_grpc.AccountServiceAsyncStub, admin: Metadata) -> NewUser:
    """Creates users with fresh ids (opted in unless told otherwise)."""
    return user_creator(accounts, admin)


@pytest.fixture(scope="module")
def sql(database_url: str) -> Sql:
    """Direct SQL on this module's database."""
    return Sql(database_url)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def recorder() -> AsyncIterator[NtfyRecorder]:
    """A recording ntfy on 127.0.0.1, on a free port (outbox and process tests)."""
    stand_in = NtfyRecorder()
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.stop()
