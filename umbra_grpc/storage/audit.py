"""Audit rows: every successful mutation writes one in its own transaction (I5)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from umbra_grpc.storage.database import Conn, Query

_RECORD = Query(
    """
    INSERT INTO audit_log (action, actor_id, target_id, detail, ip)
    VALUES (:action, :actor_id, :target_id, CAST(:detail AS jsonb), CAST(:ip AS inet))
    """
)


async def record(
    conn: Conn,
    *,
    action: str,
    actor_id: int | None,
    target_id: int | None,
    detail: Mapping[str, Any],
    ip: str | None,
) -> None:
    """Writes one audit row in the caller's transaction."""
    await conn.execute(
        _RECORD,
        action=action,
        actor_id=actor_id,
        target_id=target_id,
        detail=json.dumps(dict(detail)),
        ip=ip,
    )
