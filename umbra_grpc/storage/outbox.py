"""The outbox: the SQL of push delivery (SPEC 6).

Rows are written by the requests repository in the RPC's own transaction; this module is the
worker's side, every function one statement (run in autocommit):
- `claim` takes up to `limit` due rows (`status = 'pending' AND next_attempt_at <= now()`)
  with `FOR UPDATE SKIP LOCKED` and, in the same statement, reads their users' ntfy settings
  as they are now and counts the claim as an attempt (`attempts` + 1). A row its user's
  settings say not to send (ntfy off, connection pushes off, no server or topic; no settings
  row means ntfy off) is completed there and then as `skipped`, the reason in `last_error`.
  Every other row is leased: `next_attempt_at` moves `lease` seconds ahead, so no other
  worker sees it as due until the lease runs out, and a process that dies mid-send leaves
  its rows to be claimed again later. Under READ COMMITTED a worker whose statement started
  before a claim committed re-checks the WHERE clause against the claimed row and skips it:
  two workers never hold the same claim. The settings are the ones in force when the push
  goes out (the token stays in memory, never in the outbox).
- `attempts` doubles as the fencing token of a claim: `complete` and `reschedule` only touch
  a row still pending with the attempt number they were given, so a worker whose lease ran
  out cannot overwrite the outcome of a newer claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from umbra_grpc.storage.database import Conn, Query

Outcome = Literal["sent", "failed"]


@dataclass(frozen=True)
class ClaimedPush:
    """A leased outbox row to send, with where its user's current ntfy settings send it."""

    id: int
    user_id: int
    kind: str
    display_name: str
    attempt: int
    server_url: str
    topic: str
    auth_token: str | None
    # The writing RPC's W3C trace context (migration 0005), None when it was not traced.
    traceparent: str | None = None

    def __repr__(self) -> str:
        # Never print the token, whatever logs or tracebacks show this object.
        return f"ClaimedPush(id={self.id}, user_id={self.user_id}, kind={self.kind!r})"


@dataclass(frozen=True)
class Claim:
    """What one claim took: the rows leased to send, and how many it completed as skipped."""

    pushes: list[ClaimedPush]
    skipped: int

    @property
    def size(self) -> int:
        """How many due rows the claim took, skipped ones included."""
        return len(self.pushes) + self.skipped


# Skips are decided by the claim itself, so a row not to send costs no statement of its own;
# a missing settings row reads as ntfy off.
_CLAIM = Query(
    """
    WITH due AS (
        SELECT id, user_id FROM outbox
        WHERE status = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ),
    decided AS (
        SELECT due.id,
               CASE
                   WHEN NOT coalesce(s.ntfy_enabled, false) THEN 'skipped: ntfy off'
                   WHEN NOT coalesce(s.ntfy_connections_enabled, false)
                       THEN 'skipped: connection pushes off'
                   WHEN nullif(s.ntfy_server_url, '') IS NULL OR nullif(s.ntfy_topic, '') IS NULL
                       THEN 'skipped: no ntfy server or topic'
               END AS skip_reason,
               nullif(s.ntfy_server_url, '') AS server_url,
               nullif(s.ntfy_topic, '') AS topic,
               nullif(s.ntfy_auth_token, '') AS auth_token
        FROM due LEFT JOIN settings s ON s.user_id = due.user_id
    ),
    claimed AS (
        UPDATE outbox o
        SET attempts = o.attempts + 1,
            status = CASE WHEN d.skip_reason IS NULL THEN 'pending' ELSE 'skipped' END,
            completed_at = CASE WHEN d.skip_reason IS NULL THEN NULL ELSE now() END,
            last_error = coalesce(d.skip_reason, o.last_error),
            next_attempt_at = CASE
                WHEN d.skip_reason IS NULL
                    THEN now() + make_interval(secs => CAST(:lease AS double precision))
                ELSE o.next_attempt_at
            END
        FROM decided d
        WHERE o.id = d.id
        RETURNING o.id, o.user_id, o.kind, o.display_name, o.attempts, o.traceparent,
                  d.skip_reason IS NOT NULL AS skipped, d.server_url, d.topic, d.auth_token
    )
    SELECT * FROM claimed ORDER BY id
    """
)


async def claim(conn: Conn, *, limit: int, lease: float) -> Claim:
    """Claims up to `limit` due rows: completes the ones to skip, leases the others."""
    pushes: list[ClaimedPush] = []
    skipped = 0
    for row in await conn.fetch(_CLAIM, limit=limit, lease=lease):
        if row["skipped"]:
            skipped += 1
            continue
        pushes.append(
            ClaimedPush(
                id=row["id"],
                user_id=row["user_id"],
                kind=row["kind"],
                display_name=row["display_name"],
                attempt=row["attempts"],
                server_url=row["server_url"],
                topic=row["topic"],
                auth_token=row["auth_token"],
                traceparent=row["traceparent"],
            )
        )
    return Claim(pushes, skipped)


_COMPLETE = Query(
    """
    UPDATE outbox
    SET status = :status, completed_at = now(), last_error = coalesce(:note, last_error)
    WHERE id = :id AND status = 'pending' AND attempts = :attempt
    """
)


async def complete(
    conn: Conn, *, push_id: int, attempt: int, outcome: Outcome, note: str | None
) -> bool:
    """Ends a claimed row as sent or failed; False when the claim was lost.

    `note` (the error of a failure) replaces `last_error`; a row sent after failed attempts
    keeps the last of those errors.
    """
    changed = await conn.execute(_COMPLETE, id=push_id, attempt=attempt, status=outcome, note=note)
    return changed == 1


_RESCHEDULE = Query(
    """
    UPDATE outbox
    SET next_attempt_at = now() + make_interval(secs => CAST(:delay AS double precision)),
        last_error = :error
    WHERE id = :id AND status = 'pending' AND attempts = :attempt
    """
)


async def reschedule(conn: Conn, *, push_id: int, attempt: int, delay: float, error: str) -> bool:
    """Sets a claimed row due again `delay` seconds from now; False when the claim was lost."""
    changed = await conn.execute(_RESCHEDULE, id=push_id, attempt=attempt, delay=delay, error=error)
    return changed == 1


_BACKLOG = Query("SELECT count(*) FROM outbox WHERE status = 'pending'")


async def backlog(conn: Conn) -> int:
    """How many rows are still to be delivered (leased ones included)."""
    return int(await conn.fetchval(_BACKLOG))


_NEXT_DUE = Query(
    """
    SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
    FROM outbox WHERE status = 'pending'
    """
)


async def seconds_until_due(conn: Conn) -> float | None:
    """Seconds until the earliest pending row is due (<= 0: due now); None when none wait."""
    value = await conn.fetchval(_NEXT_DUE)
    return None if value is None else float(value)
