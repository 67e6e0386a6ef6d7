"""Waiting on PostgreSQL's own view of who waits on a lock, instead of sleeping."""

from __future__ import annotations

import asyncio
import time

from tests.support import Sql

SERVER = "umbra-grpc"  # the application_name of the server's connections

_WAITING = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
)


async def waiting_on_locks(sql: Sql, application: str = SERVER) -> int:
    """How many of `application`'s connections wait on a lock right now."""
    return int(await sql.value(_WAITING, application))  # type: ignore[call-overload]


async def until_waiting(
    sql: Sql, count: int = 1, *, application: str = SERVER, seconds: float = 10.0
) -> None:
    """Until at least `count` of `application`'s connections wait on a lock."""
    deadline = time.monotonic() + seconds
    while await waiting_on_locks(sql, application) < count:
        assert time.monotonic() < deadline, f"{count} connections never waited on a lock"
        await asyncio.sleep(0.01)


async def until_none_waiting(sql: Sql, *, application: str = SERVER, seconds: float = 10.0) -> None:
    """Until none of `application`'s connections waits on a lock."""
    deadline = time.monotonic() + seconds
    while await waiting_on_locks(sql, application):
        assert time.monotonic() < deadline, "a connection kept waiting on a lock"
        await asyncio.sleep(0.01)
