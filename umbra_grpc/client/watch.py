"""`watch_incoming()`: WatchIncomingRequests that survives disconnects, each event once.

The server's stream (SPEC 5) sends every pending incoming request as `received`, then
`synced`, then live events. It ends UNAVAILABLE when the server shuts down or loses its event
feed, RESOURCE_EXHAUSTED `STREAM_TOO_SLOW` when the client fell behind, UNAUTHENTICATED
`TOKEN_EXPIRED` when the token ran out. `IncomingWatch` reopens the stream after each of those
(after an expired token only when the token comes from a provider and the stream had got as
far as `synced`, since a provider may hand out a fresh token), waiting a random time up to a
doubling ceiling ("full jitter") so that clients of a restarted server do not all come back
at once. Any other error ends the iteration by raising it.

What a consumer sees, across any number of reconnects:
- `received` once per request id (the snapshot after a reconnect repeats the requests still
  pending: those already yielded are dropped);
- at most one ending event per request id: `cancelled` or `resolved` from the server, or,
  for a request that was pending before a disconnect and is missing from the new snapshot,
  a `resolved` made by this client whose request has `status == STATUS_UNSPECIFIED`: it
  stopped being pending while the watch was away, and how (answered on another device,
  withdrawn by its sender, expired) is not known;
- `synced` after the first snapshot and again after every reconnect's snapshot: from there
  on, the requests yielded as `received` and not yet ended are exactly the server's pending
  set (also readable as `pending`), so a consumer keeping "received adds, cancelled/resolved
  removes" is in step with the server at every `synced` without knowing about reconnects;
- `heartbeat` as the server sends them (`in_sync` is False between a disconnect and the next
  `synced`).
A stream silent for longer than `stall_timeout` (no event, not even a heartbeat: a dead peer
behind a load balancer) is cancelled and reopened like one that ended UNAVAILABLE.
Ended requests are remembered (the last 10,000) to keep that promise across reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Final, Self

import grpc

from umbra_grpc.client.errors import error_reason
from umbra_grpc.pb import connections_pb2

_log = logging.getLogger("umbra_grpc.client")

pb = connections_pb2
Event = pb.WatchIncomingRequestsResponse
Stream = grpc.aio.UnaryStreamCall[pb.WatchIncomingRequestsRequest, Event]
OpenStream = Callable[[], Stream]
Jitter = Callable[[float], float]

REMEMBERED_ENDINGS: Final = 10_000
_ENDINGS: Final = ("cancelled", "resolved")


def full_jitter(ceiling: float) -> float:
    """A uniformly random wait in [0, ceiling]."""
    return random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not a secret


class _Stalled(Exception):
    """No event arrived within the stall timeout."""


class IncomingWatch:
    """An async iterator of `WatchIncomingRequestsResponse` that reconnects (module doc).

    Use it with `async with` (or call `aclose()`) so that the open stream is cancelled when
    the consumer stops early.
    """

    def __init__(
        self,
        open_stream: OpenStream,
        *,
        token_renews: bool,
        initial_backoff: float,
        max_backoff: float,
        stall_timeout: float | None,
        jitter: Jitter = full_jitter,
    ) -> None:
        self._open = open_stream
        self._token_renews = token_renews
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._stall_timeout = stall_timeout
        self._jitter = jitter
        self._pending: dict[int, pb.ConnectionRequest] = {}
        self._ended: OrderedDict[int, None] = OrderedDict()
        self._in_sync = False
        self.reconnects = 0
        """How many times the stream was reopened."""
        self._call: Stream | None = None
        self._closing = asyncio.Event()
        self._reading = False
        self._events = self._run()

    @property
    def in_sync(self) -> bool:
        """True from a `synced` until the stream is lost."""
        return self._in_sync

    @property
    def pending(self) -> Mapping[int, pb.ConnectionRequest]:
        """Requests yielded as `received` and not yet ended, by id (read-only view)."""
        return MappingProxyType(self._pending)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        self._reading = True
        try:
            return await self._events.__anext__()
        finally:
            self._reading = False

    async def aclose(self) -> None:
        """Stops watching: the open stream, if any, is cancelled. May be called from another
        task than the one iterating, which then sees the iteration end."""
        self._closing.set()
        if self._call is not None:
            self._call.cancel()
        if not self._reading:
            await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[Event, None]:
        failures = 0
        while True:
            call = self._call = self._open()
            snapshot: set[int] = set()
            synced = False
            try:
                while (event := await self._next(call)) is not None:
                    kind = event.WhichOneof("event")
                    if kind == "received":
                        request_id = event.received.id
                        if not synced:
                            snapshot.add(request_id)
                        if request_id in self._pending or request_id in self._ended:
                            continue
                        self._pending[request_id] = event.received
                        yield event
                    elif kind in _ENDINGS:
                        request_id = getattr(event, kind).id
                        if request_id in self._ended:
                            continue
                        self._end(request_id)
                        yield event
                    elif kind == "synced":
                        synced, failures = True, 0
                        for request_id in [i for i in self._pending if i not in snapshot]:
                            yield _left_pending(self._pending[request_id])
                            self._end(request_id)
                        self._in_sync = True
                        yield event
                    elif kind == "heartbeat":
                        yield event
                    # Anything else is a kind newer than this client: nothing to say about it.
                reason = "the stream ended"
            except grpc.aio.AioRpcError as error:
                if self._closing.is_set():
                    return
                if not self._may_reconnect(error, synced=synced):
                    raise
                reason = f"{error.code().name} {error_reason(error) or ''}".strip()
            except _Stalled:
                reason = f"no event for {self._stall_timeout}s"
            finally:
                call.cancel()
                self._in_sync = False
            if self._closing.is_set():
                return
            failures += 1
            self.reconnects += 1
            ceiling = min(self._max_backoff, self._initial_backoff * 2.0 ** min(failures - 1, 30))
            delay = self._jitter(ceiling)
            _log.info("watch_incoming reconnecting in %.2fs (%s)", delay, reason)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            if self._closing.is_set():
                return

    async def _next(self, call: Stream) -> Event | None:
        """The next message, None at a clean end or once closing; `_Stalled` after a silence
        too long."""
        try:
            async with asyncio.timeout(self._stall_timeout):
                message = await call.read()
        except TimeoutError:
            raise _Stalled from None
        except asyncio.CancelledError:
            # The call was cancelled by aclose() from another task, not this task.
            if self._closing.is_set() and not _task_cancelling():
                return None
            raise
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, Event)
        return message

    def _may_reconnect(self, error: grpc.aio.AioRpcError, *, synced: bool) -> bool:
        code = error.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return True
        reason = error_reason(error)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return reason == "STREAM_TOO_SLOW"
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return reason == "TOKEN_EXPIRED" and self._token_renews and synced
        return False

    def _end(self, request_id: int) -> None:
        self._pending.pop(request_id, None)
        self._ended[request_id] = None
        if len(self._ended) > REMEMBERED_ENDINGS:
            self._ended.popitem(last=False)


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _left_pending(request: pb.ConnectionRequest) -> Event:
    """The `resolved` event for a request that stopped being pending while disconnected."""
    ended = pb.ConnectionRequest()
    ended.CopyFrom(request)
    ended.status = pb.ConnectionRequest.STATUS_UNSPECIFIED
    ended.ClearField("resolve_time")
    return Event(resolved=ended)
