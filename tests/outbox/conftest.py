"""The recording ntfy stand-in, one per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.outbox.recorder import NtfyRecorder


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def recorder() -> AsyncIterator[NtfyRecorder]:
    """A recording ntfy on 127.0.0.1, on a free port."""
    stand_in = NtfyRecorder()
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.stop()
