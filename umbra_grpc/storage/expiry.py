"""Request expiry (SPEC 11): the SQL of the sweeper that finalises expired requests.

What expiring a request means lives in one database function, `umbra_expire_requests`
(migration 0004): status `expired`, resolved at the moment its TTL ran out, its request
notification deleted, its unsent push skipped ("skipped: expired"), and the receiver's watch
streams told (`resolved`). `umbra_send_request` calls the same function for the one pair it
writes to. A sweep batch takes the oldest pending requests past the TTL through
`ix_connection_requests_pending_age`, `FOR UPDATE SKIP LOCKED` (a request someone is
answering right now is left for the next batch), in one autocommit statement, so its
NOTIFYs go out as soon as it returns.

The sweep only finalises: every query that shows or acts on pending requests compares the
TTL itself, so nothing waits for it to be correct.

One replica at a time: a sweep holds the session-level advisory lock `LOCK_KEY` on its own
connection (`umbra_grpc.storage.retention.exclusive`); a replica that cannot take it skips.
"""

from __future__ import annotations

import datetime as dt

from umbra_grpc.storage.database import Conn, Query

# The bytes of "umbra_ex": fixed, so every replica contends for the same lock.
LOCK_KEY = 0x756D6272615F6578
BATCH_SIZE = 1000

_SWEEP = Query(
    """
    SELECT umbra_expire_requests(ARRAY(
        SELECT id FROM connection_requests
        WHERE status = 'pending' AND created_at <= now() - CAST(:ttl AS interval)
        ORDER BY created_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    ), CAST(:ttl AS interval))
    """
)


async def expire_batch(conn: Conn, *, ttl: dt.timedelta, batch: int) -> int:
    """Expires at most `batch` of the oldest requests pending for longer than `ttl`."""
    return int(await conn.fetchval(_SWEEP, ttl=ttl, batch=batch))
