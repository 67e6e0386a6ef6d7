"""Test helpers shared across the suite: configurations, servers, users, SQL.

Fixtures stay in `tests/conftest.py` (pytest finds them there); everything a test imports
by name lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar, cast, overload
from urllib.parse import urlsplit

import asyncpg
import grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from umbra_grpc.config import Config
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2, connections_pb2_grpc
from umbra_grpc.server import Service
from umbra_grpc.storage.database import Database, StatementCounter
from umbra_grpc.tokens import mint_token

TEST_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


Metadata = tuple[tuple[str, str], ...]
# What `ConnectionServiceStub(channel)` is on a grpc.aio channel. The async stubs exist only in
# the generated .pyi (and a stream call is not subscriptable at run time): named as strings.
Connections: TypeAlias = "connections_pb2_grpc.ConnectionServiceAsyncStub"
Accounts: TypeAlias = "accounts_pb2_grpc.AccountServiceAsyncStub"
Watch: TypeAlias = (
    "grpc.aio.UnaryStreamCall[connections_pb2.WatchIncomingRequestsRequest, "
    "connections_pb2.WatchIncomingRequestsResponse]"
)
T = TypeVar("T")


@overload
async def until(
    condition: Callable[[], Awaitable[T | None]],
    *,
    within: float,
    what: str | Callable[[], object],
    every: float = 0.02,
) -> T: ...
@overload
async def until(
    condition: Callable[[], T | None],
    *,
    within: float,
    what: str | Callable[[], object],
    every: float = 0.02,
) -> T: ...
async def until(
    condition: Callable[[], object],
    *,
    within: float,
    what: str | Callable[[], object],
    every: float = 0.02,
) -> object:
    """Polls `condition` (sync or async) every `every` seconds until it returns something
    truthy, and returns that; fails naming `what` once `within` seconds have passed (a
    callable `what` is asked at that moment, for state worth seeing in the failure)."""
    deadline = time.monotonic() + within
    while True:
        seen = condition()
        if inspect.isawaitable(seen):
            seen = await seen
        if seen:
            return seen
        if time.monotonic() >= deadline:
            raise _not_within(within, what, seen)
        await asyncio.sleep(every)


def until_sync(
    condition: Callable[[], T | None],
    *,
    within: float,
    what: str | Callable[[], object],
    every: float = 0.05,
) -> T:
    """`until` for code outside an event loop (tests driving `umbra-grpc` processes)."""
    deadline = time.monotonic() + within
    while not (seen := condition()):
        if time.monotonic() >= deadline:
            raise _not_within(within, what, seen)
        time.sleep(every)
    return seen


def _not_within(within: float, what: str | Callable[[], object], seen: object) -> AssertionError:
    said = what() if callable(what) else what
    return AssertionError(f"not within {within}s: {said} (last: {seen!r})")


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


test_config.__test__ = False  # type: ignore[attr-defined]  # pytest's marker: not a test


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

    async def serving() -> bool:
        reply = await health.Check(health_pb2.HealthCheckRequest())
        return bool(
            reply.status == health_pb2.HealthCheckResponse.SERVING
        )  # grpc_health ships no stubs

    await until(serving, within=10, what="the server SERVING", every=0.05)
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


def raw_unary_unary(
    channel: grpc.aio.Channel, method: str
) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """`method` called with serialized bytes and answering them (no (de)serializers)."""
    return channel.unary_unary(method)


def raw_unary_stream(
    channel: grpc.aio.Channel, method: str
) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    """`raw_unary_unary` for a server-streaming method."""
    return channel.unary_stream(method)


def raw_stream_unary(
    channel: grpc.aio.Channel, method: str
) -> grpc.aio.StreamUnaryMultiCallable[bytes, bytes]:
    """`raw_unary_unary` for a client-streaming method."""
    return channel.stream_unary(method)


# A grpc.aio handler's behaviours are coroutine functions and async generators; types-grpcio
# types RpcMethodHandler's as synchronous ones. The interceptor tests call them directly.
AioUnary = Callable[[Any, Any], Awaitable[Any]]
AioUnaryStream = Callable[[Any, Any], AsyncGenerator[Any, None]]


def aio_unary(handler: grpc.RpcMethodHandler[Any, Any]) -> AioUnary:
    """The unary-unary behaviour of a grpc.aio handler."""
    assert handler.unary_unary is not None
    return cast(AioUnary, handler.unary_unary)


def aio_unary_stream(handler: grpc.RpcMethodHandler[Any, Any]) -> AioUnaryStream:
    """The unary-stream behaviour of a grpc.aio handler."""
    assert handler.unary_stream is not None
    return cast(AioUnaryStream, handler.unary_stream)


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


TestUser.__test__ = False  # type: ignore[attr-defined]  # pytest's marker: not a test


NewUser = Callable[..., Awaitable[TestUser]]


def user_creator(accounts: accounts_pb2_grpc.AccountServiceAsyncStub, admin: Metadata) -> NewUser:
    """Creates users with fresh ids through AccountService, opted in unless told otherwise
    (the `new_user` fixtures)."""
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
                update_mask=field_mask_pb2.FieldMask(
                    paths=["accept_connections", "preferred_name"]
                ),
            ),
            metadata=admin,
        )
        return TestUser(user_id, name.lower(), user_metadata(user_id))

    return create


class AccessLine(Protocol):
    """A record of the `umbra.access` logger as tests read it: the interceptor's fields come
    through `extra=`, which LogRecord's type cannot know (`events_sent` on streams only,
    `trace_id` with tracing on). Typed by `cast`: see `access_line`."""

    name: str
    levelno: int
    method: str
    caller: str | None
    peer: str | None
    code: str
    duration_ms: float
    correlation_id: str
    events_sent: int
    trace_id: str

    def getMessage(self) -> str: ...  # noqa: N802 - LogRecord's name


def access_line(record: logging.LogRecord) -> AccessLine:
    """`record`, an access-log line, with its `extra=` fields typed."""
    assert record.name == "umbra.access", record.name
    return cast(AccessLine, record)


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

    async def value(self, query: str, *args: object) -> Any:
        """The first column of the first row (None without rows): asyncpg's, typed as it."""
        rows = await self.rows(query, *args)
        return rows[0][0] if rows else None
