"""Whether a caller may act: "exists and is active", cached per process.

Checking the caller on every RPC would cost a statement per call. Answers are kept for
`ttl` seconds (UMBRA_USER_CACHE_SECONDS, default 1) and dropped at once when this process
changes the user; other replicas drop them through the `umbra_users` NOTIFY, and at the
latest when the entry expires, so a deactivated user is refused within a second everywhere.

A lookup that was on its way when the user's change was reported may carry the answer from
before the change: it is returned to its caller (who asked before the change) but not kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from umbra_grpc.storage import users
from umbra_grpc.storage.database import Database

MAX_ENTRIES = 100_000


class ActiveUsers:
    """A small time-bounded cache in front of `users.is_active`."""

    def __init__(
        self, db: Database, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._db = db
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[int, tuple[float, bool]] = {}
        self._lookups: dict[int, int] = {}  # lookups on their way, by user
        self._overtaken: set[int] = set()  # users who changed while one was on its way

    async def is_active(self, user_id: int) -> bool:
        """Whether the user exists and is active (from the cache while it is fresh)."""
        now = self._clock()
        entry = self._entries.get(user_id)
        if entry is not None and entry[0] > now:
            return entry[1]
        self._lookups[user_id] = self._lookups.get(user_id, 0) + 1
        try:
            active = await self._db.read(lambda conn: users.is_active(conn, user_id))
        finally:
            left = self._lookups.pop(user_id) - 1
            overtaken = user_id in self._overtaken
            if left:
                self._lookups[user_id] = left
            else:
                self._overtaken.discard(user_id)
        if overtaken:
            return active
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[user_id] = (now + self._ttl, active)
        return active

    def forget(self, user_id: int) -> None:
        """Drops what is cached about the user (it changed)."""
        if user_id in self._lookups:
            self._overtaken.add(user_id)
        self._entries.pop(user_id, None)

    def forget_all(self) -> None:
        """Drops everything (change notices may have been missed)."""
        self._overtaken.update(self._lookups)
        self._entries.clear()
