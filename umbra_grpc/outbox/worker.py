"""Placeholder being replaced by the outbox issue: the interface the server wires."""

from __future__ import annotations

from umbra_grpc.config import Config
from umbra_grpc.storage.database import Database


class OutboxWorker:
    """Delivers outbox rows; `wake()` is called on every NOTIFY umbra_outbox."""

    def __init__(self, db: Database, config: Config) -> None:
        self._db = db
        self._config = config

    def wake(self) -> None:
        """New rows may be due."""

    async def start(self) -> None:
        """Starts delivering."""

    async def stop(self) -> None:
        """Stops delivering; undelivered rows stay in the outbox."""
