"""Test helpers shared across the suite: configurations, servers, users, SQL.

Fixtures stay in `tests/conftest.py` (pytest finds them there); everything a test imports
by name lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from umbra_grpc.config import Config
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc
from umbra_grpc.server import Service
from umbra_grpc.storage.database import Database, StatementCounter
from umbra_grpc.tokens import mint_token

TEST_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


Metadata = tuple[tuple[str, str], ...]


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def app_settings(database_url: str) -> dict[str, Any]:
    """The Config fields that point the service under test at `database_url`.

    Under `UMBRA_TEST_POOLER`, as deploy/ runs it behind PgBouncer: the pool through the
    pooler without prepared statements, the one LISTEN connection direct.
    """
    pooler = os.environ.get("UMBRA_TEST_POOLER")
    parts = urlsplit(database_url)
    server = urlsplit(os.environ.get("UMBRA_TEST_DATABASE_URL", ""))
    user, _, hosts = parts.netloc.rpartition("@")
    # Only the test server is behind the pooler (not the unreachable URLs some tests use, nor
    # multi-host ones).
    if not pooler or hosts != server.netloc.rpartition("@")[2]:
        return {"database_url": database_url}
    pooled = parts._replace(netloc=f"{user}@{pooler}" if user else pooler).geturl()
    return {
        "database_url": pooled,
        "listen_database_url": database_url,
        "db_statement_cache_size": 0,
    }


def app_environment(database_url: str) -> dict[str, str]:
    """`app_settings` as the UMBRA_* variables of an `umbra-grpc` process."""
    names = {
        "database_url": "UMBRA_DATABASE_URL",
        "listen_database_url": "UMBRA_LISTEN_DATABASE_URL",
        "db_statement_cache_size": "UMBRA_DB_STATEMENT_CACHE_SIZE",
    }
    return {names[field]: str(value) for field, value in app_settings(database_url).items()}


def admin_sql(url: str, *statements: str) -> None:
    """Runs statements outside a transaction (CREATE/DROP DATABASE)."""

    async def run() -> None:
        connection = await asyncpg.connect(url)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def clone_database(pg_server_url: str, template: str) -> Iterator[str]:
    name = f"umbra_test_{uuid.uuid4().hex[:12]}"
    admin_sql(pg_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield with_database(pg_server_url, name)
    finally:
        admin_sql(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_config(database_url: str, **changes: object) -> Config:
    """Configuration for an in-process test server: floors and rate limits off."""
    config = Config(
        **app_settings(database_url),
        listen="127.0.0.1:0",
        jwt_secret=TEST_SECRET,
        rate_limits="off",
        timing_floors="off",
        user_cache_seconds=3600.0,
        grace_seconds=1.0,
        log_format="text",
    )
    return config.with_changes(**changes)


test_config.__test__ = False  # type: ignore[attr-defined]


def session_config(database_url: str, **changes: object) -> Config:
    """`test_config` straight to PostgreSQL even under `UMBRA_TEST_POOLER`: for the few tests
    whose subject is the PostgreSQL session behind a pooled connection (its backend pid, a
    SET SESSION on it), which a transaction pooler by design does not keep."""
    return test_config(database_url, **changes).with_changes(
        database_url=database_url, listen_database_url=None
    )


@dataclass
class RunningServer:
    """A started in-process server and a channel to it."""

    service: Service
    channel: grpc.aio.Channel
    statements: StatementCounter

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.service.port}"


def separate_channel(target: str, *options: tuple[str, int]) -> grpc.aio.Channel:
    """A channel with its own TCP connection: by default channels to one target share one,
    and its HTTP/2 stream limit (UMBRA_MAX_CONCURRENT_STREAMS), which real clients do not."""
    return grpc.aio.insecure_channel(
        target, options=[("grpc.use_local_subchannel_pool", 1), *options]
    )


async def start_server(config: Config, **options: Any) -> RunningServer:
    """Starts a server (`options` go to `Service`) and waits until health says SERVING."""
    db = Database.connect(config)
    statements = StatementCounter()
    statements.attach(db)
    service = Service(config, db, **options)
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(200):
        reply = await health.Check(health_pb2.HealthCheckRequest())
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("server never became SERVING")
    return RunningServer(service, channel, statements)


async def stop_server(server: RunningServer) -> None:
    await server.channel.close()
    await server.service.stop(0.5)


@contextlib.asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[RunningServer]:
    """`start_server`, stopped however the block ends (the `server` fixtures)."""
    running = await start_server(config)
    try:
        yield running
    finally:
        await stop_server(running)


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def user_metadata(user_id: int) -> Metadata:
    """Metadata of an end user."""
    return bearer(mint_token(TEST_SECRET, subject=str(user_id)))


@dataclass(frozen=True)
class TestUser:
    """A user created through AccountService."""

    id: int
    handle: str
    md: Metadata


TestUser.__test__ = False  # type: ignore[attr-defined]


NewUser = Callable[..., Awaitable[TestUser]]


def user_creator(accounts: accounts_pb2_grpc.AccountServiceAsyncStub, admin: Metadata) -> NewUser:
    """Creates users with fresh ids through AccountService (the `new_user` fixtures)."""
    ids = itertools.count(1000)

    async def create(
        *,
        accept: bool = True,
        active: bool = True,
        preferred_name: str = "",
        handle: str | None = None,
        profile: accounts_pb2.Profile | None = None,
    ) -> TestUser:
        user_id = next(ids)
        name = handle or f"user{user_id}"
        await accounts.UpsertUser(
            accounts_pb2.UpsertUserRequest(
                user=accounts_pb2.User(
                    id=user_id, umbral_name=name, is_active=active, profile=profile
                )
            ),
            metadata=admin,
        )
        await accounts.UpdateSettings(
            accounts_pb2.UpdateSettingsRequest(
                user_id=user_id,
                settings=accounts_pb2.Settings(
                    accept_connections=accept, preferred_name=preferred_name
                ),
                update_mask={"paths": ["accept_connections", "preferred_name"]},
            ),
            metadata=admin,
        )
        return TestUser(user_id, name.lower(), user_metadata(user_id))

    return create


class Sql:
    """Direct reads of the module's database, to check rows after each scenario."""

    def __init__(self, url: str) -> None:
        self._url = url

    async def rows(self, query: str, *args: object) -> list[asyncpg.Record]:
        connection = await asyncpg.connect(self._url)
        try:
            return list(await connection.fetch(query, *args))
        finally:
            await connection.close()

    async def value(self, query: str, *args: object) -> object:
        rows = await self.rows(query, *args)
        return rows[0][0] if rows else None
