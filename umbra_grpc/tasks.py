"""Stopping a background task for certain.

On Python 3.11 `asyncio.wait_for` can swallow a cancellation: when the task is cancelled in
the same loop turn as the awaited thing finishes, `wait_for` returns its result and the task
runs on (cpython issue 86296, fixed in 3.12). A loop written `while True: await wait_for(...)`
then never ends, and `task.cancel(); await task` waits forever on an idle event loop: the
service's shutdown once hung that way. The service's code uses `asyncio.timeout` instead (ruff
bans `asyncio.wait_for` in umbra_grpc/), and every stop goes through `cancel_and_wait`, which
cancels again until the task is done, so a cancellation swallowed anywhere below (a library
we call) costs a second, not the shutdown.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any, Final

_log = logging.getLogger(__name__)

# How long a cancelled task may take to end before it is cancelled again.
RECANCEL_SECONDS: Final = 1.0


async def cancel_and_wait(
    task: asyncio.Task[Any], *, again_after: float = RECANCEL_SECONDS
) -> None:
    """Cancels `task` and returns once it is done, cancelling again every `again_after` seconds
    while it runs on. Its outcome is taken (an exception it ended with is logged, not raised)."""
    attempts = 0
    while not task.done():
        task.cancel()
        attempts += 1
        await asyncio.wait({task}, timeout=again_after)
    if attempts > 1:
        _log.warning(
            "task %s ignored %d cancellation(s) before it ended", task.get_name(), attempts - 1
        )
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.error("task %s ended with an error", task.get_name(), exc_info=error)


async def report_stall(after: float, what: str, logger: logging.Logger = _log) -> None:
    """After `after` seconds, logs every other task's stack: a stop that outlasts its grace
    shows where it waits (an orchestrator's SIGKILL would otherwise leave no trace)."""
    await asyncio.sleep(after)
    stacks = []
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            out = io.StringIO()
            task.print_stack(limit=12, file=out)
            stacks.append(out.getvalue())
    logger.warning(
        "%s still waiting %.1fs after it began; pending tasks:\n%s", what, after, "\n".join(stacks)
    )
