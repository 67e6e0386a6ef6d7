"""RequestFeed, Subscription and Stream without a server (SPEC 5).

A fake database stands in for PostgreSQL: the feed and the stream only call `db.read(work)`
(the snapshot) and `db.background()` (the batch lookup), and the storage functions they use
only call `conn.execute(statement, params).all()`. The fake records every lookup, so the
tests can count queries, and can hold a lookup open to see what forms the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from umbra_grpc.domain.errors import (
    FeedUnavailable,
    ShuttingDown,
    StreamTooSlow,
    TokenExpired,
    TooManyStreams,
)
from umbra_grpc.domain.feed import RequestEvent, RequestFeed, Subscription
from umbra_grpc.domain.watch import HEARTBEAT, SYNCED, Stream, Watching, WatchItem

pytestmark = pytest.mark.asyncio(loop_scope="session")
ME, OTHER, NOBODY = 7, 8, 9
WAIT = 2.0  # seconds; every wait below ends far sooner when the code is right


Row = dict[str, Any]


def row(request_id: int, receiver: int = ME, status: str = "pending") -> Row:
    """A row with what storage.requests reads into a RequestView (and the receiver)."""
    return {
        "id": request_id,
        "receiver_id": receiver,
        "status": status,
        "sender_name": f"sender{request_id}",
        "sender_preferred": None,
        "receiver_name": f"user{receiver}",
        "receiver_preferred": None,
        "created_at": dt.datetime(2025, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=request_id),
        "resolved_at": None,
        "message": None,
    }


class _Connection:
    def __init__(self, db: FakeDatabase) -> None:
        self._db = db

    async def fetch(self, query: Any, **params: Any) -> list[Row]:
        if "ids" in params:  # storage.requests.by_ids: the feed's batch lookup
            ids = list(params["ids"])
            self._db.lookups.append(ids)
            await self._db.gate.wait()
            return [self._db.rows[i] for i in ids if i in self._db.rows]
        # storage.requests.pending_for_receiver: a stream's snapshot
        self._db.snapshots += 1
        caller = params["caller"]
        pending = [
            r
            for r in self._db.rows.values()
            if r["receiver_id"] == caller and r["status"] == "pending"
        ]
        return sorted(pending, key=lambda r: r["created_at"])


class FakeDatabase:
    """What RequestFeed and Stream use of `Database`: `read` and `background`."""

    def __init__(self, *rows: Row) -> None:
        self.rows = {r["id"]: r for r in rows}
        self.lookups: list[list[int]] = []
        self.snapshots = 0
        self.gate = asyncio.Event()  # lookups wait on it; open unless a test closes it
        self.gate.set()
        # Runs inside `read`, before the snapshot is taken: a commit racing the stream.
        self.before_snapshot: Callable[[], None] | None = None

    async def read(self, work: Callable[[_Connection], Awaitable[Any]]) -> Any:
        if self.before_snapshot is not None:
            self.before_snapshot()
        return await work(_Connection(self))

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[_Connection]:
        yield _Connection(self)


def payload(kind: str, request_id: int, receiver: int = ME) -> str:
    return json.dumps({"kind": kind, "request_id": request_id, "receiver_id": receiver})


def make_feed(
    db: FakeDatabase, *, queue_size: int = 64, max_per_user: int = 5, max_streams: int = 100
) -> RequestFeed:
    feed = RequestFeed(
        db,  # type: ignore[arg-type]  # a fake of what RequestFeed uses of Database
        queue_size=queue_size,
        max_per_user=max_per_user,
        max_streams=max_streams,
    )
    feed.on_up()
    return feed


def make_watching(db: FakeDatabase, feed: RequestFeed, *, heartbeat: float = 0.1) -> Watching:
    return Watching(
        db,  # type: ignore[arg-type]  # a fake of the two methods Watching uses of Database
        feed,
        heartbeat=heartbeat,
        write_timeout=WAIT,
        ttl=dt.timedelta(days=30),
    )


async def settle() -> None:
    """Lets every task the feed started run to its end (the fake never really waits)."""
    for _ in range(20):
        await asyncio.sleep(0)


def summary(item: WatchItem) -> tuple[str, int] | str:
    if isinstance(item, RequestEvent):
        return (item.kind, item.request.id)
    return "synced" if item is SYNCED else "heartbeat"


async def take_until_heartbeat(items: AsyncIterator[WatchItem]) -> list[tuple[str, int] | str]:
    """Every item up to and including the first heartbeat (nothing more was queued)."""
    taken: list[tuple[str, int] | str] = []
    async with asyncio.timeout(WAIT):
        async for item in items:
            taken.append(summary(item))
            if item is HEARTBEAT:
                return taken
    raise AssertionError(f"the stream ended: {taken}")


# --- de-duplication at the seam -----------------------------------------------------------


async def test_a_received_event_for_a_snapshot_request_is_not_sent_twice() -> None:
    db = FakeDatabase(row(1))
    feed = make_feed(db)
    # Request 1 committed after the stream subscribed and before it read its snapshot: its
    # event is queued AND it is in the snapshot. Request 2 committed after the snapshot.
    db.before_snapshot = lambda: feed.on_notify(payload("received", 1))
    async with (
        make_watching(db, feed).open(ME) as stream,
        contextlib.aclosing(stream.items(time.time() + 60)) as items,
    ):
        first = await anext(items)
        assert summary(first) == ("received", 1)
        db.rows[2] = row(2)
        feed.on_notify(payload("received", 2))
        # A cancel of a snapshot request is news, not a duplicate.
        db.rows[1] = row(1, status="cancelled")
        feed.on_notify(payload("cancelled", 1))
        rest = await take_until_heartbeat(items)
    assert rest == ["synced", ("received", 2), ("cancelled", 1), "heartbeat"]
    assert db.snapshots == 1


# --- fan-out and batching -------------------------------------------------------------------


async def test_events_for_receivers_without_a_stream_are_dropped_without_a_lookup() -> None:
    db = FakeDatabase(row(1, receiver=NOBODY), row(2))
    feed = make_feed(db)
    mine = feed.subscribe(ME)
    feed.on_notify(payload("received", 1, receiver=NOBODY))
    await settle()
    assert db.lookups == []
    feed.on_notify(payload("received", 2))
    event = await mine.next(WAIT)
    assert event is not None
    assert (event.kind, event.request.id) == ("received", 2)
    assert db.lookups == [[2]]  # only the id of a receiver with a stream here


async def test_one_lookup_serves_a_whole_batch_and_every_stream_of_a_receiver() -> None:
    db = FakeDatabase(*(row(n, receiver=ME if n % 2 else OTHER) for n in range(1, 9)))
    db.rows[3] = row(3, status="accepted")
    feed = make_feed(db)
    mine = [feed.subscribe(ME), feed.subscribe(ME)]
    theirs = feed.subscribe(OTHER)
    db.gate.clear()  # the first lookup is held open
    for n in (1, 2, 3, 4):
        feed.on_notify(payload("received", n, receiver=ME if n % 2 else OTHER))
    feed.on_notify(payload("resolved", 3))  # the same request twice in one batch
    feed.on_notify(payload("received", 99, receiver=NOBODY))
    await settle()
    assert db.lookups == [[1, 2, 3, 4]]
    # Notifications that arrive during a lookup form the next batch: one more query.
    for n in (5, 6, 7, 8):
        feed.on_notify(payload("received", n, receiver=ME if n % 2 else OTHER))
    db.gate.set()
    expected_mine = [("received", 1), ("received", 3), ("resolved", 3)]
    expected_mine += [("received", 5), ("received", 7)]
    received = [[await sub.next(WAIT) for _ in expected_mine] for sub in mine]
    for got in received:
        assert [(e.kind, e.request.id) for e in got if e] == expected_mine
    # Both streams of one receiver were handed the very same view: it was looked up once.
    assert all(a and b and a.request is b.request for a, b in zip(*received, strict=True))
    got = [await theirs.next(WAIT) for _ in range(4)]
    assert [e.request.id for e in got if e] == [2, 4, 6, 8]
    assert db.lookups == [[1, 2, 3, 4], [5, 6, 7, 8]]


async def test_the_row_names_the_receiver_and_bears_out_the_kind() -> None:
    """Forged payloads (SPEC 10.10): wrong receiver, or a kind the row's status denies."""
    db = FakeDatabase(row(1, receiver=OTHER), row(2), row(3, status="accepted"))
    feed = make_feed(db)
    mine, theirs = feed.subscribe(ME), feed.subscribe(OTHER)
    feed.on_notify(payload("received", 1, receiver=ME))  # OTHER's request, "for" ME
    feed.on_notify(payload("cancelled", 2))  # still pending
    feed.on_notify(payload("resolved", 2))
    feed.on_notify(payload("cancelled", 3))  # accepted, not cancelled
    feed.on_notify(payload("resolved", 3))  # true
    event = await mine.next(WAIT)
    assert event is not None
    assert (event.kind, event.request.id) == ("resolved", 3)
    assert await mine.next(0.05) is None
    # The request went to its true receiver (a repeat of a true event, nothing more).
    event = await theirs.next(WAIT)
    assert event is not None
    assert (event.kind, event.request.id) == ("received", 1)


async def test_an_event_whose_request_is_gone_is_skipped() -> None:
    db = FakeDatabase(row(2))
    feed = make_feed(db)
    mine = feed.subscribe(ME)
    feed.on_notify(payload("received", 1))  # no such row any more
    feed.on_notify(payload("received", 2))
    event = await mine.next(WAIT)
    assert event is not None
    assert event.request.id == 2
    assert await mine.next(0.05) is None


# --- backpressure ---------------------------------------------------------------------------


async def test_a_full_queue_closes_the_subscription_as_too_slow() -> None:
    db = FakeDatabase(row(1), row(2), row(3), row(4, receiver=OTHER))
    feed = make_feed(db, queue_size=2)
    slow, other = feed.subscribe(ME), feed.subscribe(OTHER)
    for n in (1, 2, 3):
        feed.on_notify(payload("received", n))
    feed.on_notify(payload("received", 4, receiver=OTHER))
    await settle()
    assert slow.closed.is_set()
    with pytest.raises(StreamTooSlow):
        await slow.next(WAIT)
    # The other receiver's stream carries on.
    event = await other.next(WAIT)
    assert event is not None
    assert event.request.id == 4
    assert not other.closed.is_set()


async def test_the_first_reason_to_close_wins() -> None:
    subscription = Subscription(ME, queue_size=1)
    subscription.close(StreamTooSlow())
    subscription.close(FeedUnavailable())
    with pytest.raises(StreamTooSlow):
        subscription.raise_if_closed()


# --- the feed going down, and shutdown ------------------------------------------------------


async def test_on_down_ends_every_stream_and_refuses_new_ones_until_on_up() -> None:
    db = FakeDatabase()
    feed = make_feed(db)
    subscriptions = [feed.subscribe(ME), feed.subscribe(ME), feed.subscribe(OTHER)]
    # A stream waiting for its next event wakes at once, not after its heartbeat interval.
    waiting = asyncio.ensure_future(subscriptions[0].next(60))
    await settle()
    feed.on_down()
    with pytest.raises(FeedUnavailable):
        await asyncio.wait_for(waiting, WAIT)
    for subscription in subscriptions:
        with pytest.raises(FeedUnavailable):
            subscription.raise_if_closed()
    with pytest.raises(FeedUnavailable):
        feed.subscribe(NOBODY)
    feed.on_up()
    fresh = feed.subscribe(NOBODY)
    assert not fresh.closed.is_set()


async def test_a_feed_never_up_refuses_streams() -> None:
    feed = RequestFeed(
        FakeDatabase(),  # type: ignore[arg-type]  # a fake of what RequestFeed uses of Database
        queue_size=4,
        max_per_user=5,
        max_streams=10,
    )
    with pytest.raises(FeedUnavailable):
        feed.subscribe(ME)


async def test_shut_down_ends_every_stream_and_refuses_new_ones() -> None:
    db = FakeDatabase()
    feed = make_feed(db)
    subscriptions = [feed.subscribe(ME), feed.subscribe(OTHER)]
    feed.shut_down()
    for subscription in subscriptions:
        with pytest.raises(ShuttingDown):
            await subscription.next(WAIT)
    with pytest.raises(ShuttingDown):
        feed.subscribe(NOBODY)
    feed.on_up()  # a reconnect during shutdown does not reopen the feed
    with pytest.raises(ShuttingDown):
        feed.subscribe(NOBODY)


async def test_a_stream_iterating_when_the_feed_goes_down_ends_unavailable() -> None:
    db = FakeDatabase(row(1))
    feed = make_feed(db)
    async with (
        make_watching(db, feed, heartbeat=60).open(ME) as stream,
        contextlib.aclosing(stream.items(time.time() + 60)) as items,
    ):
        assert [summary(await anext(items)) for _ in range(2)] == [("received", 1), "synced"]
        later = asyncio.ensure_future(anext(items))
        await settle()
        feed.on_down()
        with pytest.raises(FeedUnavailable):
            await asyncio.wait_for(later, WAIT)
    assert feed.open_streams == 0


# --- limits ---------------------------------------------------------------------------------


async def test_per_user_and_per_process_limits_and_unsubscribe_frees_the_place() -> None:
    db = FakeDatabase(row(1, receiver=NOBODY))
    feed = make_feed(db, max_per_user=2, max_streams=3)
    a, b = feed.subscribe(ME), feed.subscribe(ME)
    with pytest.raises(TooManyStreams):
        feed.subscribe(ME)  # per user
    c = feed.subscribe(OTHER)
    assert feed.open_streams == 3
    with pytest.raises(TooManyStreams):
        feed.subscribe(NOBODY)  # per process
    # The refused receiver left nothing behind: its events are still dropped unread.
    feed.on_notify(payload("received", 1, receiver=NOBODY))
    await settle()
    assert db.lookups == []

    feed.unsubscribe(a)
    feed.unsubscribe(a)  # idempotent: frees one place, not two
    assert feed.open_streams == 2
    again = feed.subscribe(ME)
    with pytest.raises(TooManyStreams):
        feed.subscribe(ME)
    with pytest.raises(TooManyStreams):
        feed.subscribe(NOBODY)
    for subscription in (b, c, again):
        feed.unsubscribe(subscription)
    assert feed.open_streams == 0
    feed.subscribe(NOBODY)


async def test_watching_open_frees_the_place_however_the_stream_ends() -> None:
    db = FakeDatabase()
    feed = make_feed(db, max_per_user=1)
    watching = make_watching(db, feed)

    async def failing_handler() -> None:
        async with watching.open(ME):
            assert feed.open_streams == 1
            with pytest.raises(TooManyStreams):
                await watching.open(ME).__aenter__()
            raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError, match="the handler failed"):
        await failing_handler()
    assert feed.open_streams == 0
    async with watching.open(ME) as stream:
        assert isinstance(stream, Stream)


async def test_an_expired_token_ends_the_stream() -> None:
    db = FakeDatabase()
    feed = make_feed(db)
    async with (
        make_watching(db, feed, heartbeat=60).open(ME) as stream,
        contextlib.aclosing(stream.items(time.time() + 0.2)) as items,
    ):
        assert await anext(items) is SYNCED
        started = time.monotonic()
        with pytest.raises(TokenExpired):
            await asyncio.wait_for(anext(items), WAIT)
        # Ended at expiry, not after the 60 s heartbeat interval.
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("write_fails_first", [False, True])
async def test_a_write_left_behind_when_the_client_hangs_up_is_not_reported_unretrieved(
    write_fails_first: bool,
) -> None:
    # The fuzzer saw asyncio log "Task exception was never retrieved" at ERROR: the handler
    # was cancelled (the client hung up) while a write was in flight, and grpc failed that
    # write, before or after the cancellation reached the handler. grpc's write does not stop
    # when cancelled; this one fails once released.
    released = asyncio.Event()

    async def write(message: WatchItem) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await released.wait()
        raise RuntimeError("execute_batch failed: the call is gone")

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        db = FakeDatabase()
        async with make_watching(db, make_feed(db)).open(ME) as stream:
            handler = asyncio.create_task(stream.send(write, SYNCED))
            await settle()
            if write_fails_first:
                released.set()  # the write fails in the same turn the handler is cancelled
            handler.cancel()
            with pytest.raises(asyncio.CancelledError):
                await handler
        released.set()
        await settle()
        del handler
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert [context["message"] for context in reported] == []


# --- malformed payloads ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not json",
        "null",
        "[]",
        "42",
        '"received"',
        "{}",
        '{"kind": "received", "request_id": 1}',
        '{"kind": "received", "receiver_id": 7}',
        '{"request_id": 1, "receiver_id": 7}',
        '{"kind": "received", "request_id": "one", "receiver_id": 7}',
        '{"kind": "received", "request_id": null, "receiver_id": 7}',
        '{"kind": "received", "request_id": 1, "receiver_id": [7]}',
        '{"kind": "exploded", "request_id": 1, "receiver_id": 7}',
        '{"kind": null, "request_id": 1, "receiver_id": 7}',
    ],
)
async def test_malformed_payloads_are_ignored(bad: str, caplog: pytest.LogCaptureFixture) -> None:
    db = FakeDatabase(row(1))
    feed = make_feed(db)
    mine = feed.subscribe(ME)
    feed.on_notify(bad)  # neither raises nor disturbs the feed
    await settle()
    assert db.lookups == []
    assert not mine.closed.is_set()
    assert "malformed" in caplog.text
    feed.on_notify(payload("received", 1))
    event = await mine.next(WAIT)
    assert event is not None
    assert event.request.id == 1
