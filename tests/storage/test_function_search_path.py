"""Every database function pins its search_path (SPEC 10.12).

A function that resolves table names through the caller's search_path runs against whatever
schema the session puts first: a role that can create a schema (or a temporary table: pg_temp
is searched first unless named) could make `umbra_send_request` read and write its own
`users` and `connection_requests`. Each function therefore carries its own search_path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

on_session_loop = pytest.mark.asyncio(loop_scope="session")

# Functions of the service's schema; members of extensions belong to their extension.
FUNCTIONS = """
    SELECT p.oid::regprocedure::text AS signature, p.proconfig
    FROM pg_proc p
    WHERE p.pronamespace = current_schema()::regnamespace
      AND NOT EXISTS (SELECT 1 FROM pg_depend d
                      WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                        AND d.deptype = 'e')
    ORDER BY 1
"""


@pytest_asyncio.fixture(loop_scope="session")
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@on_session_loop
async def test_every_function_pins_its_search_path(conn: asyncpg.Connection) -> None:
    schema = await conn.fetchval("SELECT current_schema()")
    functions = await conn.fetch(FUNCTIONS)
    assert functions, "the schema has functions (umbra_send_request at least)"
    for function in functions:
        assert function["proconfig"] == [f"search_path={schema}, pg_temp"], function["signature"]


@on_session_loop
async def test_a_session_search_path_cannot_redirect_the_send_function(
    conn: asyncpg.Connection,
) -> None:
    await conn.execute(
        "INSERT INTO users (id, umbral_name) VALUES (7001, 'pinned-a'), (7002, 'pinned-b')"
    )
    await conn.execute(
        "INSERT INTO settings (user_id, accept_connections) VALUES (7001, true), (7002, true)"
    )
    await conn.execute("BEGIN")
    try:
        # A session that puts a schema of its own first, with an empty look-alike `users`.
        await conn.execute("CREATE SCHEMA decoy")
        await conn.execute("CREATE TABLE decoy.users (LIKE public.users INCLUDING ALL)")
        await conn.execute("SET LOCAL search_path = decoy, public")
        row = await conn.fetchrow(
            "SELECT * FROM public.umbra_send_request(7001, 'pinned-b', 5, interval '10 minutes',"
            " interval '1 hour', NULL)"
        )
    finally:
        await conn.execute("ROLLBACK")
    # The function read the real users: the caller exists, and the request was written.
    assert row is not None and row["caller_name"] == "pinned-a"
    assert row["request_id"] is not None
