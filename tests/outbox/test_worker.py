"""Bare workers (no gRPC server) on a fresh database: leases, fencing, skips, stop, contention."""

from __future__ import annotations

import logging
import time
from collections import Counter

import asyncpg
import pytest

from tests.outbox.recorder import HOLD, NtfyRecorder
from tests.outbox.support import add_pushes, add_user, config, wait_settled
from tests.support import Sql, until
from umbra_grpc.embedded import free_port
from umbra_grpc.outbox.worker import OutboxWorker
from umbra_grpc.storage import outbox
from umbra_grpc.storage.database import Conn, Database, StatementCounter

pytestmark = pytest.mark.asyncio(loop_scope="session")


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

    # The worker claims in autocommit; open transactions hold the claims' locks here.
    first = await asyncpg.connect(database_url)
    second = await asyncpg.connect(database_url)
    try:
        async with first.transaction(), second.transaction():
            mine = (await outbox.claim(Conn(first, None), limit=2, lease=60.0)).pushes
            # `first` has not committed: its rows are locked, so `second` gets the others.
            theirs = (await outbox.claim(Conn(second, None), limit=10, lease=60.0)).pushes
    finally:
        await first.close()
        await second.close()
    assert sorted(p.id for p in mine + theirs) == ids
    assert {p.attempt for p in mine + theirs} == {1}
    async with db.background() as conn:
        assert (await outbox.claim(conn, limit=10, lease=60.0)).size == 0  # all leased

    # The lease of one row runs out and another worker claims it again.
    await sql.rows("UPDATE outbox SET next_attempt_at = now() WHERE id = $1", ids[0])
    async with db.background() as conn:
        [again] = (await outbox.claim(conn, limit=10, lease=60.0)).pushes
    assert (again.id, again.attempt) == (ids[0], 2)
    async with db.background() as conn:
        stale = await outbox.complete(conn, push_id=ids[0], attempt=1, outcome="sent", note=None)
        stale_retry = await outbox.reschedule(
            conn, push_id=ids[0], attempt=1, delay=0.0, error="late"
        )
        current = await outbox.complete(conn, push_id=ids[0], attempt=2, outcome="sent", note=None)
    assert (stale, stale_retry, current) == (False, False, True)
    assert await worker.backlog() == 3
    await sql.rows(
        "UPDATE outbox SET status = 'failed', completed_at = now() WHERE status = 'pending'"
    )


async def test_switched_off_rows_are_skipped_by_the_claim_without_sending(
    database_url: str, db: Database, recorder: NtfyRecorder, sql: Sql
) -> None:
    reasons = {
        await add_user(sql, recorder, ntfy_enabled=False): "skipped: ntfy off",
        await add_user(
            sql, recorder, ntfy_connections_enabled=False
        ): "skipped: connection pushes off",
        await add_user(sql, recorder, ntfy_topic=None): "skipped: no ntfy server or topic",
        await add_user(sql, recorder, ntfy_topic=""): "skipped: no ntfy server or topic",
        await add_user(sql, recorder, ntfy_server_url=None): "skipped: no ntfy server or topic",
        await add_user(sql, recorder, settings=False): "skipped: ntfy off",
    }
    on = await add_user(sql, recorder)
    for user in [*reasons, on]:
        await add_pushes(sql, user)
    requests_before = len(recorder.received)
    worker = OutboxWorker(db, config(database_url))
    await worker.start()
    try:
        worker.wake()
        await recorder.wait_for(f"t{on}", 1)
        await wait_settled(sql)
    finally:
        await worker.stop()
    rows = await sql.rows("SELECT * FROM outbox WHERE user_id = ANY($1::bigint[])", [*reasons, on])
    outcomes = {row["user_id"]: (row["status"], row["last_error"], row["attempts"]) for row in rows}
    assert outcomes == {
        **{user: ("skipped", reason, 1) for user, reason in reasons.items()},
        on: ("sent", None, 1),
    }
    assert all(row["completed_at"] is not None for row in rows)
    assert len(recorder.received) - requests_before == 1  # the one row to send, nothing else
    assert len(recorder.for_topic(f"t{on}")) == 1
    assert (worker.stats.sent, worker.stats.skipped, worker.stats.failed) == (1, len(reasons), 0)


async def test_a_round_is_one_statement_per_sent_row_plus_two(
    database_url: str, recorder: NtfyRecorder, sql: Sql
) -> None:
    """Claim (skips included), one outcome write per sent row, the idle query: no BEGIN/COMMIT."""
    database = Database.connect(config(database_url))
    counter = StatementCounter(background=True)
    counter.attach(database)

    async def round_done(within: float = 5.0) -> list[str]:
        """What the worker sent up to the idle query that ends its round."""
        await until(
            lambda: any("min(next_attempt_at)" in s for s in counter.statements),
            within=within,
            what=lambda: counter.statements,
            every=0.01,
        )
        return [
            "claim" if "SKIP LOCKED" in s else "idle" if "min(next_attempt_at)" in s else s
            for s in counter.statements
        ]

    on, off = await add_user(sql, recorder), await add_user(sql, recorder, ntfy_enabled=False)
    worker = OutboxWorker(database, config(database_url))
    await worker.start()
    try:
        assert await round_done() == ["claim", "idle"]  # nothing due
        counter.reset()
        # One commit, so that one round takes every row whenever it starts.
        await sql.rows(
            "INSERT INTO outbox (user_id, kind, display_name) "
            "SELECT unnest($1::bigint[]), 'request_received', 'x'",
            [off, off, off, on, on],
        )
        worker.wake()
        statements = await round_done()
    finally:
        await worker.stop()
        await database.dispose()
    assert statements[0] == "claim"
    assert statements[-1] == "idle"
    assert len(statements) == 4
    assert all(s.lstrip().startswith("UPDATE outbox") for s in statements[1:-1])
    assert (worker.stats.sent, worker.stats.skipped) == (2, 3)


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
    finally:  # stopping lets sends in flight finish: a late duplicate is counted below
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

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("outbox round failed")]

    await worker.start()

    def failed_twice() -> bool:  # the loop goes on after the first failure
        if len(failures()) >= 2:
            return True
        worker.wake()
        return False

    try:
        await until(failed_twice, within=10, what=failures, every=0.05)
    finally:
        await worker.stop()
        await database.dispose()
