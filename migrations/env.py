"""Alembic environment: runs migrations over asyncpg, online only.

The URL comes from the `sqlalchemy.url` option set by `umbra_grpc.storage.migrate` or, when
alembic is run by hand, from UMBRA_DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from umbra_grpc.storage.database import async_url
from umbra_grpc.storage.migrate import MIGRATION_LOCK_KEY
from umbra_grpc.storage.tables import Base

config = context.config
target_metadata = Base.metadata


def _do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        # Before Alembic reads the current version: replicas starting together queue here,
        # and each later one sees the version the first committed (READ COMMITTED).
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def _run_async_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("UMBRA_DATABASE_URL")
    if not url:
        raise SystemExit("set UMBRA_DATABASE_URL to the database to migrate")
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run against a database")
asyncio.run(_run_async_migrations())
