"""Stopping background tasks for certain (`umbra_grpc.tasks`).

The service once hung in shutdown on an idle event loop: a loop of `asyncio.wait_for` (the
listener's NOTIFY probe) swallowed the cancellation that was meant to stop it. These tests
show that hazard on this Python, that `asyncio.timeout` (what the service uses now) keeps the
cancellation, that `cancel_and_wait` ends even a task that swallowed one, and that a stop that
still waits logs where.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

import pytest

from umbra_grpc.tasks import cancel_and_wait, report_stall

pytestmark = pytest.mark.asyncio(loop_scope="session")

Waiter = Callable[[asyncio.Event], Awaitable[None]]


async def _with_wait_for(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), 60)


async def _with_timeout(event: asyncio.Event) -> None:
    async with asyncio.timeout(60):
        await event.wait()


async def _cancelled_as_the_wait_ends(waiter: Waiter) -> tuple[asyncio.Task[None], list[int]]:
    """A task looping on `waiter`, cancelled in the loop turn where its wait has finished."""
    event, waiting = asyncio.Event(), asyncio.Event()
    rounds: list[int] = []

    async def probe_loop() -> None:
        while True:
            waiting.set()  # the test resumes only once this task is suspended in `waiter`
            await waiter(event)
            rounds.append(1)
            event.clear()

    task = asyncio.create_task(probe_loop())
    await waiting.wait()
    event.set()
    # The interleaving itself, not a condition: one loop turn lets event.wait() finish and
    # wake the task, which has not run yet when it is cancelled.
    await asyncio.sleep(0)
    task.cancel()
    # Loop turns, no time: a cancelled task has ended by then; a swallowed cancel shows as a
    # task still running (the assertion is that nothing more happens, so no condition to await).
    for _ in range(5):
        await asyncio.sleep(0)
    return task, rounds


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for was fixed in Python 3.12")
async def test_wait_for_swallows_a_cancellation_on_this_python() -> None:
    task, rounds = await _cancelled_as_the_wait_ends(_with_wait_for)
    try:
        # The cancellation is gone: the loop went round and waits again, for ever.
        assert not task.done()
        assert rounds == [1]
    finally:
        await cancel_and_wait(task)


async def test_asyncio_timeout_keeps_the_cancellation() -> None:
    task, _ = await _cancelled_as_the_wait_ends(_with_timeout)
    assert task.cancelled()


async def test_cancel_and_wait_ends_a_task_that_swallowed_a_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    swallowed, waiting = asyncio.Event(), asyncio.Event()

    async def stubborn() -> None:
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # as wait_for does on 3.11: the loop goes on
        await asyncio.Event().wait()

    task = asyncio.create_task(stubborn(), name="stubborn")
    await waiting.wait()
    with caplog.at_level(logging.WARNING, logger="umbra_grpc.tasks"):
        await cancel_and_wait(task, again_after=0.05)
    assert swallowed.is_set()
    assert task.cancelled()
    [record] = [r for r in caplog.records if r.name == "umbra_grpc.tasks"]
    assert record.getMessage() == "task stubborn ignored 1 cancellation(s) before it ended"


async def test_cancel_and_wait_takes_the_error_a_task_ended_with(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failing() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(failing(), name="failing")
    await asyncio.wait({task})
    with caplog.at_level(logging.ERROR, logger="umbra_grpc.tasks"):
        await cancel_and_wait(task)
    [record] = [r for r in caplog.records if r.name == "umbra_grpc.tasks"]
    assert record.getMessage() == "task failing ended with an error"
    assert record.exc_info is not None


async def test_a_stalled_shutdown_logs_every_waiting_tasks_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    never = asyncio.Event()

    async def stuck_in_shutdown_step() -> None:
        await never.wait()

    stuck = asyncio.create_task(stuck_in_shutdown_step())
    try:
        with caplog.at_level(logging.WARNING, logger="umbra_grpc.tasks"):
            await report_stall(0, "shutdown")
    finally:
        await cancel_and_wait(stuck)
    [record] = [r for r in caplog.records if r.name == "umbra_grpc.tasks"]
    assert record.levelno == logging.WARNING
    assert "shutdown still waiting" in record.getMessage()
    assert "stuck_in_shutdown_step" in record.getMessage()
    assert "never.wait()" in record.getMessage()
