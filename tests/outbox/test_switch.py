"""UMBRA_OUTBOX_ENABLED=false: the process runs no push worker; rows wait for one that does."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import Sql, start_server, stop_server, test_config
from tests.outbox.recorder import NtfyRecorder

pytestmark = pytest.mark.asyncio(loop_scope="session")
POLL_SECONDS = 0.05
# An absence is watched for a while, not waited for: a running worker claims a due row at
# once (a wake-up on start and on NOTIFY) and at the latest every POLL_SECONDS; the window
# is forty such polls.
WATCH_SECONDS = 40 * POLL_SECONDS


async def test_a_disabled_outbox_leaves_rows_pending_for_an_enabled_process(
    database_url: str, recorder: NtfyRecorder, sql: Sql
) -> None:
    await sql.rows("INSERT INTO users (id, umbral_name) VALUES (1, 'pushed')")
    await sql.rows(
        "INSERT INTO settings (user_id, ntfy_enabled, ntfy_connections_enabled, "
        "ntfy_server_url, ntfy_topic) VALUES (1, true, true, $1, 'switch')",
        recorder.url,
    )
    await sql.rows(
        "INSERT INTO outbox (user_id, kind, display_name) VALUES (1, 'request_received', 'x')"
    )
    settings = {"outbox_poll_seconds": POLL_SECONDS}

    disabled = await start_server(test_config(database_url, outbox_enabled=False, **settings))
    try:
        await sql.rows("SELECT pg_notify('umbra_outbox', '')")
        deadline = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < deadline:
            [row] = await sql.rows("SELECT status, attempts FROM outbox WHERE user_id = 1")
            assert (row["status"], row["attempts"]) == ("pending", 0)
            assert recorder.for_topic("switch") == []
            await asyncio.sleep(POLL_SECONDS)
    finally:
        await stop_server(disabled)

    # The row was deliverable all along: a process with the worker on sends it.
    enabled = await start_server(test_config(database_url, **settings))
    try:
        await recorder.wait_for("switch", 1)
        deadline = time.monotonic() + 10
        while await sql.value("SELECT status FROM outbox WHERE user_id = 1") != "sent":
            assert time.monotonic() < deadline, "the enabled worker never recorded the send"
            await asyncio.sleep(POLL_SECONDS)
    finally:
        await stop_server(enabled)
