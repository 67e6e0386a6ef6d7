"""A bare database pool per test module (the ntfy `recorder` is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.outbox.support import config
from umbra_grpc.storage.database import Database


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    """A pool on the module's database, for workers run without a server."""
    database = Database.connect(config(database_url))
    try:
        yield database
    finally:
        await database.dispose()
