"""A background job run at start and then every `interval` seconds, until stopped.

The retention job and the expiry sweeper run this way in every replica (each job takes its
own advisory lock, so one replica at a time does the work). A run that fails is logged and
the next one comes on time: the database being away for a while is no reason to stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from umbra_grpc.storage.database import DATABASE_ERRORS
from umbra_grpc.tasks import cancel_and_wait

_log = logging.getLogger(__name__)


class Periodic:
    """Runs `job` now and then every `interval` seconds (never when `interval` is 0)."""

    def __init__(self, name: str, job: Callable[[], Awaitable[None]], interval: float) -> None:
        self._name = name
        self._job = job
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the runs (idempotent)."""
        if self._task is None and self._interval > 0:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Stops the runs (a run in progress is cut short)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                await self._job()
            except Exception as error:  # the database is away, or a bug: try again later
                _log.warning(
                    "%s run failed (%s); next in %.0fs",
                    self._name,
                    type(error).__name__,
                    self._interval,
                    exc_info=not isinstance(error, DATABASE_ERRORS),
                )
            await asyncio.sleep(self._interval)
