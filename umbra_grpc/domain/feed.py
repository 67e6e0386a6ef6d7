"""The request feed: one per process, it fans `umbra_requests` NOTIFYs out to the watch
streams open here, by receiver.

It receives every `umbra_requests` NOTIFY from the process's single listener connection
(the payload contract: `umbra_grpc.storage.notify`). Payloads carry ids only; the feed looks
up the details of a whole batch of events in ONE query (`requests.by_ids`), and only for
receivers that have a stream open here, then hands the same view to every stream of that
receiver. So the cost is one query per batch of NOTIFYs that matter to this process, not
one per event per stream.

The feed trusts no payload (SPEC 10.10): any role connected to the database may NOTIFY any
channel. The payload's `receiver_id` only lets a process skip events for receivers with no
stream here; the event goes to the receiver named by the row it reads, and its kind must
agree with the row's status (`cancelled` with a cancelled request, `resolved` with an
answered one), so a forged notice can at most repeat a true event to its true receiver.

Each stream has a bounded queue (`Subscription`): when it is full the stream ends
RESOURCE_EXHAUSTED (STREAM_TOO_SLOW) instead of growing without bound or silently dropping
events. When the listener connection is lost every stream ends UNAVAILABLE
(FEED_UNAVAILABLE); shutdown ends them UNAVAILABLE (SHUTTING_DOWN). A user deactivated
through AccountService loses their streams on every replica (SPEC 10.6): the `umbra_users`
NOTIFY makes the feed read the user's row again, and if it is no longer active the user's
streams end PERMISSION_DENIED. What a stream does with its events is `domain.watch`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from umbra_grpc.domain.errors import (
    CallerInactive,
    DomainError,
    FeedUnavailable,
    ShuttingDown,
    StreamTooSlow,
    TooManyStreams,
)
from umbra_grpc.records import RequestView
from umbra_grpc.storage import requests as store
from umbra_grpc.storage import users
from umbra_grpc.storage.database import Database
from umbra_grpc.storage.notify import EventKind, RequestNotice, parse_request_notice

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class RequestEvent:
    """Something happened to a request sent to the watcher."""

    kind: EventKind
    request: RequestView


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
        self._notices: list[RequestNotice] = []
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
        notice = parse_request_notice(payload)
        if notice is None:
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
