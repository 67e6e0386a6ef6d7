"""UMBRA_OUTBOX_ENABLED=false: the process runs no push worker; rows wait for one that does."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.outbox.recorder import NtfyRecorder
from tests.outbox.support import add_pushes, add_user, config, wait_settled
from tests.support import Sql, start_server, stop_server

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLL_SECONDS = 0.05
# An absence is watched for a while, not waited for: a running worker claims a due row at
# once (a wake-up on start and on NOTIFY) and at the latest every POLL_SECONDS; the window
# is forty such polls.
WATCH_SECONDS = 40 * POLL_SECONDS


async def test_a_disabled_outbox_leaves_rows_pending_for_an_enabled_process(
    database_url: str, recorder: NtfyRecorder, sql: Sql
) -> None:
    user = await add_user(sql, recorder)
    [push] = await add_pushes(sql, user)

    fast_polls = config(database_url).with_changes(outbox_poll_seconds=POLL_SECONDS)
    disabled = await start_server(fast_polls.with_changes(outbox_enabled=False))
    try:
        await sql.rows("SELECT pg_notify('umbra_outbox', '')")
        deadline = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < deadline:
            [row] = await sql.rows("SELECT status, attempts FROM outbox WHERE id = $1", push)
            assert (row["status"], row["attempts"]) == ("pending", 0)
            assert recorder.for_topic(f"t{user}") == []
            await asyncio.sleep(POLL_SECONDS)
    finally:
        await stop_server(disabled)

    # The row was deliverable all along: a process with the worker on sends it.
    enabled = await start_server(fast_polls)
    try:
        await recorder.wait_for(f"t{user}", 1)
        await wait_settled(sql)
        assert await sql.value("SELECT status FROM outbox WHERE id = $1", push) == "sent"
    finally:
        await stop_server(enabled)
