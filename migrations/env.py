"""Alembic environment: runs migrations over asyncpg, online only.

The URL comes from the `sqlalchemy.url` option set by `umbra_grpc.storage.migrate` or, when
alembic is run by hand, from UMBRA_DATABASE_URL. asyncpg itself opens the connection, so
every URL the service takes works here too: SQLAlchemy's URL parser refuses multi-host URLs
(`postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write`). Migrations are also
safe behind a transaction pooler: they run in one transaction (one server connection), with
no statement cache and a fresh name for each prepared statement, so a statement left behind
on a pooled server connection never clashes with the next client's.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import asyncpg
from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from umbra_grpc.storage.database import plain_url
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
    engine = _engine(plain_url(url))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_do_run_migrations)
    finally:
        await engine.dispose()


def _engine(url: str) -> AsyncEngine:
    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(url, statement_cache_size=0)

    def creator() -> Any:
        # SQLAlchemy's own `async_creator` passes no driver options: this is the same call
        # with the statement-cache options added.
        return engine.sync_engine.dialect.dbapi.connect(
            async_creator_fn=connect,
            prepared_statement_cache_size=0,
            prepared_statement_name_func=lambda: f"__umbra_migrate_{uuid.uuid4().hex}__",
        )

    engine = create_async_engine("postgresql+asyncpg://", creator=creator, poolclass=NullPool)
    return engine


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run against a database")
asyncio.run(_run_async_migrations())
