"""What running behind PgBouncer and Patroni needs from the storage layer (SPEC 12).

Statement cache off (a transaction pooler), writes refused by a node that is a standby now
(SQLSTATE 25006), and multi-host URLs for migrations.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_asyncio

from tests.support import admin_sql, session_config, test_config, with_database
from umbra_grpc.embedded import free_port
from umbra_grpc.storage import migrate
from umbra_grpc.storage.database import Conn, Database, Query, StorageUnavailable

in_session_loop = pytest.mark.asyncio(loop_scope="session")
PREPARED = Query("SELECT count(*) FROM pg_prepared_statements")
BACKEND = Query("SELECT pg_backend_pid()")
WRITE = Query("INSERT INTO users (id, umbral_name) VALUES (:id, :name)")


async def _select(conn: Conn, *, n: int) -> object:
    return await conn.fetchval(Query("SELECT :n::int"), n=n)


def multi_host(url: str) -> str:
    """`url` behind a first host where nothing listens, primary wanted (as Patroni's are)."""
    parts = urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    hosts = f"127.0.0.1:{free_port()},{parts.hostname}:{parts.port}"
    netloc = f"{userinfo}@{hosts}" if userinfo else hosts
    return urlunsplit((parts.scheme, netloc, parts.path, "target_session_attrs=read-write", ""))


@pytest_asyncio.fixture(loop_scope="session")
async def one_connection(database_url: str) -> AsyncIterator[Database]:
    """A pool of one connection, so every unit of work sees the same session (straight to
    PostgreSQL: behind a transaction pooler consecutive units of work get any server
    connection, and a SET SESSION would stay behind on one the pooler lends to others)."""
    db = Database.connect(session_config(database_url, db_pool_size=1))
    try:
        yield db
    finally:
        await db.dispose()


@in_session_loop
@pytest.mark.parametrize(("cache_size", "prepared"), [(0, False), (100, True)])
async def test_statement_cache_size_zero_leaves_no_prepared_statement_behind(
    database_url: str, cache_size: int, prepared: bool
) -> None:
    db = Database.connect(
        test_config(database_url, db_pool_size=1, db_statement_cache_size=cache_size)
    )
    try:
        for n in range(3):
            await db.read(functools.partial(_select, n=n))
        # A pooler would lend the next statement another server connection, where a named
        # statement of this session does not exist.
        assert bool(await db.read(lambda conn: conn.fetchval(PREPARED))) is prepared
    finally:
        await db.dispose()


@in_session_loop
async def test_a_write_refused_as_read_only_is_unavailable_and_its_connection_dropped(
    one_connection: Database,
) -> None:
    db = one_connection
    # The session becomes what a connection to a demoted primary is: read-only.
    async with db.background() as conn:
        before = await conn.fetchval(BACKEND)
        await conn.raw.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")

    async def write(conn: Conn) -> None:
        await conn.execute(WRITE, id=880001, name=f"ro{uuid.uuid4().hex[:8]}")

    with pytest.raises(StorageUnavailable, match="25006"):
        await db.transaction(write)
    # The pool did not keep it: the next unit of work has a new (writable) session.
    assert await db.read(lambda conn: conn.fetchval(BACKEND)) != before
    await db.transaction(write)


@in_session_loop
async def test_the_background_connection_that_reaches_a_read_only_node_is_dropped(
    one_connection: Database,
) -> None:
    db = one_connection
    async with db.background() as conn:
        before = await conn.fetchval(BACKEND)
        await conn.raw.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    with pytest.raises(Exception, match="read-only"):
        async with db.background() as conn:
            await conn.execute(WRITE, id=880002, name="bg-read-only")
    async with db.background() as conn:
        assert await conn.fetchval(BACKEND) != before


def test_migrations_take_a_multi_host_url(pg_server_url: str) -> None:
    name = f"umbra_multi_{uuid.uuid4().hex[:12]}"
    admin_sql(pg_server_url, f'CREATE DATABASE "{name}"')
    try:
        url = multi_host(with_database(pg_server_url, name))
        migrate.upgrade(url)
        migrate.check(url)  # at head, and no drift
        migrate.downgrade(url)
    finally:
        admin_sql(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
