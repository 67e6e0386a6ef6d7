"""A recording ntfy stand-in: asyncio HTTP/1.1 on 127.0.0.1 (TLS when given a context),
scripted answers per topic.

Enough HTTP for httpx's requests (Content-Length bodies, keep-alive); every request is kept
with the time it arrived. Each topic answers from its script first (e.g. 500, 500, 200, or
429 with Retry-After), then with the default answer (200 unless changed). `HOLD` keeps the
request unanswered until `release()` or `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote

# How long `stop` waits for connection handlers, twice at most (see there).
STOP_SECONDS = 5.0


@dataclass(frozen=True)
class Answer:
    """What the stand-in answers: a status, extra headers and a body."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""


OK = Answer(200, body='{"id":"stand-in","event":"message"}')
# The recorder listens on loopback, which pushes may reach only through the escape hatch.
RECORDER_NETWORKS = ("127.0.0.0/8",)
HOLD = Answer(0)


@dataclass(frozen=True)
class Received:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    body: str
    at: float = field(default_factory=time.monotonic)

    @property
    def topic(self) -> str:
        return unquote(self.path.lstrip("/"))


class NtfyRecorder:
    """Records every request; answers from per-topic scripts, then `default`."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.received: list[Received] = []
        self.default = OK
        self._scripts: dict[str, deque[Answer]] = {}
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Condition()
        self._released = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
        # Python 3.11's wait_closed does not wait for the connections' handlers: wait for them
        # here, or a loop that ends next cancels them and logs each cancelled read. Bounded: a
        # peer that stops reading keeps a closing transport flushing (and its handler in
        # drain), so what is left after a few seconds is aborted, which ends it at once.
        if self._handlers:
            _, left = await asyncio.wait(self._handlers, timeout=STOP_SECONDS)
            for writer in list(self._writers):
                writer.transport.abort()
            if left:
                await asyncio.wait(left, timeout=STOP_SECONDS)

    def script(self, topic: str, *answers: Answer) -> None:
        """The next answers for `topic`, in order."""
        self._scripts.setdefault(topic, deque()).extend(answers)

    def release(self) -> None:
        """Lets held requests go (they are then dropped unanswered)."""
        self._released.set()

    def for_topic(self, topic: str) -> list[Received]:
        return [request for request in self.received if request.topic == topic]

    async def wait_for(self, topic: str, count: int, within: float = 10.0) -> list[Received]:
        """The first `count` requests for `topic`, waiting up to `within` seconds for them."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.for_topic(topic)) >= count)
        return self.for_topic(topic)[:count]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        try:
            while request := await _read_request(reader):
                async with self._arrived:
                    self.received.append(request)
                    self._arrived.notify_all()
                answer = self._answer(request.topic)
                if answer is HOLD:
                    await self._released.wait()
                    return
                writer.write(_response(answer))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, topic: str) -> Answer:
        script = self._scripts.get(topic)
        return script.popleft() if script else self.default


async def _read_request(reader: asyncio.StreamReader) -> Received | None:
    line = await reader.readline()
    if not line.strip():
        return None
    method, path, _version = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Received(method, path, headers, body.decode())


def _response(answer: Answer) -> bytes:
    body = answer.body.encode()
    lines = [
        f"HTTP/1.1 {answer.status} {HTTPStatus(answer.status).phrase}",
        f"Content-Length: {len(body)}",
        "Content-Type: application/json",
        *(f"{name}: {value}" for name, value in answer.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
