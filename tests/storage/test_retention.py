"""The retention job (SPEC 10.9): rows aged by SQL, pruned for real, and what must stay stays.

Each test module's database is its own, so counts are exact. Batches are observed from the
database's side: a statement-level trigger records how many rows each DELETE took.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from tests.support import start_server, stop_server, test_config, until
from umbra_grpc.domain.retention import Retention, RetentionPolicy
from umbra_grpc.embedded import free_port
from umbra_grpc.storage import retention as store
from umbra_grpc.storage.database import Database

on_session_loop = pytest.mark.asyncio(loop_scope="session")
SENDER, RECEIVER = 8001, 8002
TABLES = ("outbox", "notifications", "connection_requests", "audit_log")


@pytest_asyncio.fixture(loop_scope="session")
async def conn(database_url: str, batches_log: None) -> AsyncIterator[asyncpg.Connection]:
    """A clean slate: two users, nothing in the pruned tables, nothing logged."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO users (id, umbral_name) VALUES ($1, 'keeper-a'), ($2, 'keeper-b')"
            " ON CONFLICT DO NOTHING",
            SENDER,
            RECEIVER,
        )
        for table in TABLES:
            await connection.execute(f"DELETE FROM {table}")
        await connection.execute("DELETE FROM retention_batches")
        yield connection
    finally:
        await connection.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def batches_log(database_url: str) -> AsyncIterator[None]:
    """A statement-level trigger on each pruned table logs the size of every DELETE."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            """
            CREATE TABLE retention_batches (tbl text NOT NULL, deleted bigint NOT NULL);
            CREATE FUNCTION log_retention_batch() RETURNS trigger LANGUAGE plpgsql
            SET search_path = public, pg_temp AS $$
            BEGIN
                INSERT INTO retention_batches SELECT TG_TABLE_NAME, count(*) FROM gone;
                RETURN NULL;
            END $$;
            """
        )
        for table in TABLES:
            await connection.execute(
                f"CREATE TRIGGER log_batch AFTER DELETE ON {table} REFERENCING OLD TABLE AS gone"
                " FOR EACH STATEMENT EXECUTE FUNCTION log_retention_batch()"
            )
        yield
    finally:
        await connection.close()


@pytest_asyncio.fixture(loop_scope="session")
async def retention(database_url: str, batches_log: None) -> AsyncIterator[Retention]:
    db = Database.connect(test_config(database_url))
    try:
        yield Retention(db, RetentionPolicy())
    finally:
        await db.dispose()


async def add_outbox(conn: asyncpg.Connection, label: str, status: str, age_days: int) -> None:
    await conn.execute(
        "INSERT INTO outbox (user_id, kind, display_name, status, created_at, completed_at)"
        " VALUES ($1, 'request_received', $2, $3, now() - make_interval(days => $4),"
        " CASE WHEN $3 = 'pending' THEN NULL ELSE now() - make_interval(days => $4) END)",
        RECEIVER,
        label,
        status,
        age_days,
    )


async def add_notification(
    conn: asyncpg.Connection, label: str, *, read: bool, age_days: int
) -> None:
    await conn.execute(
        "INSERT INTO notifications (user_id, type, title, message, read, created_at)"
        " VALUES ($1, 'connection_request', 't', $2, $3, now() - make_interval(days => $4))",
        RECEIVER,
        label,
        read,
        age_days,
    )


async def add_request(conn: asyncpg.Connection, status: str, age_days: int) -> int:
    # One pending request per pair at most (I1): the pending one goes the other way.
    sender, receiver = (RECEIVER, SENDER) if status == "pending" else (SENDER, RECEIVER)
    return int(
        await conn.fetchval(
            "INSERT INTO connection_requests (sender_id, receiver_id, status, created_at,"
            " resolved_at) VALUES ($1, $2, $3, now() - make_interval(days => $4 + 1),"
            " CASE WHEN $3 = 'pending' THEN NULL ELSE now() - make_interval(days => $4) END)"
            " RETURNING id",
            sender,
            receiver,
            status,
            age_days,
        )
    )


async def add_audit(conn: asyncpg.Connection, label: str, age_days: int) -> None:
    await conn.execute(
        "INSERT INTO audit_log (action, detail, created_at)"
        " VALUES ('test.aged', $1::jsonb, now() - make_interval(days => $2))",
        json.dumps({"label": label}),
        age_days,
    )


@on_session_loop
async def test_prune_deletes_what_aged_and_keeps_the_rest(
    conn: asyncpg.Connection, retention: Retention
) -> None:
    await add_outbox(conn, "sent 8 days ago", "sent", 8)
    await add_outbox(conn, "skipped 8 days ago", "skipped", 8)
    await add_outbox(conn, "sent 6 days ago", "sent", 6)
    await add_outbox(conn, "failed 8 days ago", "failed", 8)
    await add_outbox(conn, "failed 31 days ago", "failed", 31)
    await add_outbox(conn, "pending for 400 days", "pending", 400)
    await add_notification(conn, "read 91 days ago", read=True, age_days=91)
    await add_notification(conn, "read 89 days ago", read=True, age_days=89)
    await add_notification(conn, "unread for 200 days", read=False, age_days=200)
    old_accepted = await add_request(conn, "accepted", 366)
    old_cancelled = await add_request(conn, "cancelled", 366)
    rejected = await add_request(conn, "rejected", 364)
    pending = await add_request(conn, "pending", 400)
    await add_audit(conn, "366 days old", 366)
    await add_audit(conn, "364 days old", 364)

    report = await retention.prune()

    assert report == {
        "outbox_done": 2,
        "outbox_failed": 1,
        "notifications_read": 1,
        "requests_resolved": 2,
        "audit_log": 1,
        "idempotency_keys": 0,
    }
    outbox = await conn.fetch("SELECT display_name FROM outbox ORDER BY id")
    assert [row[0] for row in outbox] == [
        "sent 6 days ago",
        "failed 8 days ago",
        "pending for 400 days",
    ]
    notes = await conn.fetch("SELECT message FROM notifications ORDER BY id")
    assert [row[0] for row in notes] == ["read 89 days ago", "unread for 200 days"]
    requests = [row[0] for row in await conn.fetch("SELECT id FROM connection_requests")]
    assert sorted(requests) == sorted([rejected, pending])
    assert old_accepted not in requests and old_cancelled not in requests
    audit = await conn.fetch("SELECT detail->>'label' FROM audit_log ORDER BY id")
    assert [row[0] for row in audit] == ["364 days old"]
    # A second run finds nothing left to do.
    assert await retention.prune() == dict.fromkeys(report, 0)


@on_session_loop
async def test_every_delete_takes_at_most_one_batch(
    conn: asyncpg.Connection, retention: Retention
) -> None:
    aged = "now() - interval '400 days'"
    await conn.execute(
        "INSERT INTO outbox (user_id, kind, display_name, status, completed_at)"
        f" SELECT $1, 'request_received', 'x', 'sent', {aged} FROM generate_series(1, 2500)",
        RECEIVER,
    )
    await conn.execute(
        "INSERT INTO notifications (user_id, type, title, message, read, created_at)"
        f" SELECT $1, 't', 't', 'm', true, {aged} FROM generate_series(1, 1001)",
        RECEIVER,
    )
    await conn.execute(
        f"INSERT INTO audit_log (action, created_at) SELECT 'a', {aged}"
        " FROM generate_series(1, 1000)"
    )

    report = await retention.prune()

    assert report is not None
    assert (report["outbox_done"], report["notifications_read"], report["audit_log"]) == (
        2500,
        1001,
        1000,
    )
    logged = await conn.fetch("SELECT tbl, deleted FROM retention_batches WHERE deleted > 0")
    by_table: dict[str, list[int]] = {}
    for row in logged:
        by_table.setdefault(row["tbl"], []).append(row["deleted"])
    assert sorted(by_table["outbox"], reverse=True) == [1000, 1000, 500]
    assert sorted(by_table["notifications"], reverse=True) == [1000, 1]
    assert by_table["audit_log"] == [1000]
    assert max(deleted for sizes in by_table.values() for deleted in sizes) <= store.BATCH_SIZE


@on_session_loop
async def test_a_replica_holding_the_lock_makes_the_other_skip(
    conn: asyncpg.Connection, retention: Retention, database_url: str
) -> None:
    await add_audit(conn, "ancient", 1000)
    other_replica = await asyncpg.connect(database_url)
    try:
        await other_replica.execute("SELECT pg_advisory_lock($1)", store.LOCK_KEY)
        assert await retention.prune() is None
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1
        await other_replica.execute("SELECT pg_advisory_unlock($1)", store.LOCK_KEY)
    finally:
        await other_replica.close()
    assert (await retention.prune() or {})["audit_log"] == 1
    # The run let go of the lock: nobody holds it now.
    held = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        " AND ((classid::bigint << 32) | objid::bigint) = $1",
        store.LOCK_KEY,
    )
    assert held == 0


@on_session_loop
async def test_each_delete_is_served_by_an_index(conn: asyncpg.Connection) -> None:
    await conn.execute("SET enable_seqscan = off")
    try:
        for name, statement in store.STATEMENTS.items():
            plan = await conn.fetchval(
                f"EXPLAIN (FORMAT JSON) {statement.sql}",
                *statement.args({"age": store.DAY, "batch": store.BATCH_SIZE}),
            )
            assert "Seq Scan" not in plan, (name, plan)
    finally:
        await conn.execute("RESET enable_seqscan")


@on_session_loop
async def test_a_run_holds_its_lock_and_deletes_on_a_session_of_its_own(
    conn: asyncpg.Connection, database_url: str, batches_log: None
) -> None:
    """Behind a transaction pooler the lock and its unlock could reach two server connections
    and the lock would stay behind: a run goes to the listener's URL, never through the pool
    (here the pool's URL answers nothing at all)."""
    config = test_config(
        f"postgresql://postgres@127.0.0.1:{free_port()}/none", listen_database_url=database_url
    )
    db = Database.connect(config)
    try:
        await add_audit(conn, "ancient", 1000)
        report = await Retention(db, RetentionPolicy()).prune()
    finally:
        await db.dispose()
    assert report is not None and report["audit_log"] == 1
    held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    assert await conn.fetchval(held) == 0


@on_session_loop
async def test_serve_prunes_periodically(conn: asyncpg.Connection, database_url: str) -> None:
    server = await start_server(test_config(database_url, retention_interval_seconds=0.2))
    try:
        # Written after the server started (and pruned once at start): a later run takes it.
        await add_audit(conn, "ancient", 1000)

        async def pruned() -> bool:
            count: int = await conn.fetchval("SELECT count(*) FROM audit_log")
            return count == 0

        await until(pruned, within=10, what="the audit log pruned by a later run")
    finally:
        await stop_server(server)


def test_policy_reads_the_configuration() -> None:
    config = test_config(
        "postgresql://unused/x",
        retention_outbox_days=2,
        retention_notifications_days=3,
        retention_requests_days=4,
        retention_audit_days=5,
    )
    policy = RetentionPolicy.from_config(config)
    assert (
        policy.outbox_days,
        policy.outbox_failed_days,
        policy.notifications_days,
        policy.requests_days,
        policy.audit_days,
    ) == (2, 30, 3, 4, 5)
