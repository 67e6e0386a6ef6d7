"""Fixtures of the client tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.client.scripted import Script, ScriptedServer, start_scripted


@pytest_asyncio.fixture(loop_scope="session")
async def scripted() -> AsyncIterator[ScriptedServer]:
    """A scripted ConnectionService on a free port, with an empty script."""
    running = await start_scripted(Script())
    try:
        yield running
    finally:
        await running.server.stop(0)
