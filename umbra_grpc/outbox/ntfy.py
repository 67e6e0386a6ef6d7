"""Publishing one message to an ntfy topic, and what the answer means for a retry.

Why httpx: it is typed (checked by `mypy --strict` with no stubs), its `AsyncClient` is a
connection pool with keep-alive, per-phase timeouts (connect, read, write, pool) and
connection limits set in one place, and it is nothing more than an HTTP client. aiohttp
would also work, but brings a server framework and its own session rules we do not need.
One client serves the whole process (the worker owns it and closes it on stop).

An answer is one of three results:
- `Delivered`: any 2xx.
- `Retry`: 429 (with its `Retry-After`, in seconds or as an HTTP date), any 5xx, a timeout,
  or a connection that could not be made or broke.
- `Rejected`: anything else (other 4xx, 3xx, a URL or header that cannot be sent). Sending it
  again would get the same answer, so the row is dead-lettered at once.
Error texts are short, hold at most a bounded snippet of the response body, and never the
token (it is cut out of any text that might echo it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from umbra_grpc.config import Config

BODY_READ_BYTES = 4096
BODY_SNIPPET_CHARS = 120
ERROR_CHARS = 300
# A Retry-After beyond this is taken as this: a row should not sleep for days.
MAX_RETRY_AFTER_SECONDS = 3600.0


@dataclass(frozen=True)
class Message:
    """What a push says: ntfy's Title and Tags headers and the body."""

    title: str
    tags: str
    body: str


def message_for(kind: str, display_name: str) -> Message | None:
    """The push for an outbox row, phrased as the router phrased it; None for unknown kinds."""
    if kind == "request_received":
        return Message(
            "New Connection Request", "handshake", f"{display_name} wants to connect with you"
        )
    if kind == "request_accepted":
        return Message(
            "Connection Accepted",
            "white_check_mark",
            f"{display_name} accepted your connection request",
        )
    return None


@dataclass(frozen=True)
class Delivered:
    """The ntfy server took the message."""

    status: int


@dataclass(frozen=True)
class Retry:
    """Worth trying again; `retry_after` is the server's own wish, in seconds, if it said."""

    error: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Rejected:
    """Will never succeed as it stands: the row is dead-lettered."""

    error: str


Result = Delivered | Retry | Rejected


def new_client(config: Config) -> httpx.AsyncClient:
    """The process's HTTP client: bounded time per phase, bounded connections, no redirects."""
    connections = max(1, config.outbox_batch_size)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(config.ntfy_timeout_seconds),
        limits=httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=min(connections, 10),
            keepalive_expiry=30.0,
        ),
        follow_redirects=False,
        headers={"User-Agent": "umbra-grpc"},
    )


def topic_url(server_url: str, topic: str) -> str:
    """`{server_url}/{topic}`, the topic kept to one path segment."""
    return f"{server_url.rstrip('/')}/{quote(topic, safe='')}"


async def publish(
    client: httpx.AsyncClient,
    *,
    server_url: str,
    topic: str,
    token: str | None,
    message: Message,
    deadline: float,
) -> Result:
    """POSTs `message` to the topic within `deadline` seconds in all.

    Never raises for anything the network or the server does: that is the result.
    """
    headers = {"Title": message.title, "Tags": message.tags}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        # httpx's timeouts are per phase; this bounds the whole exchange (the lease needs it).
        async with asyncio.timeout(deadline):
            request = client.build_request(
                "POST", topic_url(server_url, topic), headers=headers, content=message.body
            )
            response = await client.send(request, stream=True)
            try:
                head = await _read_head(response)
            finally:
                await response.aclose()
    except TimeoutError:
        return Retry("timeout")
    except httpx.TimeoutException as error:
        return Retry(f"timeout ({type(error).__name__})")
    except (httpx.UnsupportedProtocol, httpx.InvalidURL):
        return Rejected("invalid ntfy server URL")
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        # The message of these errors may quote the header value, i.e. the token.
        return Rejected("request could not be encoded (server URL, topic or token)")
    except httpx.TransportError as error:
        return Retry(short(f"{type(error).__name__}: {error}", token))
    return classify(response.status_code, response.headers.get("Retry-After"), head, token)


async def _read_head(response: httpx.Response) -> str:
    """The start of the body: a server cannot make us hold more than BODY_READ_BYTES.

    Reading a short body to its end (ntfy answers a publish with a small JSON) lets the
    connection go back to the pool for keep-alive.
    """
    data = b""
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) >= BODY_READ_BYTES:
            break
    return data[:BODY_READ_BYTES].decode("utf-8", "replace")


def classify(status: int, retry_after: str | None, body: str, token: str | None = None) -> Result:
    """What an HTTP answer (status, Retry-After header, start of the body) means for the row."""
    if 200 <= status < 300:
        return Delivered(status)
    # The token is cut out of the whole body read before the snippet is taken, so a snippet
    # can never end in a piece of it.
    snippet = redact(body, token)[:BODY_SNIPPET_CHARS]
    error = short(f"HTTP {status}: {snippet}", token)
    if status == 429:
        return Retry(error, retry_after_seconds(retry_after))
    if status >= 500:
        return Retry(error)
    return Rejected(error)


def retry_after_seconds(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """A `Retry-After` header in seconds from now (delta-seconds or HTTP date), if valid."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = when.timestamp() - now()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def redact(text: str, token: str | None) -> str:
    """`text` with every occurrence of the token replaced."""
    return text.replace(token, "[token]") if token else text


def short(text: str, token: str | None = None) -> str:
    """One line of at most ERROR_CHARS characters, with the token cut out."""
    text = " ".join(redact(text, token).split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."
