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
- `Rejected`: anything else (other 4xx, 3xx, a URL or header that cannot be sent, a
  destination the SSRF rule refuses). Sending it again would get the same answer, so the row
  is dead-lettered at once.
Error texts are short, hold at most a bounded snippet of the response body, and never the
token or the topic (they are cut out of any text that might echo them).

Where the client may connect (SPEC 10.4, `umbra_grpc.destinations`): the server URL's form is
checked before each send, and the connection pool connects through `VettedNetwork`, which
resolves the host once, judges every address and connects to one of exactly those. httpx
takes no network backend of its own (encode/httpx discussion 3180), so `VettedTransport` is
httpx's transport with its connection pool rebuilt over that backend; TLS still verifies
the certificate for the URL's name (httpcore hands it to the handshake as server_hostname),
and the Host header is the URL's. The client ignores the environment (no proxy, no netrc).

Logs (SPEC 10.5): the topic is a password on ntfy, and httpx logs every request's full URL
at INFO; `new_client` cuts that URL to its origin (scheme, host, port) before any handler
sees the record, and keeps httpcore's DEBUG trace off (it quotes response headers verbatim,
and a `Location` can hold the topic).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote

import httpcore
import httpx

from umbra_grpc.config import Config
from umbra_grpc.destinations import Destinations, ForbiddenDestination, parse

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


class VettedNetwork(httpcore.AsyncNetworkBackend):
    """Connects only to addresses `destinations` allows, resolving each name once."""

    def __init__(
        self, destinations: Destinations, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._destinations = destinations
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """A connection to a judged address of `host` (ForbiddenDestination otherwise)."""
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._destinations.addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout("name resolution timed out") from None
        except OSError as error:
            raise httpcore.ConnectError(f"name does not resolve ({error})") from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error
        assert failure is not None  # `addresses` is never empty
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Never: a push goes to a host."""
        raise ForbiddenDestination("a unix socket is no push destination")

    async def sleep(self, seconds: float) -> None:
        """The inner backend's sleep."""
        await self._inner.sleep(seconds)


class VettedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport, its connection pool connecting through `VettedNetwork`."""

    def __init__(
        self,
        destinations: Destinations,
        *,
        limits: httpx.Limits,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        tls = httpx.create_ssl_context(verify=verify, trust_env=False)
        super().__init__(verify=tls, limits=limits, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=VettedNetwork(destinations),
        )


class _OriginOnly(logging.Filter):
    """Cuts every URL in a record's arguments to its origin: the path holds the topic."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                f"{arg.scheme}://{arg.netloc.decode('ascii')}/..."
                if isinstance(arg, httpx.URL)
                else arg
                for arg in record.args
            )
        return True


def keep_secrets_out_of_http_logs() -> None:
    """httpx's request lines show origins only; httpcore's trace stays off (idempotent)."""
    httpx_logger = logging.getLogger("httpx")
    if not any(isinstance(known, _OriginOnly) for known in httpx_logger.filters):
        httpx_logger.addFilter(_OriginOnly())
    logging.getLogger("httpcore").setLevel(logging.INFO)


def new_client(
    config: Config, destinations: Destinations, *, verify: ssl.SSLContext | bool = True
) -> httpx.AsyncClient:
    """The process's HTTP client: vetted destinations, bounded time per phase, bounded
    connections, no redirects, no secrets in its logs. `verify` is what TLS trusts (the
    system's CAs by default)."""
    keep_secrets_out_of_http_logs()
    connections = max(1, config.outbox_batch_size)
    limits = httpx.Limits(
        max_connections=connections,
        max_keepalive_connections=min(connections, 10),
        keepalive_expiry=30.0,
    )
    return httpx.AsyncClient(
        transport=VettedTransport(destinations, limits=limits, verify=verify),
        timeout=httpx.Timeout(config.ntfy_timeout_seconds),
        follow_redirects=False,
        trust_env=False,
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
    secrets = (token, topic)
    try:
        parse(server_url)  # saved before the rule, or written around it
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
    except ForbiddenDestination as error:
        return Rejected(f"destination refused: ntfy server URL {error}")
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
        return Retry(short(f"{type(error).__name__}: {error}", *secrets))
    return classify(response.status_code, response.headers.get("Retry-After"), head, *secrets)


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


def classify(status: int, retry_after: str | None, body: str, *secrets: str | None) -> Result:
    """What an HTTP answer (status, Retry-After header, start of the body) means for the row.

    `secrets` (the token, the topic) are cut out of the error text.
    """
    if 200 <= status < 300:
        return Delivered(status)
    # The secrets are cut out of the whole body read before the snippet is taken, so a
    # snippet can never end in a piece of one.
    snippet = redact(body, *secrets)[:BODY_SNIPPET_CHARS]
    error = short(f"HTTP {status}: {snippet}", *secrets)
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


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every occurrence of each secret replaced (the longest first)."""
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return text


def short(text: str, *secrets: str | None) -> str:
    """One line of at most ERROR_CHARS characters, with the secrets cut out."""
    text = " ".join(redact(text, *secrets).split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."
