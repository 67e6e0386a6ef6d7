"""The outbox: the SQL of push delivery (SPEC 6).

Rows are written by the requests repository in the RPC's own transaction; this module is the
worker's side:
- `claim` takes up to `limit` due rows (`status = 'pending' AND next_attempt_at <= now()`)
  with `FOR UPDATE SKIP LOCKED`, and in the same statement leases them: `next_attempt_at`
  moves `lease` seconds ahead and `attempts` goes up by one. Once committed, no other worker
  sees the rows as due until the lease runs out, so a process that dies mid-send leaves its
  rows to be claimed again later. Under READ COMMITTED a worker that waited for the lock
  re-checks the WHERE clause against the leased row and skips it: two workers never hold
  the same claim. The user's ntfy settings are read by the same statement, so they are the
  ones in force when the push goes out (the token stays in memory, never in the outbox).
- `attempts` doubles as the fencing token of a claim: `complete` and `reschedule` only touch
  a row still pending with the attempt number they were given, so a worker whose lease ran
  out cannot overwrite the outcome of a newer claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

Outcome = Literal["sent", "skipped", "failed"]


@dataclass(frozen=True)
class ClaimedPush:
    """A leased outbox row with its user's current ntfy settings."""

    id: int
    user_id: int
    kind: str
    display_name: str
    attempt: int
    ntfy_enabled: bool
    connections_enabled: bool
    server_url: str | None
    topic: str | None
    auth_token: str | None

    def __repr__(self) -> str:
        # Never print the token, whatever logs or tracebacks show this object.
        return f"ClaimedPush(id={self.id}, user_id={self.user_id}, kind={self.kind!r})"


_CLAIM = text(
    """
    WITH due AS (
        SELECT id FROM outbox
        WHERE status = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ),
    claimed AS (
        UPDATE outbox o
        SET attempts = o.attempts + 1,
            next_attempt_at = now() + make_interval(secs => CAST(:lease AS double precision))
        FROM due
        WHERE o.id = due.id
        RETURNING o.id, o.user_id, o.kind, o.display_name, o.attempts
    )
    SELECT c.id, c.user_id, c.kind, c.display_name, c.attempts,
           coalesce(s.ntfy_enabled, false) AS ntfy_enabled,
           coalesce(s.ntfy_connections_enabled, false) AS connections_enabled,
           nullif(s.ntfy_server_url, '') AS server_url,
           nullif(s.ntfy_topic, '') AS topic,
           nullif(s.ntfy_auth_token, '') AS auth_token
    FROM claimed c LEFT JOIN settings s ON s.user_id = c.user_id
    ORDER BY c.id
    """
)


async def claim(conn: AsyncConnection, *, limit: int, lease: float) -> list[ClaimedPush]:
    """Leases up to `limit` due rows for `lease` seconds (commit to make the claim stick)."""
    result = await conn.execute(_CLAIM, {"limit": limit, "lease": lease})
    return [
        ClaimedPush(
            id=row.id,
            user_id=row.user_id,
            kind=row.kind,
            display_name=row.display_name,
            attempt=row.attempts,
            ntfy_enabled=row.ntfy_enabled,
            connections_enabled=row.connections_enabled,
            server_url=row.server_url,
            topic=row.topic,
            auth_token=row.auth_token,
        )
        for row in result
    ]


_COMPLETE = text(
    """
    UPDATE outbox
    SET status = :status, completed_at = now(), last_error = coalesce(:note, last_error)
    WHERE id = :id AND status = 'pending' AND attempts = :attempt
    """
)


async def complete(
    conn: AsyncConnection, *, push_id: int, attempt: int, outcome: Outcome, note: str | None
) -> bool:
    """Ends a claimed row as sent, skipped or failed; False when the claim was lost.

    `note` (the error of a failure, the reason of a skip) replaces `last_error`; a row sent
    after failed attempts keeps the last of those errors.
    """
    result = await conn.execute(
        _COMPLETE, {"id": push_id, "attempt": attempt, "status": outcome, "note": note}
    )
    return result.rowcount == 1


_RESCHEDULE = text(
    """
    UPDATE outbox
    SET next_attempt_at = now() + make_interval(secs => CAST(:delay AS double precision)),
        last_error = :error
    WHERE id = :id AND status = 'pending' AND attempts = :attempt
    """
)


async def reschedule(
    conn: AsyncConnection, *, push_id: int, attempt: int, delay: float, error: str
) -> bool:
    """Sets a claimed row due again `delay` seconds from now; False when the claim was lost."""
    result = await conn.execute(
        _RESCHEDULE, {"id": push_id, "attempt": attempt, "delay": delay, "error": error}
    )
    return result.rowcount == 1


_BACKLOG = text("SELECT count(*) FROM outbox WHERE status = 'pending'")


async def backlog(conn: AsyncConnection) -> int:
    """How many rows are still to be delivered (leased ones included)."""
    return int((await conn.execute(_BACKLOG)).scalar_one())


_NEXT_DUE = text(
    """
    SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
    FROM outbox WHERE status = 'pending'
    """
)


async def seconds_until_due(conn: AsyncConnection) -> float | None:
    """Seconds until the earliest pending row is due (<= 0: due now); None when none wait."""
    value = (await conn.execute(_NEXT_DUE)).scalar_one()
    return None if value is None else float(value)
