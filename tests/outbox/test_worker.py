"""Bare workers (no gRPC server) on a fresh database: leases, fencing, stop, contention."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.conftest import Sql, test_config
from tests.outbox.recorder import HOLD, NtfyRecorder
from umbra_grpc.config import Config
from umbra_grpc.embedded import free_port
from umbra_grpc.outbox.worker import OutboxWorker
from umbra_grpc.storage import outbox
from umbra_grpc.storage.database import Database

pytestmark = pytest.mark.asyncio(loop_scope="session")
user_ids = itertools.count(1)


def config(database_url: str, **changes: object) -> Config:
    return test_config(
        database_url,
        outbox_retry_base_seconds=0.05,
        outbox_retry_cap_seconds=0.2,
        outbox_poll_seconds=30.0,
        ntfy_timeout_seconds=1.0,
        **changes,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database.connect(config(database_url))
    try:
        yield database
    finally:
        await database.dispose()


async def add_user(sql: Sql, recorder: NtfyRecorder, *, enabled: bool = True) -> int:
    """A user whose pushes go to topic `t<id>` on the recorder."""
    user_id = next(user_ids)
    await sql.rows("INSERT INTO users (id, umbral_name) VALUES ($1, $2)", user_id, f"user{user_id}")
    await sql.rows(
        "INSERT INTO settings (user_id, ntfy_enabled, ntfy_server_url, ntfy_topic) "
        "VALUES ($1, $2, $3, $4)",
        user_id,
        enabled,
        recorder.url,
        f"t{user_id}",
    )
    return user_id


async def add_pushes(
    sql: Sql, user_id: int, count: int = 1, kind: str = "request_received"
) -> list[int]:
    rows = await sql.rows(
        "INSERT INTO outbox (user_id, kind, display_name) "
        "SELECT $1, $2, 'sender ' || n FROM generate_series(1, $3) AS n RETURNING id",
        user_id,
        kind,
        count,
    )
    return [row["id"] for row in rows]


async def wait_settled(sql: Sql, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while await sql.value("SELECT count(*) FROM outbox WHERE status = 'pending'"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_stop_is_bounded_and_a_later_worker_delivers_after_the_lease(
    database_url: str, db: Database, recorder: NtfyRecorder, sql: Sql
) -> None:
    user = await add_user(sql, recorder)
    recorder.script(f"t{user}", HOLD)
    first = OutboxWorker(db, config(database_url), lease_seconds=0.5)
    await first.start()
    await add_pushes(sql, user)
    first.wake()
    [held] = await recorder.wait_for(f"t{user}", 1)
    started = time.monotonic()
    await first.stop()
    assert time.monotonic() - started < 3.0
    [row] = await sql.rows("SELECT * FROM outbox WHERE user_id = $1", user)
    assert (row["status"], row["attempts"]) == ("pending", 1)

    second = OutboxWorker(db, config(database_url))
    await second.start()
    try:
        _, resent = await recorder.wait_for(f"t{user}", 2)
        await wait_settled(sql)
    finally:
        await second.stop()
    assert resent.at - held.at >= 0.45  # not before the lease ran out
    [row] = await sql.rows("SELECT * FROM outbox WHERE user_id = $1", user)
    assert (row["status"], row["attempts"]) == ("sent", 2)
    assert second.stats.sent == 1


async def test_claims_skip_locked_rows_and_leases_fence_late_writers(
    database_url: str, db: Database, recorder: NtfyRecorder, sql: Sql
) -> None:
    user = await add_user(sql, recorder)
    ids = await add_pushes(sql, user, 4)
    worker = OutboxWorker(db, config(database_url))  # never started: backlog() only
    assert await worker.backlog() == 4

    async with db.background() as first, db.background() as second:
        mine = await outbox.claim(first, limit=2, lease=60.0)
        # `first` has not committed: its rows are locked, so `second` gets the others.
        theirs = await outbox.claim(second, limit=10, lease=60.0)
        await first.commit()
        await second.commit()
    assert sorted(p.id for p in mine + theirs) == ids
    assert {p.attempt for p in mine + theirs} == {1}
    async with db.background() as conn:
        assert await outbox.claim(conn, limit=10, lease=60.0) == []  # all leased
        await conn.commit()

    # The lease of one row runs out and another worker claims it again.
    await sql.rows("UPDATE outbox SET next_attempt_at = now() WHERE id = $1", ids[0])
    async with db.background() as conn:
        [again] = await outbox.claim(conn, limit=10, lease=60.0)
        await conn.commit()
    assert (again.id, again.attempt) == (ids[0], 2)
    async with db.background() as conn:
        stale = await outbox.complete(conn, push_id=ids[0], attempt=1, outcome="sent", note=None)
        stale_retry = await outbox.reschedule(
            conn, push_id=ids[0], attempt=1, delay=0.0, error="late"
        )
        current = await outbox.complete(conn, push_id=ids[0], attempt=2, outcome="sent", note=None)
        await conn.commit()
    assert (stale, stale_retry, current) == (False, False, True)
    assert await worker.backlog() == 3
    await sql.rows(
        "UPDATE outbox SET status = 'failed', completed_at = now() WHERE status = 'pending'"
    )


async def test_unknown_kind_is_dead_lettered_without_sending(
    database_url: str, db: Database, recorder: NtfyRecorder, sql: Sql
) -> None:
    user = await add_user(sql, recorder)
    await add_pushes(sql, user, kind="mystery")
    worker = OutboxWorker(db, config(database_url))
    await worker.start()
    try:
        worker.wake()
        await wait_settled(sql)
    finally:
        await worker.stop()
    [row] = await sql.rows("SELECT * FROM outbox WHERE user_id = $1", user)
    assert row["status"] == "failed"
    assert row["last_error"] == "unknown kind 'mystery'"
    assert recorder.for_topic(f"t{user}") == []
    assert worker.stats.failed == 1


async def test_two_workers_small_batches_deliver_each_row_once(
    database_url: str, db: Database, recorder: NtfyRecorder, sql: Sql
) -> None:
    user = await add_user(sql, recorder)
    workers = [OutboxWorker(db, config(database_url, outbox_batch_size=3)) for _ in range(2)]
    for worker in workers:
        await worker.start()
    try:
        await add_pushes(sql, user, 60)
        for worker in workers:
            worker.wake()
        await recorder.wait_for(f"t{user}", 60)
        await wait_settled(sql)
        await asyncio.sleep(0.2)
    finally:
        for worker in workers:
            await worker.stop()
    bodies = Counter(request.body for request in recorder.for_topic(f"t{user}"))
    assert len(bodies) == 60
    assert set(bodies.values()) == {1}
    assert sum(worker.stats.sent for worker in workers) == 60
    assert all(worker.stats.sent > 0 for worker in workers)


async def test_worker_survives_an_unreachable_database(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    broken = config(database_url).with_changes(
        database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        db_pool_timeout_seconds=0.2,
    )
    database = Database.connect(broken)
    worker = OutboxWorker(database, broken)
    await worker.start()
    try:
        for _ in range(3):
            worker.wake()
            await asyncio.sleep(0.1)
    finally:
        await worker.stop()
        await database.dispose()
    failures = [r for r in caplog.records if r.getMessage().startswith("outbox round failed")]
    assert len(failures) >= 2  # the loop went on after the first failure
