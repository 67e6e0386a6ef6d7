"""A TCP proxy in front of PostgreSQL that can drop notifications on their way to the client,
and lists the statements clients run.

While `deaf` is set it forwards everything except the server's NotificationResponse
messages: what a transaction pooler does to a LISTEN connection (LISTEN succeeds, nothing
ever arrives). `drop_next = n` drops only the next n of them (one lost on its way).
`executed` lists the text of every statement clients ran, in the order they asked: a simple
Query's text, or an Execute's (the statement its portal was bound to), as the server saw
it, whatever the client's own bookkeeping says. Clients must connect with `sslmode=disable`
(as `url` says): the proxy reads both sides as plain streams of typed messages (one type
byte, a 4-byte length; the client's startup packet has no type byte).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from urllib.parse import urlsplit, urlunsplit

NOTIFICATION_RESPONSE = b"A"
QUERY, PARSE, BIND, EXECUTE = b"Q", b"P", b"B", b"E"


def _strings(body: bytes, count: int) -> list[str]:
    """The first `count` NUL-terminated strings of a message body."""
    return [part.decode() for part in body.split(b"\0", count)[:count]]


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
        self.executed: list[str] = []
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

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_in, server_out = await asyncio.open_connection(*self._upstream)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._statements(client_in, server_out))
                group.create_task(self._messages(server_in, client_out))
        except* (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            for writer in (client_out, server_out):
                writer.close()

    async def _statements(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Forwards the client's messages, noting the statements it runs."""
        (length,) = struct.unpack("!i", await source.readexactly(4))
        sink.write(struct.pack("!i", length) + await source.readexactly(length - 4))
        prepared: dict[str, str] = {}  # statement name: text
        portals: dict[str, str] = {}  # portal name: text
        while True:
            header = await source.readexactly(5)
            (length,) = struct.unpack("!i", header[1:])
            body = await source.readexactly(length - 4)
            kind = header[:1]
            if kind == QUERY:
                self.executed.append(_strings(body, 1)[0])
            elif kind == PARSE:
                name, text = _strings(body, 2)
                prepared[name] = text
            elif kind == BIND:
                portal, name = _strings(body, 2)
                portals[portal] = prepared[name]
            elif kind == EXECUTE:
                self.executed.append(portals[_strings(body, 1)[0]])
            sink.write(header + body)
            await sink.drain()

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
