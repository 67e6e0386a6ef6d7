"""A shutdown that outlasts its grace says where it waits (`umbra_grpc.cli.report_stall`)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from umbra_grpc.cli import report_stall

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_stalled_shutdown_logs_every_waiting_tasks_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    never = asyncio.Event()

    async def stuck_in_shutdown_step() -> None:
        await never.wait()

    stuck = asyncio.create_task(stuck_in_shutdown_step())
    try:
        with caplog.at_level(logging.WARNING, logger="umbra.cli"):
            await report_stall(0)
    finally:
        stuck.cancel()
    [record] = [r for r in caplog.records if r.name == "umbra.cli"]
    assert record.levelno == logging.WARNING
    assert "shutdown still waiting" in record.getMessage()
    assert "stuck_in_shutdown_step" in record.getMessage()
    assert "never.wait()" in record.getMessage()
