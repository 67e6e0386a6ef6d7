"""Idempotency keys (SPEC 11): the recorded outcomes of write RPCs, kept for 24 hours.

A key is (caller, method, key). `record` writes an outcome unless a live one is there: an
INSERT whose conflict with a row older than the lifetime overwrites it, and whose conflict
with a live row writes nothing. A concurrent duplicate's INSERT waits on the primary key
until the first transaction ends, then conflicts: that is how a duplicate waits for the
first call's outcome. Rows older than the lifetime are never honoured (`stored` compares
the time) and are deleted by the retention job.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from umbra_grpc.storage.database import Conn, Query

LIFETIME = dt.timedelta(hours=24)


class StoredOutcome(NamedTuple):
    """A recorded outcome and the fingerprint of the request it answered."""

    fingerprint: bytes
    ok: bool
    outcome: bytes


_RECORD = Query(
    """
    INSERT INTO idempotency_keys AS k (caller, method, key, fingerprint, ok, outcome)
    VALUES (:caller, :method, :key, :fingerprint, :ok, :outcome)
    ON CONFLICT (caller, method, key) DO UPDATE
    SET fingerprint = excluded.fingerprint, ok = excluded.ok, outcome = excluded.outcome,
        created_at = now()
    WHERE k.created_at <= now() - CAST(:lifetime AS interval)
    RETURNING true
    """
)


async def record(
    conn: Conn,
    *,
    caller: str,
    method: str,
    key: str,
    fingerprint: bytes,
    ok: bool,
    outcome: bytes,
) -> bool:
    """Records an outcome; False (nothing written) when a live one holds the key."""
    written = await conn.fetchval(
        _RECORD,
        caller=caller,
        method=method,
        key=key,
        fingerprint=fingerprint,
        ok=ok,
        outcome=outcome,
        lifetime=LIFETIME,
    )
    return bool(written)


_STORED = Query(
    """
    SELECT fingerprint, ok, outcome FROM idempotency_keys
    WHERE caller = :caller AND method = :method AND key = :key
      AND created_at > now() - CAST(:lifetime AS interval)
    """
)


async def stored(conn: Conn, *, caller: str, method: str, key: str) -> StoredOutcome | None:
    """The live outcome recorded under the key, if any."""
    row = await conn.fetchrow(_STORED, caller=caller, method=method, key=key, lifetime=LIFETIME)
    return None if row is None else StoredOutcome(row["fingerprint"], row["ok"], row["outcome"])
