"""Helpers of the bare-worker tests: a worker's configuration, users and rows made by SQL."""

from __future__ import annotations

import itertools

from tests.outbox.recorder import RECORDER_NETWORKS, NtfyRecorder
from tests.support import Sql, test_config, until
from umbra_grpc.config import Config

user_ids = itertools.count(1)


def config(database_url: str, **changes: object) -> Config:
    """Fast retries and the recorder's network allowed (overridable)."""
    return test_config(
        database_url,
        outbox_retry_base_seconds=0.05,
        outbox_retry_cap_seconds=0.2,
        outbox_poll_seconds=30.0,
        ntfy_timeout_seconds=1.0,
        **{"ntfy_allowed_networks": RECORDER_NETWORKS, **changes},
    )


async def add_user(
    sql: Sql, recorder: NtfyRecorder, *, settings: bool = True, **ntfy: object
) -> int:
    """A user whose pushes go to topic `t<id>` on the recorder; `ntfy` overrides columns."""
    user_id = next(user_ids)
    await sql.rows("INSERT INTO users (id, umbral_name) VALUES ($1, $2)", user_id, f"user{user_id}")
    if settings:
        columns = {
            "ntfy_enabled": True,
            "ntfy_connections_enabled": True,
            "ntfy_server_url": recorder.url,
            "ntfy_topic": f"t{user_id}",
            **ntfy,
        }
        assert len(columns) == 4, ntfy  # overrides only, in the order below
        await sql.rows(
            "INSERT INTO settings (user_id, ntfy_enabled, ntfy_connections_enabled, "
            "ntfy_server_url, ntfy_topic) VALUES ($1, $2, $3, $4, $5)",
            user_id,
            *columns.values(),
        )
    return user_id


async def add_pushes(
    sql: Sql, user_id: int, count: int = 1, kind: str = "request_received"
) -> list[int]:
    rows = await sql.rows(
        "INSERT INTO outbox (user_id, kind, display_name) "
        "SELECT $1, $2, 'sender ' || n FROM generate_series(1, $3) AS n RETURNING id",
        user_id,
        kind,
        count,
    )
    return [row["id"] for row in rows]


async def wait_settled(sql: Sql, within: float = 10.0) -> None:
    """Waits until no outbox row is pending."""

    async def done() -> bool:
        return not await sql.value("SELECT count(*) FROM outbox WHERE status = 'pending'")

    await until(done, within=within, what="no outbox row pending")
