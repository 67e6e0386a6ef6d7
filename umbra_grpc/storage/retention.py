"""Retention: the SQL of the job that deletes what has aged (SPEC 10.9).

Each rule deletes in batches of at most `BATCH_SIZE` rows, one autocommit statement per
batch, so no batch holds many row locks or a long transaction. A batch takes its rows with
`FOR UPDATE SKIP LOCKED`: a row some transaction is touching right now is left for the next
run instead of being waited for. Every rule's batch is found through an index (migration
0003), oldest first, so a run costs what it deletes, not the size of the table:

    rule                table / rows, oldest first by           index
    outbox_done         outbox: sent, skipped; completed_at     ix_outbox_completed
    outbox_failed       outbox: failed; completed_at            ix_outbox_completed
    notifications_read  notifications: read; created_at         ix_notifications_read
    requests_resolved   connection_requests: not pending;       ix_connection_requests_resolved
                        resolved_at
    audit_log           audit_log: all; created_at              ix_audit_log_created_at
    idempotency_keys    idempotency_keys: all; created_at       ix_idempotency_keys_created_at
                        (after 24 hours: `storage.idempotency.LIFETIME`)

Pending outbox rows, unread notifications and pending requests are never deleted here.

One replica at a time: a run holds the session-level advisory lock `LOCK_KEY` on its own
connection (`Database.session`, never through a transaction pooler) for its whole length; a
replica that cannot take it skips its run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator

from umbra_grpc.storage.database import Conn, Query

# The bytes of "umbra_rp": fixed, so every replica (and `umbra-grpc prune`) contends for it.
LOCK_KEY = 0x756D6272615F7270
BATCH_SIZE = 1000
DAY = dt.timedelta(days=1)

_AGED = "< now() - CAST(:age AS interval)"
_ID = "id"
# rule: (table, which rows have aged, the table's key)
_RULES = {
    "outbox_done": ("outbox", f"status IN ('sent', 'skipped') AND completed_at {_AGED}", _ID),
    "outbox_failed": ("outbox", f"status = 'failed' AND completed_at {_AGED}", _ID),
    "notifications_read": ("notifications", f"read AND created_at {_AGED}", _ID),
    "requests_resolved": (
        "connection_requests",
        f"status <> 'pending' AND resolved_at {_AGED}",
        _ID,
    ),
    "audit_log": ("audit_log", f"created_at {_AGED}", _ID),
    "idempotency_keys": ("idempotency_keys", f"created_at {_AGED}", "caller, method, key"),
}
RULES = tuple(_RULES)
STATEMENTS = {
    rule: Query(
        f"""
        DELETE FROM {table} WHERE ({key}) IN (
            SELECT {key} FROM {table} WHERE {aged} LIMIT :batch FOR UPDATE SKIP LOCKED
        )
        """
    )
    for rule, (table, aged, key) in _RULES.items()
}


async def delete_batch(conn: Conn, rule: str, *, age: dt.timedelta, batch: int) -> int:
    """Deletes at most `batch` rows older than `age` under `rule`; returns how many."""
    return await conn.execute(STATEMENTS[rule], age=age, batch=batch)


_TRY_LOCK = Query("SELECT pg_try_advisory_lock(CAST(:key AS bigint))")
_UNLOCK = Query("SELECT pg_advisory_unlock(CAST(:key AS bigint))")


@contextlib.asynccontextmanager
async def exclusive(conn: Conn, key: int = LOCK_KEY) -> AsyncIterator[bool]:
    """Holds the advisory lock `key` (the retention lock unless told) on `conn` while the
    block runs; yields False (and holds nothing) when another session has it.

    `conn` must be one PostgreSQL session throughout (`Database.session`, never through a
    transaction pooler). A session lock outlives anything that goes wrong in the block: when
    the block fails, the connection is terminated at once rather than left holding it (the
    server drops a session's locks when the session ends).
    """
    if not await conn.fetchval(_TRY_LOCK, key=key):
        yield False
        return
    try:
        yield True
    except BaseException:
        conn.raw.terminate()
        raise
    await conn.fetchval(_UNLOCK, key=key)
