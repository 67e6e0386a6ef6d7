"""The unit of work: retries, constraint mapping, lost databases, the statement counter."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from tests.support import Sql, session_config, test_config
from umbra_grpc.domain.errors import HandleTaken
from umbra_grpc.storage.database import (
    Conn,
    Database,
    Query,
    StatementCounter,
    StorageBusy,
    StorageUnavailable,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")
RETRYABLE = {"40001": asyncpg.SerializationError, "40P01": asyncpg.DeadlockDetectedError}
SELECT_1 = Query("SELECT 1")


@pytest_asyncio.fixture(loop_scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database.connect(test_config(database_url))
    try:
        yield database
    finally:
        await database.dispose()


@pytest.mark.parametrize("state", ["40001", "40P01"])
async def test_serialization_failures_and_deadlocks_are_retried(db: Database, state: str) -> None:
    attempts = []

    async def work(conn: Conn) -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise RETRYABLE[state](f"sqlstate {state}")
        return int(await conn.fetchval(Query("SELECT 7")))

    assert await db.transaction(work) == 7
    assert len(attempts) == 3


async def test_retries_are_bounded(db: Database) -> None:
    attempts = []

    async def work(conn: Conn) -> None:
        attempts.append(1)
        raise asyncpg.SerializationError("sqlstate 40001")

    # What is left after the retries is contention, answered STORAGE_BUSY (SPEC 10.8).
    with pytest.raises(StorageBusy) as caught:
        await db.transaction(work)
    assert isinstance(caught.value.__cause__, asyncpg.SerializationError)
    assert len(attempts) == 3


async def test_other_errors_are_not_retried(db: Database) -> None:
    attempts = []

    async def work(conn: Conn) -> None:
        attempts.append(1)
        await conn.execute(Query("SELECT 1/0"))

    with pytest.raises(asyncpg.DivisionByZeroError):
        await db.transaction(work)
    assert len(attempts) == 1


async def test_unique_violations_map_by_constraint_name(db: Database) -> None:
    async def work(conn: Conn) -> None:
        await conn.execute(
            Query("INSERT INTO users (id, umbral_name) VALUES (900001, 'dup'), (900002, 'dup')")
        )

    with pytest.raises(HandleTaken):
        await db.transaction(work, constraint_errors={"uq_users_umbral_name_lower": HandleTaken})
    # Without a mapping the driver error goes up unchanged (the edge logs it as INTERNAL).
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.transaction(work)


async def test_an_unreachable_database_is_storage_unavailable() -> None:
    gone = Database.connect(
        test_config("postgresql://postgres@127.0.0.1:1/postgres", db_pool_timeout_seconds=1.0)
    )
    try:
        with pytest.raises(StorageUnavailable):
            await gone.read(lambda conn: conn.execute(SELECT_1))
        with pytest.raises(StorageUnavailable):
            await gone.transaction(lambda conn: conn.execute(SELECT_1))
        assert not await gone.ping()
    finally:
        await gone.dispose()


async def test_statement_counter_counts_begin_and_commit_but_not_autocommit(
    db: Database,
) -> None:
    counter = StatementCounter()
    counter.attach(db)
    await db.read(lambda conn: conn.execute(SELECT_1))
    assert counter.count == 1
    counter.reset()
    await db.transaction(lambda conn: conn.execute(SELECT_1))
    assert counter.statements == ["BEGIN", "SELECT 1", "COMMIT"]
    counter.reset()

    async def fails(conn: Conn) -> None:
        await conn.execute(Query("SELECT 1/0"))

    with pytest.raises(asyncpg.DivisionByZeroError):
        await db.transaction(fails)
    assert counter.statements == ["BEGIN", "SELECT 1/0", "ROLLBACK"]
    counter.reset()
    assert await db.ping()
    async with db.background() as conn:
        await conn.execute(SELECT_1)
    assert counter.count == 0


async def test_json_reads_as_objects_and_goes_in_as_text(db: Database) -> None:
    row = await db.read(
        lambda conn: conn.fetchrow(
            Query("SELECT 1 AS id, CAST(:doc AS jsonb) AS doc, '[1]'::json AS list"),
            doc='{"a": "b"}',
        )
    )
    assert row is not None
    assert (row["id"], row["doc"], row["list"]) == (1, {"a": "b"}, [1])
    # A dict passed for JSON is a bug, not something to encode quietly.
    with pytest.raises(asyncpg.DataError, match="JSON text"):
        await db.read(
            lambda conn: conn.fetchval(Query("SELECT CAST(:doc AS jsonb)"), doc={"a": "b"})
        )


async def test_a_connection_goes_back_to_the_pool_without_a_reset_round_trip(
    database_url: str, sql: Sql
) -> None:
    """asyncpg's default reset would send RESET ALL; UNLISTEN *; ... on every release.

    Seen from PostgreSQL's side by the session's backend pid: straight to PostgreSQL, as
    behind a pooler the pid asyncpg knows is the pooler's."""
    db = Database.connect(session_config(database_url))
    try:
        async with db.background() as conn:
            pid = conn.raw.get_server_pid()
            await conn.execute(Query("SELECT 1 AS last_statement"))
        assert db.checked_out() == 0
        [row] = await sql.rows("SELECT state, query FROM pg_stat_activity WHERE pid = $1", pid)
    finally:
        await db.dispose()
    assert (row["state"], row["query"]) == ("idle", "SELECT 1 AS last_statement")
