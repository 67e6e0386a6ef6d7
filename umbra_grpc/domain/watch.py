"""WatchIncomingRequests: a snapshot, `synced`, then live events from the request feed.

Events come from the process's `RequestFeed` (`domain.feed`, which also says what a
notification is trusted for). A stream subscribes *before* it reads its snapshot, so
nothing committed in between is lost; a `received` event for a request already in the
snapshot is dropped (de-duplication by id). A write the client does not take within
`write_timeout` ends the stream RESOURCE_EXHAUSTED (STREAM_TOO_SLOW), as a full queue does;
quiet intervals send heartbeats; the stream ends when the caller's token expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from umbra_grpc.domain.errors import (
    StreamTooSlow,
    TokenExpired,
)
from umbra_grpc.domain.feed import RequestEvent, RequestFeed, Subscription
from umbra_grpc.storage import requests as store
from umbra_grpc.storage.database import Database

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Synced:
    """The snapshot is complete."""


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing happened for a quiet interval."""


WatchItem = RequestEvent | Synced | Heartbeat
SYNCED = Synced()
HEARTBEAT = Heartbeat()


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

    async def items(self, expires_at: float) -> AsyncGenerator[WatchItem, None]:
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
