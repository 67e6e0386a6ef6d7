"""The cached "this caller is active" answer is dropped when the user changes (SPEC 10.6).

The cache is warmed first, and shown to be warm: a deactivation written by SQL (no NOTIFY)
is not seen while the cached answer stands. Then a deactivation through AccountService must
be refused at once by the server that made it, and through the `umbra_users` NOTIFY by
another server on the same database.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
import pytest_asyncio

from tests.locks import until_waiting
from tests.support import (
    Accounts,
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    start_server,
    stop_server,
    until,
    user_metadata,
)
from tests.support import test_config as make_config
from umbra_grpc.domain.callers import ActiveUsers
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2, connections_pb2_grpc
from umbra_grpc.storage.database import Database

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def other(database_url: str) -> AsyncIterator[RunningServer]:
    """A second server on the same database: another replica, with its own cache."""
    running = await start_server(make_config(database_url))
    try:
        yield running
    finally:
        await stop_server(running)


async def search(channel: grpc.aio.Channel, user: TestUser) -> grpc.StatusCode:
    stub = connections_pb2_grpc.ConnectionServiceStub(channel)
    try:
        await stub.Search(connections_pb2.SearchRequest(umbral_name=user.handle), metadata=user.md)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def quiet_user(sql: Sql, user_id: int) -> TestUser:
    """A user made by SQL: AccountService's change notices, which can reach a server late
    and drop the entry being warmed, are never sent for it."""
    await sql.rows(
        "WITH made AS (INSERT INTO users (id, umbral_name)"
        " VALUES ($1::bigint, 'quiet' || $1::bigint)"
        " RETURNING id) INSERT INTO settings (user_id) SELECT id FROM made",
        user_id,
    )
    return TestUser(user_id, f"quiet{user_id}", user_metadata(user_id))


async def warmed(channel: grpc.aio.Channel, user: TestUser, sql: Sql) -> None:
    """Caches the user as active on the server behind `channel`, and shows it is cached."""
    assert await search(channel, user) == grpc.StatusCode.OK
    await sql.rows("UPDATE users SET is_active = false WHERE id = $1", user.id)
    assert await search(channel, user) == grpc.StatusCode.OK  # the cached answer
    await sql.rows("UPDATE users SET is_active = true WHERE id = $1", user.id)


async def deactivate(accounts: Accounts, admin: Metadata, user: TestUser) -> None:
    await accounts.UpsertUser(
        accounts_pb2.UpsertUserRequest(
            user=accounts_pb2.User(id=user.id, umbral_name=user.handle, is_active=False)
        ),
        metadata=admin,
    )


async def test_a_warm_cache_is_dropped_by_the_server_that_deactivates(
    server: RunningServer, accounts: Accounts, admin: Metadata, sql: Sql
) -> None:
    user = await quiet_user(sql, 1)
    await warmed(server.channel, user, sql)
    await deactivate(accounts, admin, user)
    assert await search(server.channel, user) == grpc.StatusCode.PERMISSION_DENIED


async def test_a_warm_cache_on_another_server_is_dropped_through_the_notify(
    server: RunningServer,
    other: RunningServer,
    admin: Metadata,
    sql: Sql,
) -> None:
    user = await quiet_user(sql, 2)
    await warmed(other.channel, user, sql)
    await deactivate(accounts_pb2_grpc.AccountServiceStub(server.channel), admin, user)
    # The NOTIFY takes its time to cross; the cache would hold for an hour without it.

    async def refused() -> grpc.StatusCode | None:
        code = await search(other.channel, user)
        return None if code == grpc.StatusCode.OK else code

    code = await until(refused, within=10, what="the other server refusing the user")
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_lookup_overtaken_by_a_change_is_not_cached(
    database_url: str, new_user: NewUser, sql: Sql
) -> None:
    """A lookup that started before a user changed, and ends after the change was reported,
    may carry the old answer: it must not be kept in place of the one just dropped."""
    user = await new_user()
    db = Database.connect(make_config(database_url))
    cache = ActiveUsers(db, ttl=3600)
    locker = await asyncpg.connect(database_url)
    try:
        holding = locker.transaction()
        await holding.start()
        await locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        lookup = asyncio.create_task(cache.is_active(user.id))
        await until_waiting(sql)
        cache.forget(user.id)  # the change notice arrives while the lookup is on its way
        await holding.rollback()
        assert await lookup
        # Deactivated without a notice: only a lookup that was kept would still say active.
        await sql.rows("UPDATE users SET is_active = false WHERE id = $1", user.id)
        assert not await cache.is_active(user.id)
    finally:
        await locker.close()
        await db.dispose()
