"""Waiting on PostgreSQL's own view of who waits on a lock, instead of sleeping."""

from __future__ import annotations

from tests.support import Sql, until

SERVER = "umbra-grpc"  # the application_name of the server's connections

_WAITING = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
)


async def waiting_on_locks(sql: Sql, application: str = SERVER) -> int:
    """How many of `application`'s connections wait on a lock right now."""
    return int(await sql.value(_WAITING, application))


async def until_waiting(
    sql: Sql, count: int = 1, *, application: str = SERVER, seconds: float = 10.0
) -> None:
    """Until at least `count` of `application`'s connections wait on a lock."""

    async def enough() -> bool:
        return await waiting_on_locks(sql, application) >= count

    await until(enough, within=seconds, what=f"{count} connections waiting on a lock", every=0.01)


async def until_none_waiting(sql: Sql, *, application: str = SERVER, seconds: float = 10.0) -> None:
    """Until none of `application`'s connections waits on a lock."""

    async def none() -> bool:
        return not await waiting_on_locks(sql, application)

    await until(none, within=seconds, what="no connection waiting on a lock", every=0.01)
