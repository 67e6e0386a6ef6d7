"""`umbra-grpc prune`: the retention job run once from the command line, as cron would."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.e2e.test_cli import environment, run
from tests.support import app_environment
from umbra_grpc.storage import retention

AGED_AUDIT = (
    "INSERT INTO audit_log (action, created_at) VALUES"
    " ('test.ancient', now() - interval '400 days'), ('test.recent', now())"
)


async def _sql(url: str, statement: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(statement))
    finally:
        await connection.close()


def actions(url: str) -> list[str]:
    rows = asyncio.run(_sql(url, "SELECT action FROM audit_log ORDER BY id"))
    return [row["action"] for row in rows]


def test_prune_deletes_what_aged_once(database_url: str) -> None:
    asyncio.run(_sql(database_url, AGED_AUDIT))
    result = run("prune", env=environment(**app_environment(database_url)))
    assert result.returncode == 0, result.stderr
    assert "pruned:" in result.stdout and "audit_log=1" in result.stdout
    assert "test.ancient" not in actions(database_url)
    assert "test.recent" in actions(database_url)


def test_prune_skips_while_another_process_holds_the_lock(database_url: str) -> None:
    asyncio.run(_sql(database_url, AGED_AUDIT))

    async def hold_lock_and_prune() -> tuple[int, str]:
        other = await asyncpg.connect(database_url)
        try:
            await other.execute("SELECT pg_advisory_lock($1)", retention.LOCK_KEY)
            result = await asyncio.to_thread(
                run, "prune", env=environment(**app_environment(database_url))
            )
        finally:
            await other.close()
        return result.returncode, result.stdout

    returncode, stdout = asyncio.run(hold_lock_and_prune())
    assert returncode == 0
    assert "skipped" in stdout
    assert "test.ancient" in actions(database_url)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("UMBRA_RETENTION_AUDIT_DAYS", "0"),
        ("UMBRA_RETENTION_OUTBOX_DAYS", "nan"),
        ("UMBRA_RETENTION_INTERVAL_SECONDS", "inf"),
        ("UMBRA_RESEND_COOLDOWN_SECONDS", "-5"),
    ],
)
def test_prune_refuses_a_bad_retention_setting(variable: str, value: str) -> None:
    env = environment(UMBRA_DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres")
    env[variable] = value
    result = run("prune", env=env)
    assert result.returncode != 0
    assert variable in result.stderr
