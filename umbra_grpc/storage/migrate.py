"""Alembic, driven from code: `serve` and `migrate` upgrade to head; tests go up, down, up.

Alembic's environment runs its own event loop, so async callers run these in a thread.
Every run (by hand too) first takes the transaction-scoped advisory lock
`MIGRATION_LOCK_KEY` in the transaction that migrates (`migrations/env.py`): replicas that
start together on an empty database queue on it, the first migrates, and the others then
read the version it committed and find nothing to do (SPEC 10.12).
"""

from __future__ import annotations

import functools
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory

from umbra_grpc.storage.database import Conn, Query

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
# pg_advisory_xact_lock's key for migrations; other advisory locks of the service use others.
MIGRATION_LOCK_KEY = 0x756D_6272_615F_6D67  # "umbra_mg"


def alembic_config(url: str) -> AlembicConfig:
    """An Alembic configuration for `url` using the project's migrations folder."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrates the database at `url` up to `revision`."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrates the database at `url` down to `revision`."""
    command.downgrade(alembic_config(url), revision)


def check(url: str) -> None:
    """Raises when the models and the migrated database differ (`alembic check`)."""
    command.check(alembic_config(url))


@functools.cache
def head_revision() -> str | None:
    """The newest revision in the migrations folder (read once: it ships with the code)."""
    return ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()


_CURRENT = Query("SELECT version_num FROM alembic_version")


async def is_at_head(conn: Conn) -> bool:
    """Whether the connected database is migrated to the newest revision."""
    try:
        current = await conn.fetchval(_CURRENT)
    except asyncpg.UndefinedTableError:  # never migrated
        return False
    return current is not None and current == head_revision()
