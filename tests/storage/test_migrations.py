"""Migrations go up, down and up again, and the models match what they build."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import admin_sql, with_database
from umbra_grpc.storage import migrate


@pytest.fixture
def empty_database(pg_server_url: str) -> Iterator[str]:
    import uuid

    name = f"umbra_migrations_{uuid.uuid4().hex[:12]}"
    admin_sql(pg_server_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(pg_server_url, name)
    finally:
        admin_sql(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tables(url: str) -> set[str]:
    import asyncio

    import asyncpg

    async def read() -> set[str]:
        connection = await asyncpg.connect(url)
        try:
            rows = await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        finally:
            await connection.close()
        return {row["tablename"] for row in rows}

    return asyncio.run(read())


def test_up_down_up_and_no_drift(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    expected = {
        "alembic_version",
        "users",
        "settings",
        "connection_requests",
        "user_connections",
        "persons",
        "notifications",
        "audit_log",
        "outbox",
        "user_blocks",
        "idempotency_keys",
    }
    assert tables(empty_database) == expected
    migrate.check(empty_database)  # `alembic check`: autogenerate finds nothing to do
    migrate.downgrade(empty_database, "base")
    assert tables(empty_database) == {"alembic_version"}
    migrate.upgrade(empty_database)
    assert tables(empty_database) == expected
    migrate.check(empty_database)
