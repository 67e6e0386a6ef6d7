"""The expiry sweeper (SPEC 11): finalises requests nobody answered within the TTL.

Expiry itself needs no sweeper: every query compares a pending request's age with
UMBRA_REQUEST_TTL_SECONDS, so a request past it is gone from lists, snapshots, Respond and
CancelRequest on every replica at once, and stops blocking a new request of its pair. The
sweeper only finalises what is already true: it marks such requests `expired` (resolve time:
when the TTL ran out), tells the receivers' watch streams (`resolved`, status EXPIRED) and
deletes the request notifications (`umbra_grpc.storage.expiry`).

`serve` sweeps at start and every UMBRA_EXPIRY_SWEEP_SECONDS (0: never; a stale request's
notification and unsent push then stay until its pair writes again). Any number of replicas
may run it: an advisory lock lets one sweep at a time and the others skip.
"""

from __future__ import annotations

import datetime as dt
import logging

from umbra_grpc.domain.periodic import Periodic
from umbra_grpc.storage import expiry as store
from umbra_grpc.storage.database import Database
from umbra_grpc.storage.retention import exclusive

_log = logging.getLogger(__name__)


class ExpirySweeper:
    """Marks requests past the TTL expired, in bounded batches; periodically once started."""

    def __init__(self, db: Database, *, ttl: dt.timedelta, interval: float = 0.0) -> None:
        self._db = db
        self._ttl = ttl
        self._periodic = Periodic("expiry sweep", self._run_once, interval)

    async def sweep(self) -> int | None:
        """One sweep: how many requests it expired; None when another replica is sweeping."""
        async with self._db.session() as conn, exclusive(conn, store.LOCK_KEY) as mine:
            if not mine:
                return None
            total = 0
            while True:
                expired = await store.expire_batch(conn, ttl=self._ttl, batch=store.BATCH_SIZE)
                total += expired
                if expired < store.BATCH_SIZE:
                    return total

    def start(self) -> None:
        """Sweeps now and then every `interval` seconds, until `stop`."""
        self._periodic.start()

    async def stop(self) -> None:
        """Stops the periodic sweeps."""
        await self._periodic.stop()

    async def _run_once(self) -> None:
        expired = await self.sweep()
        if expired:
            _log.info("expired %d requests", expired)
