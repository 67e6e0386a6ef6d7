"""WatchIncomingRequests: a snapshot, `synced`, then live events from LISTEN/NOTIFY.

The feed (one per process) receives every `umbra_requests` NOTIFY from the process's single
listener connection. Payloads carry ids only; the feed looks up the details of a whole batch
of events in ONE query (`requests.by_ids`), and only for receivers that have a stream open
here, then hands the same view to every stream of that receiver. So the cost is one query
per batch of NOTIFYs that matter to this process, not one per event per stream.

The feed trusts no payload (SPEC 10.10): any role connected to the database may NOTIFY any
channel. The payload's `receiver_id` only lets a process skip events for receivers with no
stream here; the event goes to the receiver named by the row it reads, and its kind must
agree with the row's status (`cancelled` with a cancelled request, `resolved` with an
answered one), so a forged notice can at most repeat a true event to its true receiver.

A stream subscribes *before* it reads its snapshot, so nothing committed in between is lost;
a `received` event for a request already in the snapshot is dropped (de-duplication by id).
Each stream has a bounded queue: when it is full the stream ends RESOURCE_EXHAUSTED
(STREAM_TOO_SLOW) instead of growing without bound or silently dropping events. A write the
client does not take within `write_timeout` ends the stream the same way. When the listener
connection is lost every stream ends UNAVAILABLE (FEED_UNAVAILABLE): clients reconnect and
get a fresh snapshot. Shutdown ends them UNAVAILABLE (SHUTTING_DOWN).

A user deactivated through AccountService loses their streams on every replica (SPEC 10.6):
the `umbra_users` NOTIFY that drops the caller cache also makes the feed read the user's row
again, and if it is no longer active the user's streams end PERMISSION_DENIED, the answer
their unary calls get from the auth interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar, get_args

from umbra_grpc.domain.errors import (
    CallerInactive,
    DomainError,
    FeedUnavailable,
    ShuttingDown,
    StreamTooSlow,
    TokenExpired,
    TooManyStreams,
)
from umbra_grpc.records import RequestView
from umbra_grpc.storage import requests as store
from umbra_grpc.storage import users
from umbra_grpc.storage.database import Database

_log = logging.getLogger(__name__)
T = TypeVar("T")
EventKind = Literal["received", "cancelled", "resolved"]
_KINDS: frozenset[str] = frozenset(get_args(EventKind))


@dataclasses.dataclass(frozen=True, slots=True)
class RequestEvent:
    """Something happened to a request sent to the watcher."""

    kind: EventKind
    request: RequestView


@dataclasses.dataclass(frozen=True, slots=True)
class Synced:
    """The snapshot is complete."""


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing happened for a quiet interval."""


WatchItem = RequestEvent | Synced | Heartbeat
SYNCED = Synced()
HEARTBEAT = Heartbeat()


@dataclasses.dataclass(frozen=True, slots=True)
class _Notice:
    kind: EventKind
    request_id: int
    # From the payload: a hint for skipping, never who is told.
    receiver_hint: int


def _row_bears_out(kind: EventKind, status: str) -> bool:
    """Whether a request in `status` can be the subject of a `kind` event."""
    if kind == "cancelled":
        return status == "cancelled"
    if kind == "resolved":
        return status not in ("pending", "cancelled")
    return True  # received: the request was sent, whatever became of it since


class Subscription:
    """One stream's place in the feed: a bounded queue and how it ended, if it did."""

    def __init__(self, receiver_id: int, queue_size: int) -> None:
        self.receiver_id = receiver_id
        self._queue: asyncio.Queue[RequestEvent] = asyncio.Queue(maxsize=queue_size)
        self.closed = asyncio.Event()
        self._error: DomainError | None = None

    def push(self, event: RequestEvent) -> None:
        """Queues an event; a full queue ends the stream as too slow."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.close(StreamTooSlow())

    def close(self, error: DomainError) -> None:
        """Ends the stream with `error` (the first reason wins)."""
        if self._error is None:
            self._error = error
            self.closed.set()

    def raise_if_closed(self) -> None:
        """Raises the reason the stream was ended, if it was."""
        if self._error is not None:
            raise self._error

    async def next(self, timeout: float) -> RequestEvent | None:  # noqa: ASYNC109
        """The next event, or None after `timeout` quiet seconds; raises once closed."""
        self.raise_if_closed()
        if not self._queue.empty():
            return self._queue.get_nowait()
        getter = asyncio.ensure_future(self._queue.get())
        closer = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait({getter, closer}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            closer.cancel()
            if not getter.done():
                getter.cancel()
        self.raise_if_closed()
        return getter.result() if getter.done() and not getter.cancelled() else None


class RequestFeed:
    """Fans `umbra_requests` notifications out to this process's streams by receiver."""

    def __init__(
        self,
        db: Database,
        *,
        queue_size: int,
        max_per_user: int,
        max_streams: int,
    ) -> None:
        self._db = db
        self._queue_size = queue_size
        self._max_per_user = max_per_user
        self._max_streams = max_streams
        self._streams: dict[int, set[Subscription]] = {}
        self._count = 0
        self._notices: list[_Notice] = []
        self._flusher: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self.available = False
        self._closing = False

    @property
    def open_streams(self) -> int:
        """Streams open in this process."""
        return self._count

    def subscribe(self, receiver_id: int) -> Subscription:
        """Registers a stream; refused while the feed is down or a limit is reached."""
        if self._closing:
            raise ShuttingDown
        if not self.available:
            raise FeedUnavailable
        mine = self._streams.setdefault(receiver_id, set())
        if len(mine) >= self._max_per_user or self._count >= self._max_streams:
            if not mine:
                del self._streams[receiver_id]
            raise TooManyStreams
        subscription = Subscription(receiver_id, self._queue_size)
        mine.add(subscription)
        self._count += 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Removes a stream (idempotent)."""
        mine = self._streams.get(subscription.receiver_id)
        if mine is None or subscription not in mine:
            return
        mine.discard(subscription)
        self._count -= 1
        if not mine:
            del self._streams[subscription.receiver_id]

    def on_notify(self, payload: str) -> None:
        """A NOTIFY arrived; events for receivers with no stream here are dropped at once."""
        try:
            data = json.loads(payload)
            notice = _Notice(data["kind"], int(data["request_id"]), int(data["receiver_id"]))
            if notice.kind not in _KINDS:
                raise ValueError(notice.kind)
        except (ValueError, KeyError, TypeError):
            _log.warning("ignored a malformed request notification")
            return
        if notice.receiver_hint not in self._streams:
            return
        self._notices.append(notice)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="request-feed-flush")

    def on_user_changed(self, user_id: int) -> None:
        """A user changed (NOTIFY umbra_users): their streams end if they are not active now."""
        if user_id not in self._streams:
            return
        check = asyncio.create_task(self._check_active(user_id), name="request-feed-user-check")
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)

    async def _check_active(self, user_id: int) -> None:
        # The row decides, not the payload that named the user.
        try:
            async with self._db.background() as conn:
                active = await users.is_active(conn, user_id)
        except Exception:
            _log.warning("user check failed; the user's streams end", exc_info=True)
            error: Callable[[], DomainError] = FeedUnavailable
        else:
            if active:
                return
            error = CallerInactive
        for subscription in list(self._streams.get(user_id, ())):
            subscription.close(error())

    def on_up(self) -> None:
        """The listener is connected: streams may open."""
        self.available = True

    def on_down(self) -> None:
        """The listener was lost: every stream ends, since events may have been missed."""
        self.available = False
        self._close_all(FeedUnavailable)

    def shut_down(self) -> None:
        """Ends every stream (server shutdown) and refuses new ones."""
        self._closing = True
        self._close_all(ShuttingDown)

    def _close_all(self, error: Callable[[], DomainError]) -> None:
        for subscriptions in list(self._streams.values()):
            for subscription in list(subscriptions):
                subscription.close(error())

    async def _flush(self) -> None:
        # Events that arrive while a batch is being looked up form the next batch, so order
        # is kept per receiver and one query serves every event of a batch.
        while self._notices:
            batch, self._notices = self._notices, []
            ids = sorted({notice.request_id for notice in batch})
            try:
                async with self._db.background() as conn:
                    addressed = await store.by_ids(conn, ids)
            except Exception:
                _log.exception("request feed lookup failed; streams of this batch end")
                for notice in batch:
                    for subscription in self._streams.get(notice.receiver_hint, ()):
                        subscription.close(FeedUnavailable())
                continue
            found = {item.request.id: item for item in addressed}
            for notice in batch:
                if notice.request_id not in found:
                    continue
                receiver_id, view = found[notice.request_id]
                if _row_bears_out(notice.kind, view.status):
                    for subscription in list(self._streams.get(receiver_id, ())):
                        subscription.push(RequestEvent(notice.kind, view))


class Watching:
    """Opens watch streams: limits, snapshot, de-duplication, heartbeats, token expiry."""

    def __init__(
        self,
        db: Database,
        feed: RequestFeed,
        *,
        heartbeat: float,
        write_timeout: float,
        ttl: dt.timedelta,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._feed = feed
        self._heartbeat = heartbeat
        self._write_timeout = write_timeout
        self._ttl = ttl
        self._clock = clock

    @contextlib.asynccontextmanager
    async def open(self, caller: int) -> AsyncIterator[Stream]:
        """Subscribes (limits checked) and unsubscribes when the stream ends, however."""
        subscription = self._feed.subscribe(caller)
        try:
            yield Stream(
                self._db,
                caller,
                subscription,
                heartbeat=self._heartbeat,
                write_timeout=self._write_timeout,
                ttl=self._ttl,
                clock=self._clock,
            )
        finally:
            self._feed.unsubscribe(subscription)


class Stream:
    """One open watch stream."""

    def __init__(
        self,
        db: Database,
        caller: int,
        subscription: Subscription,
        *,
        heartbeat: float,
        write_timeout: float,
        ttl: dt.timedelta,
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        self._caller = caller
        self._subscription = subscription
        self._heartbeat = heartbeat
        self._write_timeout = write_timeout
        self._ttl = ttl
        self._clock = clock

    async def items(self, expires_at: float) -> AsyncIterator[WatchItem]:
        """Snapshot (oldest first; expired requests left out), `synced`, then live events
        and heartbeats."""
        views = await self._db.read(
            lambda conn: store.pending_for_receiver(conn, caller=self._caller, ttl=self._ttl)
        )
        in_snapshot: set[int] = set()
        for view in views:
            in_snapshot.add(view.id)
            yield RequestEvent("received", view)
        yield SYNCED
        while True:
            remaining = expires_at - self._clock()
            if remaining <= 0:
                raise TokenExpired
            event = await self._subscription.next(min(self._heartbeat, remaining))
            if event is None:
                if self._clock() >= expires_at:
                    raise TokenExpired
                yield HEARTBEAT
            elif not (event.kind == "received" and event.request.id in in_snapshot):
                yield event

    async def send(self, write: Callable[[T], Awaitable[Any]], message: T) -> None:
        """Writes one message; a client that does not take it in time ends the stream."""
        writing = asyncio.ensure_future(write(message))
        closing = asyncio.ensure_future(self._subscription.closed.wait())
        try:
            await asyncio.wait(
                {writing, closing},
                timeout=self._write_timeout,
                return_when="FIRST_COMPLETED",
            )
        finally:
            closing.cancel()
            _let_go(writing)
        if writing.done():
            writing.result()
            self._subscription.raise_if_closed()
            return
        self._subscription.raise_if_closed()
        raise StreamTooSlow


def _let_go(writing: asyncio.Future[Any]) -> None:
    """Cancels the write if it is still going, and takes its outcome whenever it comes.

    A write can be left behind: the stream closed, the client was too slow, or the handler
    itself was cancelled because the client left (then even a write that already failed is
    never looked at). grpc fails such a write (the call is gone), which is expected: taken
    here, asyncio does not log "Task exception was never retrieved" at ERROR for every client
    that hangs up mid-write.
    """
    if not writing.done():
        writing.cancel()
    writing.add_done_callback(lambda done: done.cancelled() or done.exception())
