"""Audit rows: every successful mutation writes one in its own transaction (I5)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from umbra_grpc.storage.tables import AuditLog, table

_audit = table(AuditLog)


async def record(
    conn: AsyncConnection,
    *,
    action: str,
    actor_id: int | None,
    target_id: int | None,
    detail: Mapping[str, Any],
    ip: str | None,
) -> None:
    """Writes one audit row in the caller's transaction."""
    await conn.execute(
        _audit.insert().values(
            action=action, actor_id=actor_id, target_id=target_id, detail=dict(detail), ip=ip
        )
    )
