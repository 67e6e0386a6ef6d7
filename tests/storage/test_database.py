"""The unit of work: retries, constraint mapping, lost databases, the statement counter."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from tests.conftest import test_config
from umbra_grpc.domain.errors import HandleTaken
from umbra_grpc.storage.database import Database, StatementCounter, StorageUnavailable

pytestmark = pytest.mark.asyncio(loop_scope="session")


class _DriverError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


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

    async def work(conn: AsyncConnection) -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise DBAPIError("SELECT 1", {}, _DriverError(state))
        return int((await conn.execute(text("SELECT 7"))).scalar_one())

    assert await db.transaction(work) == 7
    assert len(attempts) == 3


async def test_retries_are_bounded(db: Database) -> None:
    attempts = []

    async def work(conn: AsyncConnection) -> None:
        attempts.append(1)
        raise DBAPIError("SELECT 1", {}, _DriverError("40001"))

    with pytest.raises(DBAPIError):
        await db.transaction(work)
    assert len(attempts) == 3


async def test_other_errors_are_not_retried(db: Database) -> None:
    attempts = []

    async def work(conn: AsyncConnection) -> None:
        attempts.append(1)
        await conn.execute(text("SELECT 1/0"))

    with pytest.raises(DBAPIError):
        await db.transaction(work)
    assert len(attempts) == 1


async def test_unique_violations_map_by_constraint_name(db: Database) -> None:
    async def work(conn: AsyncConnection) -> None:
        await conn.execute(
            text("INSERT INTO users (id, umbral_name) VALUES (900001, 'dup'), (900002, 'dup')")
        )

    with pytest.raises(HandleTaken):
        await db.transaction(work, constraint_errors={"uq_users_umbral_name_lower": HandleTaken})
    # Without a mapping the driver error goes up unchanged (the edge logs it as INTERNAL).
    with pytest.raises(DBAPIError):
        await db.transaction(work)


async def test_an_unreachable_database_is_storage_unavailable() -> None:
    gone = Database.connect(
        test_config("postgresql://postgres@127.0.0.1:1/postgres", db_pool_timeout_seconds=1.0)
    )
    try:
        with pytest.raises(StorageUnavailable):
            await gone.read(lambda conn: conn.execute(text("SELECT 1")))
        with pytest.raises(StorageUnavailable):
            await gone.transaction(lambda conn: conn.execute(text("SELECT 1")))
        assert not await gone.ping()
    finally:
        await gone.dispose()


async def test_statement_counter_counts_begin_and_commit_but_not_autocommit(
    db: Database,
) -> None:
    counter = StatementCounter()
    counter.attach(db.engine)
    await db.read(lambda conn: conn.execute(text("SELECT 1")))
    assert counter.count == 1
    counter.reset()
    await db.transaction(lambda conn: conn.execute(text("SELECT 1")))
    assert counter.statements == ["BEGIN", "SELECT 1", "COMMIT"]
    counter.reset()
    assert await db.ping()
    async with db.background() as conn:
        await conn.execute(text("SELECT 1"))
    assert counter.count == 0
