"""The retention job: how long each kind of row is kept, and the run that deletes the rest.

`serve` runs it every UMBRA_RETENTION_INTERVAL_SECONDS (first at start; 0 turns it off),
`umbra-grpc prune` once. Any number of replicas may run it: an advisory lock lets one run at
a time and the others skip (see `umbra_grpc.storage.retention`, which also lists the rules
and the index behind each).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from umbra_grpc.config import Config
from umbra_grpc.domain.periodic import Periodic
from umbra_grpc.storage import idempotency
from umbra_grpc.storage import retention as store
from umbra_grpc.storage.database import Database

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
        """How old a row of each rule must be to go (idempotency keys: their 24 hours)."""
        days = {
            "outbox_done": self.outbox_days,
            "outbox_failed": self.outbox_failed_days,
            "notifications_read": self.notifications_days,
            "requests_resolved": self.requests_days,
            "audit_log": self.audit_days,
        }
        fixed = {"idempotency_keys": idempotency.LIFETIME}
        return {
            rule: fixed[rule] if rule in fixed else dt.timedelta(days=days[rule])
            for rule in store.RULES
        }


class Retention:
    """Deletes aged rows in bounded batches; periodically once started."""

    def __init__(self, db: Database, policy: RetentionPolicy, *, interval: float = 0.0) -> None:
        self._db = db
        self._policy = policy
        self._periodic = Periodic("retention", self._run_once, interval)

    async def prune(self) -> Report | None:
        """One run; None when another replica holds the lock (nothing was deleted)."""
        async with self._db.session() as conn, store.exclusive(conn) as mine:
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
        self._periodic.start()

    async def stop(self) -> None:
        """Stops the periodic runs (a run in progress is cut short; its lock goes with it)."""
        await self._periodic.stop()

    async def _run_once(self) -> None:
        report = await self.prune()
        if report is None:
            _log.info("retention run skipped: another process holds the lock")
        elif any(report.values()):
            _log.info("retention run deleted rows", extra=report)
