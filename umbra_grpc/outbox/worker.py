"""The outbox worker: delivers the pushes that RPCs wrote in their own transactions (SPEC 6).

One worker runs in each server process; any number may share a database. A round:
1. claim up to `outbox_batch_size` due rows in one statement (see `storage.outbox`), which
   reads the users' ntfy settings as they are now: rows they say not to send (master switch
   or connections toggle off, no server or topic) are completed there as `skipped`, nothing
   sent; the others are leased, with where to send them;
2. outside any transaction, POST each leased row (concurrently, at most one batch at a time);
3. write its outcome, one statement each: `sent`, `failed` (dead letter, kept with
   `last_error`), or pending again with a later `next_attempt_at` for a retry.
Every statement of the worker runs in autocommit (`Database.background()`), one round trip.
Rounds start at once when `wake()` is called (the LISTEN connection does, for every NOTIFY
umbra_outbox, i.e. after every commit that wrote a row), when a retry falls due, and every
`outbox_poll_seconds` as the fallback for missed notifications.

Delivery is at least once. A process killed after a POST and before its outcome is written
leaves the row pending under a lease; once the lease runs out (`lease_seconds`, by default
twice the ntfy timeout plus five seconds) any worker claims it again and sends it again. Two
live workers never send the same row at the same time: a claim is exclusive while its
lease lasts, and an outcome is written only by the holder of the latest claim.

Retries: attempt n (1-based; each claim is one) that fails with a 5xx, a timeout or a broken
connection waits a uniformly random time in [0, min(cap, base * 2**(n-1))] ("full jitter");
a 429 waits at least its `Retry-After`. Other 4xx (and 3xx) answers are permanent: the row fails at
once. After `outbox_max_attempts` attempts the row fails. The ntfy token is held in memory
for the send only: never written to the outbox, never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import httpx

from umbra_grpc.config import Config
from umbra_grpc.destinations import Destinations
from umbra_grpc.outbox import ntfy
from umbra_grpc.peer import parse_networks
from umbra_grpc.storage import outbox
from umbra_grpc.storage.database import Database
from umbra_grpc.tasks import cancel_and_wait

_log = logging.getLogger(__name__)

# Outcome writes run on at most this many pooled connections at once, so a batch finishing
# together does not take the pool away from RPCs.
DB_CONCURRENCY = 2
# Lease = 2 x ntfy timeout + this: covers one bounded send and writing its outcome.
LEASE_MARGIN_SECONDS = 5.0
# On stop, sends in flight get this long (at most the ntfy timeout) before being cancelled.
STOP_GRACE_SECONDS = 2.0
# When a row is due but locked by another worker's claim, look again this soon.
MIN_WAIT_SECONDS = 0.05

Jitter = Callable[[float], float]
# Wraps the delivery of one push (tracing puts a span around it).
PushSpan = Callable[[outbox.ClaimedPush], AbstractContextManager[object]]


def full_jitter(ceiling: float) -> float:
    """A uniformly random delay in [0, ceiling]."""
    return random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not a secret


def backoff_ceiling(attempt: int, *, base: float, cap: float) -> float:
    """The longest wait after attempt `attempt` (1-based): base * 2**(attempt-1), capped."""
    return min(cap, base * 2.0 ** min(attempt - 1, 62))


def retry_delay(
    attempt: int, *, base: float, cap: float, retry_after: float | None, jitter: Jitter
) -> float:
    """Full-jitter backoff, never shorter than the server's Retry-After."""
    delay = jitter(backoff_ceiling(attempt, base=base, cap=cap))
    return delay if retry_after is None else max(delay, retry_after)


@dataclass
class OutboxStats:
    """Rows this worker completed or rescheduled since it started, for the metrics endpoint."""

    sent: int = 0
    skipped: int = 0
    failed: int = 0
    retried: int = 0

    def count(self, outcome: outbox.Outcome) -> None:
        """One more row completed with `outcome` (skips are counted as claimed)."""
        if outcome == "sent":
            self.sent += 1
        else:
            self.failed += 1


class OutboxWorker:
    """Delivers outbox rows; `wake()` is called on every NOTIFY umbra_outbox.

    Sends go only where `destinations` allows (by default: UMBRA_NTFY_ALLOWED_NETWORKS and
    the system resolver); a refused one is dead-lettered with its reason.
    """

    def __init__(
        self,
        db: Database,
        config: Config,
        *,
        destinations: Destinations | None = None,
        client: httpx.AsyncClient | None = None,
        jitter: Jitter = full_jitter,
        lease_seconds: float | None = None,
        push_span: PushSpan | None = None,
    ) -> None:
        self._db = db
        self._push_span = push_span
        self._config = config
        self._destinations = destinations or Destinations(
            parse_networks(config.ntfy_allowed_networks)
        )
        self._client = client
        self._owns_client = client is None
        self._jitter = jitter
        self._lease = (
            lease_seconds
            if lease_seconds is not None
            else 2 * config.ntfy_timeout_seconds + LEASE_MARGIN_SECONDS
        )
        self._batch = max(1, config.outbox_batch_size)
        self._poll = max(MIN_WAIT_SECONDS, config.outbox_poll_seconds)
        self._db_slots = asyncio.Semaphore(DB_CONCURRENCY)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.stats = OutboxStats()

    def wake(self) -> None:
        """New rows may be due."""
        self._wake.set()

    async def start(self) -> None:
        """Starts delivering; returns at once."""
        if self._task is not None:
            return
        if self._client is None:
            self._client = ntfy.new_client(self._config, self._destinations)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="outbox-worker")

    async def stop(self) -> None:
        """Stops claiming, lets sends in flight finish briefly; undelivered rows stay pending."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            grace = min(STOP_GRACE_SECONDS, self._config.ntfy_timeout_seconds)
            await asyncio.wait({task}, timeout=grace)
            await cancel_and_wait(task)
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def backlog(self) -> int:
        """Rows not yet delivered, skipped or failed (the metrics endpoint's gauge)."""
        async with self._db.background() as conn:
            return await outbox.backlog(conn)

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()
            try:
                claimed = await self._round()
                wait = 0.0 if claimed >= self._batch else await self._idle_seconds()
                failures = 0
            except Exception as error:  # the database is away, or a bug: stay alive
                failures += 1
                wait = min(
                    self._poll,
                    backoff_ceiling(failures, base=MIN_WAIT_SECONDS, cap=30.0),
                )
                _log.warning(
                    "outbox round failed (%s); next in %.2fs",
                    type(error).__name__,
                    wait,
                    exc_info=not isinstance(error, OSError),
                )
            if wait > 0 and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    async def _round(self) -> int:
        """Claims one batch and delivers it; returns how many rows were claimed."""
        async with self._db.background() as conn:
            claim = await outbox.claim(conn, limit=self._batch, lease=self._lease)
        self.stats.skipped += claim.skipped
        if claim.pushes:
            async with asyncio.TaskGroup() as group:
                for push in claim.pushes:
                    group.create_task(self._deliver(push), name=f"outbox-push-{push.id}")
        return claim.size

    async def _idle_seconds(self) -> float:
        """How long to wait for a wake-up: until the next row falls due, at most the poll."""
        async with self._db.background() as conn:
            due_in = await outbox.seconds_until_due(conn)
        if due_in is None:
            return self._poll
        return min(self._poll, max(due_in, MIN_WAIT_SECONDS))

    async def _deliver(self, push: outbox.ClaimedPush) -> None:
        """Sends one claimed row and records the outcome; never raises."""
        try:
            if self._push_span is None:
                await self._deliver_or_raise(push)
            else:
                with self._push_span(push):
                    await self._deliver_or_raise(push)
        except Exception as error:
            # The row keeps its lease and is claimed again once it runs out.
            _log.warning(
                "outbox push %d not recorded (%s); retried after the lease",
                push.id,
                type(error).__name__,
            )

    async def _deliver_or_raise(self, push: outbox.ClaimedPush) -> None:
        message = ntfy.message_for(push.kind, push.display_name)
        if message is None:
            await self._complete(push, "failed", f"unknown kind {push.kind[:40]!r}")
            return
        assert self._client is not None  # start() made it
        result = await ntfy.publish(
            self._client,
            server_url=push.server_url,
            topic=push.topic,
            token=push.auth_token,
            message=message,
            deadline=self._config.ntfy_timeout_seconds,
        )
        if isinstance(result, ntfy.Delivered):
            await self._complete(push, "sent", None)
        elif isinstance(result, ntfy.Rejected):
            await self._complete(push, "failed", result.error)
        elif push.attempt >= self._config.outbox_max_attempts:
            await self._complete(push, "failed", f"{result.error} (attempt {push.attempt})")
        else:
            await self._reschedule(push, result)

    async def _complete(
        self, push: outbox.ClaimedPush, outcome: outbox.Outcome, note: str | None
    ) -> None:
        async with self._db_slots, self._db.background() as conn:
            recorded = await outbox.complete(
                conn, push_id=push.id, attempt=push.attempt, outcome=outcome, note=note
            )
        if not recorded:
            _log.warning("outbox push %d: lease lost before its outcome was written", push.id)
            return
        self.stats.count(outcome)
        if outcome == "failed":
            _log.warning(
                "outbox push %d failed for good after %d attempt(s): %s",
                push.id,
                push.attempt,
                note,
            )

    async def _reschedule(self, push: outbox.ClaimedPush, result: ntfy.Retry) -> None:
        delay = retry_delay(
            push.attempt,
            base=self._config.outbox_retry_base_seconds,
            cap=self._config.outbox_retry_cap_seconds,
            retry_after=result.retry_after,
            jitter=self._jitter,
        )
        async with self._db_slots, self._db.background() as conn:
            recorded = await outbox.reschedule(
                conn, push_id=push.id, attempt=push.attempt, delay=delay, error=result.error
            )
        if recorded:
            self.stats.retried += 1
            _log.info(
                "outbox push %d attempt %d: %s; retry in %.2fs",
                push.id,
                push.attempt,
                result.error,
                delay,
            )
