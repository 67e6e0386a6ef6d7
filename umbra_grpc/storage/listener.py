"""One dedicated LISTEN connection per process, shared by everything that waits on NOTIFY.

Not borrowed from the pool: a LISTEN connection is held for the life of the process, and
notifications arrive on it between statements. Events cross replicas this way: a NOTIFY sent
inside the writing transaction reaches every process's listener when that transaction
commits (so only committed events go out).

A dead connection is noticed within seconds, not when TCP gives up: asyncpg's termination
callback fires when the socket closes, and a probe (`SELECT 1` with a timeout) runs every
`probe_interval` seconds for the cases where nothing closes (a frozen server, a dropped
route). While down, subscribers are told (`on_down`), and the listener reconnects with
exponential backoff and jitter; once back, `on_up` fires and LISTEN is issued again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

import asyncpg

_log = logging.getLogger(__name__)

Handler = Callable[[str], None]


class Listener:
    """Keeps one LISTEN connection up and dispatches payloads to handlers by channel."""

    def __init__(
        self,
        url: str,
        *,
        probe_interval: float = 2.0,
        probe_timeout: float = 2.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
    ) -> None:
        self._url = url
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._handlers: dict[str, list[Handler]] = {}
        self._up_callbacks: list[Callable[[], None]] = []
        self._down_callbacks: list[Callable[[], None]] = []
        self._connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.backend_pid: int | None = None
        self._stopping = False

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Calls `handler(payload)` for every NOTIFY on `channel` (register before start)."""
        self._handlers.setdefault(channel, []).append(handler)

    def on_up(self, callback: Callable[[], None]) -> None:
        """Called each time the connection is (re)established and listening."""
        self._up_callbacks.append(callback)

    def on_down(self, callback: Callable[[], None]) -> None:
        """Called each time the connection is lost (events may have been missed)."""
        self._down_callbacks.append(callback)

    async def start(self) -> None:
        """Starts the keep-alive loop; returns at once (the first connect happens in it)."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="pg-listener")

    async def stop(self) -> None:
        """Stops listening and closes the connection."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._close()
        if self.connected:
            # `_run` was cancelled inside `_watch` and never said so: tell the subscribers.
            self._set_connected(False)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._connect()
            except (OSError, asyncpg.PostgresError, TimeoutError) as error:
                failures += 1
                delay = min(self._backoff_cap, self._backoff_base * 2 ** min(failures, 10))
                _log.warning(
                    "listener cannot connect (%s); retrying in %.2fs",
                    type(error).__name__,
                    delay,
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
                continue
            failures = 0
            self._set_connected(True)
            await self._watch()
            self._set_connected(False)
            await self._close()

    async def _connect(self) -> None:
        connection = await asyncpg.connect(self._url, timeout=self._probe_timeout * 2)
        self._lost = asyncio.Event()
        connection.add_termination_listener(self._on_terminated)
        for channel in self._handlers:
            await connection.add_listener(channel, self._dispatch)
        self.backend_pid = connection.get_server_pid()
        self._connection = connection

    async def _watch(self) -> None:
        """Returns when the connection is lost: closed, or failing its probe."""
        assert self._connection is not None
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self._probe_interval)
                return
            try:
                await asyncio.wait_for(self._connection.execute("SELECT 1"), self._probe_timeout)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                _log.warning("listener probe failed: connection lost")
                return

    def _on_terminated(self, connection: Any) -> None:
        if not self._stopping:
            _log.warning("listener connection terminated")
        self._lost.set()

    def _dispatch(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        for handler in self._handlers.get(channel, ()):
            try:
                handler(payload)
            except Exception:
                _log.exception("NOTIFY handler failed on %s", channel)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        _log.info("listener %s", "connected" if connected else "down")
        for callback in self._up_callbacks if connected else self._down_callbacks:
            try:
                callback()
            except Exception:
                _log.exception("listener callback failed")

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), self._probe_timeout)
            if not connection.is_closed():
                connection.terminate()
