"""A TCP proxy in front of PostgreSQL that can drop notifications on their way to the client.

While `deaf` is set it forwards everything except the server's NotificationResponse
messages: what a transaction pooler does to a LISTEN connection (LISTEN succeeds, nothing
ever arrives). `drop_next = n` drops only the next n of them (one lost on its way).
Clients must connect with `sslmode=disable` (as `url` says): the proxy reads the server's
side as a plain stream of typed messages (one type byte, a 4-byte length).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from urllib.parse import urlsplit, urlunsplit

NOTIFICATION_RESPONSE = b"A"


class NotificationDroppingProxy:
    """Forwards 127.0.0.1:`port` to the server of `upstream_url`; counts connections."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream_url = upstream_url
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.deaf = False
        self.drop_next = 0
        self.connections = 0
        self.dropped = 0
        self.forwarded = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """`upstream_url` with this proxy's address instead of the server's."""
        parts = urlsplit(self._upstream_url)
        user = f"{parts.username}@" if parts.username else ""
        query = "&".join(filter(None, [parts.query, "sslmode=disable"]))
        return urlunsplit((parts.scheme, f"{user}127.0.0.1:{self.port}", parts.path, query, ""))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter):
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_in, server_out = await asyncio.open_connection(*self._upstream)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._copy(client_in, server_out))
                group.create_task(self._messages(server_in, client_out))
        except* (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            for writer in (client_out, server_out):
                writer.close()

    async def _copy(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        raise ConnectionError("client closed")

    async def _messages(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while True:
            header = await source.readexactly(5)
            (length,) = struct.unpack("!i", header[1:])
            body = await source.readexactly(length - 4)
            if header[:1] == NOTIFICATION_RESPONSE:
                if self.deaf or self.drop_next > 0:
                    self.drop_next = max(0, self.drop_next - 1)
                    self.dropped += 1
                    continue
                self.forwarded += 1
            sink.write(header + body)
            await sink.drain()
