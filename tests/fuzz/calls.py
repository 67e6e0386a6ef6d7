"""Sending one fuzzed call of any shape, and recording what came back.

Calls go through generic multicallables built from the method's path and message classes
(raw bytes through ones without serializers), so the client needs no generated stub. Every
outcome is counted by method and status code; INTERNAL, UNKNOWN and a unary call that hit
its deadline are findings, each kept with a reproducer (seed, call number, caller, request in
text form). Successful responses feed `Known`, so later calls reuse real ids and tokens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from tests.fuzz.generator import Known, Method
from tests.rich import DETAILS_KEY

Metadata = tuple[tuple[str, str], ...]
FINDING_CODES = frozenset({"INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"})
UNARY_DEADLINE = 30.0
# A stream is read for at most this long, then cancelled by the client; its deadline is far
# beyond that, so DEADLINE_EXCEEDED on a stream means the server never answered.
STREAM_LINGER = 0.5
STREAM_DEADLINE = 30.0
CORRELATION_ID = "x-correlation-id"
REPRODUCER_CHARS = 3000


# How a stream ended: (code name, details, trailing metadata).
Ended = tuple[str, str, Any]


@dataclass(frozen=True)
class Caller:
    """Who a call claims to be: the metadata sent and how the fuzzer thinks of it."""

    label: str
    metadata: Metadata
    owner: str | None = None  # key of the caller's own known values
    valid_token: bool = False


@dataclass(frozen=True)
class Finding:
    """One outcome that must not happen, with what it takes to reproduce it."""

    index: int
    method: str
    caller: str
    code: str
    details: str
    correlation_id: str
    request: str

    def __str__(self) -> str:
        return (
            f"#{self.index} {self.method} as {self.caller}: {self.code} {self.details!r}"
            f" (correlation id {self.correlation_id or '-'})\n    request: {self.request}"
        )


@dataclass
class Record:
    """Everything the calls came back with."""

    outcomes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    # (method, ErrorInfo reason) of failed calls that carried one.
    reasons: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    # (method, value of the response's `request.status`) for successful calls that have one.
    statuses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    findings: list[Finding] = field(default_factory=list)
    calls: int = 0
    valid_token_calls: int = 0

    def ok(self, method: str) -> int:
        """Successful calls of one method."""
        return self.outcomes[(method, "OK")]

    def by_code(self) -> collections.Counter[str]:
        """Calls per status code, all methods together."""
        codes: collections.Counter[str] = collections.Counter()
        for (_, code), count in self.outcomes.items():
            codes[code] += count
        return codes


def describe(request: Message | bytes) -> str:
    """A request in text form (bytes in hex), cut to a readable length."""
    if isinstance(request, bytes):
        text = f"raw bytes {request.hex()}"
    else:
        # as_utf8=False: escaped, so bidi overrides and the like cannot garble the report.
        fields = text_format.MessageToString(request, as_one_line=True, as_utf8=False)
        text = f"{type(request).__name__} {{{fields}}}"
    if len(text) > REPRODUCER_CHARS:
        text = f"{text[:REPRODUCER_CHARS]}... ({len(text)} characters in all)"
    return text


class Client:
    """Sends calls over a few channels, round robin, and records them in `record`."""

    def __init__(self, channels: Sequence[grpc.aio.Channel], known: Known) -> None:
        self._channels = channels
        self._known = known
        self._callables: dict[tuple[int, str, str, bool], Any] = {}
        self._next = 0
        self.record = Record()

    def _callable(self, method: Method, *, raw: bool) -> Any:
        self._next = (self._next + 1) % len(self._channels)
        kind = ("stream" if method.client_streaming else "unary") + (
            "_stream" if method.server_streaming else "_unary"
        )
        key = (self._next, method.path, kind, raw)
        if key not in self._callables:
            factory: Callable[..., Any] = getattr(self._channels[self._next], kind)
            self._callables[key] = factory(
                method.path,
                request_serializer=None if raw else method.input.SerializeToString,
                response_deserializer=None if raw else method.output.FromString,
            )
        return self._callables[key]

    async def call(
        self,
        method: Method,
        request: Message | bytes,
        caller: Caller,
        *,
        index: int,
        reads: int = 1,
    ) -> Message | None:
        """One call of any shape; the response of a successful unary call, else None."""
        raw = isinstance(request, bytes)
        multicallable = self._callable(method, raw=raw)
        response: Message | None = None
        try:
            if method.client_streaming:
                code, details, trailers = await self._bidi(multicallable, request, caller, reads)
            elif method.server_streaming:
                code, details, trailers = await self._stream(multicallable, request, caller, reads)
            else:
                reply = await multicallable(
                    request, metadata=caller.metadata, timeout=UNARY_DEADLINE
                )
                code, details, trailers = "OK", "", ()
                # Damaged bytes can still make a valid request that changed something.
                response = method.output.FromString(reply) if raw else reply
        except grpc.aio.AioRpcError as error:
            code, details = error.code().name, error.details() or ""
            trailers = error.trailing_metadata() or ()
        self._count(method, caller, code, details, trailers, request, index)
        if response is not None:
            self._known.harvest(caller.owner or "", response)
            inner = getattr(response, "request", None)
            if isinstance(inner, Message) and hasattr(inner, "status"):
                self.record.statuses[(method.name, inner.status)] += 1
        return response

    async def _stream(self, multicallable: Any, request: Any, caller: Caller, reads: int) -> Ended:
        call = multicallable(request, metadata=caller.metadata, timeout=STREAM_DEADLINE)

        async def converse() -> None:
            for _ in range(reads):
                if not await self._take(call, caller):
                    return

        return await self._linger(call, converse())

    async def _bidi(self, multicallable: Any, request: Any, caller: Caller, reads: int) -> Ended:
        call = multicallable(metadata=caller.metadata, timeout=STREAM_DEADLINE)

        async def converse() -> None:
            # One message, then its answer, before the next: a client that writes on after
            # the server ended the call gets a client-side INTERNAL from grpc core.
            for _ in range(max(reads, 1)):
                await call.write(request)
                if not await self._take(call, caller):
                    return
            await call.done_writing()
            while await self._take(call, caller):
                pass

        return await self._linger(call, converse())

    async def _take(self, call: Any, caller: Caller) -> bool:
        """Reads one message (False at the end of the stream) and learns from it."""
        message = await call.read()
        if message is grpc.aio.EOF:
            return False
        if isinstance(message, Message):
            self._known.harvest(caller.owner or "", message)
        return True

    async def _linger(self, call: Any, conversation: Any) -> Ended:
        """Runs a conversation for a moment, then hangs up: (code, details, trailers)."""
        talking = asyncio.ensure_future(conversation)
        await asyncio.wait({talking}, timeout=STREAM_LINGER)
        hung_up = not call.done() and call.cancel()
        # Hanging up ends the conversation with whatever the next step raises.
        with contextlib.suppress(
            grpc.aio.AioRpcError, asyncio.CancelledError, asyncio.InvalidStateError
        ):
            await talking
        code = await call.code()
        if hung_up and code == grpc.StatusCode.CANCELLED:
            return "CANCELLED_BY_CLIENT", "", ()
        return code.name, await call.details() or "", await call.trailing_metadata() or ()

    def _count(
        self,
        method: Method,
        caller: Caller,
        code: str,
        details: str,
        trailers: Any,
        request: Message | bytes,
        index: int,
    ) -> None:
        record = self.record
        record.calls += 1
        record.valid_token_calls += caller.valid_token
        record.outcomes[(method.name, code)] += 1
        reason = _reason(trailers)
        if reason:
            record.reasons[(method.name, reason)] += 1
        if code in FINDING_CODES:
            correlation = next((v for k, v in trailers if k == CORRELATION_ID), "")
            record.findings.append(
                Finding(
                    index,
                    method.path,
                    caller.label,
                    code,
                    details,
                    str(correlation),
                    describe(request),
                )
            )


def _reason(trailers: Any) -> str:
    """The ErrorInfo reason in a call's rich status, if it has one."""
    for key, value in trailers:
        if key == DETAILS_KEY:
            info = error_details_pb2.ErrorInfo()
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Unpack(info):
                    return str(info.reason)
    return ""
