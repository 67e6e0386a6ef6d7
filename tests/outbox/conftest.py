"""The recording ntfy stand-in and a bare database, one of each per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.outbox.recorder import NtfyRecorder
from tests.outbox.support import config
from umbra_grpc.storage.database import Database


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def recorder() -> AsyncIterator[NtfyRecorder]:
    """A recording ntfy on 127.0.0.1, on a free port."""
    stand_in = NtfyRecorder()
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    """A pool on the module's database, for workers run without a server."""
    database = Database.connect(config(database_url))
    try:
        yield database
    finally:
        await database.dispose()
