"""What the database itself refuses, whatever the Python code does (SPEC 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside a transaction that is rolled back after each test."""
    connection = await asyncpg.connect(database_url)
    transaction = connection.transaction()
    await transaction.start()
    await connection.execute(
        "INSERT INTO users (id, umbral_name) VALUES (1, 'one'), (2, 'two'), (3, 'three');"
        "INSERT INTO settings (user_id) VALUES (1), (2), (3);"
    )
    try:
        yield connection
    finally:
        await transaction.rollback()
        await connection.close()


async def violation(db: asyncpg.Connection, statement: str) -> str:
    savepoint = db.transaction()  # nested: the outer test transaction survives
    await savepoint.start()
    try:
        with pytest.raises(asyncpg.IntegrityConstraintViolationError) as caught:
            await db.execute(statement)
    finally:
        await savepoint.rollback()
    name: str | None = caught.value.constraint_name
    assert name is not None
    return name


async def test_i1_one_pending_request_per_unordered_pair(db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO connection_requests (sender_id, receiver_id) VALUES (1, 2)")
    for statement in (
        "INSERT INTO connection_requests (sender_id, receiver_id) VALUES (1, 2)",
        "INSERT INTO connection_requests (sender_id, receiver_id) VALUES (2, 1)",
    ):
        assert await violation(db, statement) == "uq_connection_requests_pending_pair"
    # Resolved requests do not count.
    await db.execute("UPDATE connection_requests SET status = 'rejected', resolved_at = now()")
    await db.execute("INSERT INTO connection_requests (sender_id, receiver_id) VALUES (2, 1)")


async def test_request_shape(db: asyncpg.Connection) -> None:
    assert (
        await violation(
            db, "INSERT INTO connection_requests (sender_id, receiver_id) VALUES (1, 1)"
        )
        == "ck_connection_requests_not_self"
    )
    assert (
        await violation(
            db,
            "INSERT INTO connection_requests (sender_id, receiver_id, status, resolved_at) "
            "VALUES (1, 3, 'maybe', now())",
        )
        == "ck_connection_requests_status"
    )
    assert (
        await violation(
            db,
            "INSERT INTO connection_requests (sender_id, receiver_id, status) "
            "VALUES (1, 3, 'accepted')",
        )
        == "ck_connection_requests_resolved_at"
    )
    assert (
        await violation(
            db, "INSERT INTO connection_requests (sender_id, receiver_id) VALUES (1, 99)"
        )
        == "fk_connection_requests_receiver_id"
    )


async def test_i2_connections_are_symmetric_and_unique(db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO persons (id, owner_user_id, display_name) OVERRIDING SYSTEM VALUE "
        "VALUES (1, 1, 'two'), (2, 2, 'one')"
    )
    # One direction alone cannot commit (the deferred mirror key is checked at commit).
    savepoint = db.transaction()
    await savepoint.start()
    await db.execute(
        "INSERT INTO user_connections (user_id, connected_user_id, person_id) VALUES (1, 2, 1)"
    )
    with pytest.raises(asyncpg.ForeignKeyViolationError) as caught:
        await db.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert caught.value.constraint_name == "fk_user_connections_reverse"
    await savepoint.rollback()
    await db.execute(
        "INSERT INTO user_connections (user_id, connected_user_id, person_id) "
        "VALUES (1, 2, 1), (2, 1, 2)"
    )
    await db.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert (
        await violation(
            db,
            "INSERT INTO user_connections (user_id, connected_user_id, person_id) VALUES (1, 2, 1)",
        )
        == "uq_user_connections_pair"
    )


async def test_handles_unique_case_insensitively_and_lower_case(db: asyncpg.Connection) -> None:
    assert (
        await violation(db, "INSERT INTO users (id, umbral_name) VALUES (4, 'One')")
        == "ck_users_umbral_name_format"
    )
    await db.execute("UPDATE users SET umbral_name = 'uno' WHERE id = 1")
    assert (
        await violation(db, "INSERT INTO users (id, umbral_name) VALUES (4, 'uno')")
        == "uq_users_umbral_name_lower"
    )


async def test_timestamps_are_timestamptz(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND (column_name LIKE '%\\_at' OR data_type LIKE 'time%')"
    )
    assert rows
    assert {row["data_type"] for row in rows} == {"timestamp with time zone"}
