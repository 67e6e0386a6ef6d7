"""The retention job: how long each kind of row is kept, and the run that deletes the rest.

`serve` runs it every UMBRA_RETENTION_INTERVAL_SECONDS (first at start; 0 turns it off),
`umbra-grpc prune` once. Any number of replicas may run it: an advisory lock lets one run at
a time and the others skip (see `umbra_grpc.storage.retention`, which also lists the rules
and the index behind each).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging

from umbra_grpc.config import Config
from umbra_grpc.storage import retention as store
from umbra_grpc.storage.database import DATABASE_ERRORS, Database

_log = logging.getLogger(__name__)

# Dead letters are kept longer than delivered pushes, to look into (SPEC 10.9: 30 days).
FAILED_OUTBOX_DAYS = 30

Report = dict[str, int]
"""Rows deleted, by rule (`store.RULES`)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Days each kind of row is kept once it is done with (the README's defaults)."""

    outbox_days: int = 7
    outbox_failed_days: int = FAILED_OUTBOX_DAYS
    notifications_days: int = 90
    requests_days: int = 365
    audit_days: int = 365

    @classmethod
    def from_config(cls, config: Config) -> RetentionPolicy:
        """The policy the UMBRA_RETENTION_* variables set."""
        return cls(
            outbox_days=config.retention_outbox_days,
            notifications_days=config.retention_notifications_days,
            requests_days=config.retention_requests_days,
            audit_days=config.retention_audit_days,
        )

    def ages(self) -> dict[str, dt.timedelta]:
        """How old a row of each rule must be to go."""
        days = {
            "outbox_done": self.outbox_days,
            "outbox_failed": self.outbox_failed_days,
            "notifications_read": self.notifications_days,
            "requests_resolved": self.requests_days,
            "audit_log": self.audit_days,
        }
        return {rule: dt.timedelta(days=days[rule]) for rule in store.RULES}


class Retention:
    """Deletes aged rows in bounded batches; periodically once started."""

    def __init__(self, db: Database, policy: RetentionPolicy, *, interval: float = 0.0) -> None:
        self._db = db
        self._policy = policy
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def prune(self) -> Report | None:
        """One run; None when another replica holds the lock (nothing was deleted)."""
        async with self._db.background() as conn, store.exclusive(conn) as mine:
            if not mine:
                return None
            report: Report = {}
            for rule, age in self._policy.ages().items():
                report[rule] = 0
                while True:
                    deleted = await store.delete_batch(conn, rule, age=age, batch=store.BATCH_SIZE)
                    report[rule] += deleted
                    if deleted < store.BATCH_SIZE:
                        break
            return report

    def start(self) -> None:
        """Runs `prune` now and then every `interval` seconds, until `stop`."""
        if self._task is None and self._interval > 0:
            self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        """Stops the periodic runs (a run in progress is cut short; its lock goes with it)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                report = await self.prune()
            except Exception as error:  # the database is away, or a bug: try again later
                _log.warning(
                    "retention run failed (%s); next in %.0fs",
                    type(error).__name__,
                    self._interval,
                    exc_info=not isinstance(error, DATABASE_ERRORS),
                )
            else:
                if report is None:
                    _log.info("retention run skipped: another process holds the lock")
                elif any(report.values()):
                    _log.info("retention run deleted rows", extra=report)
            await asyncio.sleep(self._interval)
