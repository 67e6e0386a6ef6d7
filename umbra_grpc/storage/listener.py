"""One dedicated LISTEN connection per process, shared by everything that waits on NOTIFY.

Not borrowed from the pool: a LISTEN connection is held for the life of the process, and
notifications arrive on it between statements. Events cross replicas this way: a NOTIFY sent
inside the writing transaction reaches every process's listener when that transaction
commits (so only committed events go out).

A dead connection is noticed within seconds, not when TCP gives up: asyncpg's termination
callback fires when the socket closes, and a probe runs every `probe_interval` seconds for
the cases where nothing closes (a frozen server, a dropped route) or where the connection is
up but deaf. Deaf happens: a transaction pooler (PgBouncer) accepts LISTEN and then never
delivers a notification, and a listener pointed at another database than the writers' hears
nothing either. So the probe is a self-NOTIFY: the listener LISTENs on a channel of its own,
sends a NOTIFY on it the way the writers do (`notify`, through the pool), and expects it back
within `probe_timeout`. A connection is declared up only after its first echo; later,
`MISSES_TO_LOSE` missing echoes in a row count as lost (one echo late on a busy machine must
not end every watch stream of the process). When the probe cannot even be sent (the pool is
away), it proves nothing about this connection, which then gets a plain `SELECT 1` instead.
While down, subscribers are told (`on_down`), and the listener reconnects with exponential
backoff and jitter; once back, `on_up` fires and LISTEN is issued again. With a multi-host URL
(`target_session_attrs=read-write`) each reconnect goes to whichever node is primary now.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from umbra_grpc.tasks import cancel_and_wait

_log = logging.getLogger(__name__)

Handler = Callable[[str], None]
# Sends NOTIFY channel, payload; raises when it cannot.
Notify = Callable[[str, str], Awaitable[None]]
LOST = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
# Consecutive probes without an echo after which an established connection counts as lost.
MISSES_TO_LOSE = 2


class DeafConnection(Exception):
    """The connection took LISTEN but its own probe NOTIFY never came back."""


class Listener:
    """Keeps one LISTEN connection up and dispatches payloads to handlers by channel."""

    def __init__(
        self,
        url: str,
        *,
        notify: Notify,
        probe_interval: float = 2.0,
        probe_timeout: float = 2.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
    ) -> None:
        self._url = url
        self._notify = notify
        # Per process, so replicas do not hear each other's probes.
        self._probe_channel = f"umbra_probe_{secrets.token_hex(8)}"
        self._probe_tokens = itertools.count()
        self._expected_echo = ""
        self._echoed = asyncio.Event()
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
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        await self._close()
        if self.connected:
            # `_run` was cancelled inside `_watch` and never said so: tell the subscribers.
            self._set_connected(False)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._connect()
            except Exception as error:  # whatever it was, the listener must keep trying
                await self._close()
                failures += 1
                delay = min(self._backoff_cap, self._backoff_base * 2 ** min(failures, 10))
                if isinstance(error, DeafConnection):
                    _log.error(
                        "listener connection hears no NOTIFY (a transaction pooler, or another "
                        "database than UMBRA_DATABASE_URL's? UMBRA_LISTEN_DATABASE_URL must "
                        "reach the primary directly); retrying in %.2fs",
                        delay,
                    )
                else:
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
        connection = await asyncpg.connect(
            self._url,
            timeout=self._probe_timeout * 2,
            server_settings={"application_name": "umbra-grpc-listener"},
        )
        self._connection = connection
        self._lost = asyncio.Event()
        connection.add_termination_listener(self._on_terminated)
        await connection.add_listener(self._probe_channel, self._on_echo)
        for channel in self._handlers:
            await connection.add_listener(channel, self._dispatch)
        if not await self._hears_itself():
            raise DeafConnection
        self.backend_pid = connection.get_server_pid()

    async def _watch(self) -> None:
        """Returns when the connection is lost: closed, deaf, or not answering."""
        assert self._connection is not None
        misses = 0
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._probe_interval):
                    await self._lost.wait()
                return
            try:
                heard = await self._hears_itself()
            except Exception as error:  # the probe could not be sent: proves nothing here
                _log.info("listener probe not sent (%s)", type(error).__name__)
                try:
                    async with asyncio.timeout(self._probe_timeout):
                        await self._connection.execute("SELECT 1")
                except LOST:
                    _log.warning("listener probe failed: connection lost")
                    return
                continue
            misses = 0 if heard else misses + 1
            if misses >= MISSES_TO_LOSE:
                _log.warning("listener probe NOTIFY did not come back: connection deaf or lost")
                return
            if misses:
                _log.info("listener probe NOTIFY late; probing again before giving up")

    async def _hears_itself(self) -> bool:
        """Sends a NOTIFY on the probe channel and waits `probe_timeout` for its echo."""
        token = str(next(self._probe_tokens))
        self._expected_echo = token
        self._echoed.clear()
        async with asyncio.timeout(self._probe_timeout):
            await self._notify(self._probe_channel, token)
        try:
            async with asyncio.timeout(self._probe_timeout):
                await self._echoed.wait()
        except TimeoutError:
            return False
        return True

    def _on_echo(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        if payload == self._expected_echo:
            self._echoed.set()

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
        if connection is not None:
            connection.remove_termination_listener(self._on_terminated)
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._probe_timeout):
                    await connection.close()
            if not connection.is_closed():
                connection.terminate()
