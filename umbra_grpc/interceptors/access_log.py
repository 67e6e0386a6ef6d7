"""Access log, the outermost interceptor: one structured line per RPC, and error hygiene.

The line (logger `umbra.access`, INFO) carries `method`, `caller` (filled in by the auth
interceptor through `call_record.current_call`), `peer` (`x-forwarded-for` believed only from
UMBRA_TRUSTED_PROXIES), `code`, `duration_ms` and `correlation_id`; stream lines add
`events_sent` and are written when the stream ends, not when its handler returns. Calls to
paths no service serves are logged and counted as method `unknown`. With tracing on,
`trace_id` is the OpenTelemetry trace of the call.

Every call gets a correlation id (uuid4 hex), sent back as trailing metadata
`x-correlation-id` whatever the outcome: inner layers see the context through a thin proxy
that adds it to every status they end the call with.

Hardening (grpc.aio's defaults leak internals, SPEC 4.1):
- An exception other than `grpc.aio.AbortError` is logged at ERROR with its traceback and the
  correlation id, and the call ends INTERNAL (reason INTERNAL) with a message that quotes only
  the correlation id: no exception text reaches the client. AbortError always propagates
  unchanged; so does `asyncio.CancelledError` (the line then says CANCELLED).
- Request bytes that do not decode would get UNKNOWN with the parser's message; the request
  deserializer is replaced by one that turns any failure into a sentinel, answered
  INVALID_ARGUMENT (reason MALFORMED_REQUEST) before anything inner runs.
- `NotImplementedError` is what a generated servicer base class raises for a method nobody
  implemented (grpcio-health-checking's aio servicer has no `Health/List`, for one): UNIMPLEMENTED
  (reason UNIMPLEMENTED), as grpc.aio would answer, logged at INFO only. Anyone may call health,
  so an ERROR line with a traceback per call would be log spam on demand.
- `grpc.aio.InternalError` (grpc core refused to send a message or the status: the client hung
  up while the call was being answered, say mid-abort) means nobody is left to answer: the call
  ends as a cancelled one (line code CANCELLED), not as an INTERNAL error with a traceback, and
  no second status is attempted (grpc would log that at ERROR too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, NoReturn, cast

import grpc

from umbra_grpc.call_record import CallRecord, current_call
from umbra_grpc.interceptors.handlers import (
    Context,
    Continuation,
    Deserializer,
    Handler,
    Inside,
    reset,
    wrap_around,
)
from umbra_grpc.peer import Network, client_address
from umbra_grpc.rpc_errors import error_status

access_logger = logging.getLogger("umbra.access")
logger = logging.getLogger(__name__)

CORRELATION_ID_KEY: Final = "x-correlation-id"
FORWARDED_FOR_KEY: Final = "x-forwarded-for"
MALFORMED_MESSAGE: Final = "request could not be decoded"
UNKNOWN_METHOD: Final = "unknown"
"""The method label of calls to paths no service serves (SPEC 10.1)."""

Clock = Callable[[], float]
NewId = Callable[[], str]
# Told of every finished call: (method, status code name, duration in seconds).
Sink = Callable[[str, str, float], None]


class _Undecodable:
    """What the guarded deserializer returns for bytes the real one could not decode."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<undecodable request>"


UNDECODABLE: Final = _Undecodable()


def _new_correlation_id() -> str:
    return uuid.uuid4().hex


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """Logs one line per RPC; maps unexpected exceptions and undecodable requests.

    `trusted_proxies` (from `peer.parse_networks`) are the peers whose `x-forwarded-for` is
    believed. `clock` measures durations; `new_id` makes correlation ids; `sink`, when given,
    is told of every finished call (the metrics endpoint counts calls and latencies with it).
    """

    def __init__(
        self,
        trusted_proxies: Sequence[Network] = (),
        *,
        clock: Clock = time.perf_counter,
        new_id: NewId = _new_correlation_id,
        sink: Sink | None = None,
    ) -> None:
        self._trusted = tuple(trusted_proxies)
        self._clock = clock
        self._new_id = new_id
        self._sink = sink

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        started = self._clock()
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:
            # grpc.aio answers UNIMPLEMENTED itself. The path is the caller's to choose, and
            # no token is needed to send one: it is counted and logged as one label, never as
            # a metrics series of its own (1,000 random paths must not grow the process).
            record = CallRecord(UNKNOWN_METHOD, self._new_id(), None, started)
            self._write(record, grpc.StatusCode.UNIMPLEMENTED, streaming=False)
            return None
        request_streaming = handler.request_streaming
        response_streaming = handler.response_streaming
        forwarded_for = _forwarded_for(handler_call_details.invocation_metadata)

        def begin(context: Context) -> tuple[CallRecord, Context]:
            record = CallRecord(
                method,
                self._new_id(),
                client_address(context.peer(), forwarded_for, self._trusted),
                started,
            )
            context.set_trailing_metadata(((CORRELATION_ID_KEY, record.correlation_id),))
            return record, cast(Context, _CorrelatedContext(context, record))

        @contextlib.asynccontextmanager
        async def logged(request: Any, context: Context, stream: bool) -> AsyncIterator[Inside]:
            record, inner = begin(context)
            token = current_call.set(record)
            code = grpc.StatusCode.OK
            ended = _STREAM_ENDED if stream else _CANCELLED
            try:
                if request is UNDECODABLE:
                    await _abort(context, record, *_MALFORMED)
                if request_streaming:
                    request = _decoded(request, context, record)
                yield Inside(request, inner, record.count_sent)
                code = _code(context)
            except grpc.aio.AbortError:
                code = _code(context)
                raise
            except ended:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code = _failure_code(error, context)
                await self._fail(context, record, code)
            finally:
                reset(current_call, token, stream=stream)
                # A stream may be served by a coroutine writing through the context.
                self._write(record, code, streaming=response_streaming)

        deserializer = handler.request_deserializer
        return wrap_around(
            handler,
            logged,
            request_deserializer=_guarded(deserializer) if deserializer is not None else None,
        )

    async def _fail(self, context: Context, record: CallRecord, code: grpc.StatusCode) -> NoReturn:
        """Ends the call after the exception being handled, as `_failure_code` judged it:
        let go (CANCELLED), UNIMPLEMENTED, or INTERNAL quoting only the correlation id, with
        the exception logged at ERROR."""
        if code == grpc.StatusCode.CANCELLED:
            # The client is gone: the call cannot be ended again, only let go.
            raise asyncio.CancelledError
        if code == grpc.StatusCode.UNIMPLEMENTED:
            await _abort(context, record, *_UNIMPLEMENTED)
        logger.error(
            "unhandled exception in %s (correlation id %s)",
            record.method,
            record.correlation_id,
            exc_info=True,
            extra={"method": record.method, "correlation_id": record.correlation_id},
        )
        await _abort(
            context, record, "INTERNAL", f"internal error (correlation id {record.correlation_id})"
        )

    def _write(self, record: CallRecord, code: grpc.StatusCode, *, streaming: bool) -> None:
        seconds = self._clock() - record.started
        if self._sink is not None:
            self._sink(record.method, code.name, seconds)
        if not access_logger.isEnabledFor(logging.INFO):
            return
        duration_ms = round(seconds * 1000, 3)
        fields: dict[str, Any] = {
            "method": record.method,
            "caller": record.caller,
            "peer": record.peer,
            "code": code.name,
            "duration_ms": duration_ms,
            "correlation_id": record.correlation_id,
        }
        if streaming:
            fields["events_sent"] = record.events_sent
        if record.trace_id is not None:
            fields["trace_id"] = record.trace_id
        access_logger.info("%s %s %.3fms", record.method, code.name, duration_ms, extra=fields)


class _CorrelatedContext:
    """The servicer context as inner layers see it: every status keeps `x-correlation-id`.

    grpc.aio replaces the trailing metadata set before an abort with the abort's own (the
    rich status details), so the id is appended there too. Writes are counted for streams
    whose handler writes through the context instead of yielding.
    """

    __slots__ = ("_context", "_record")

    def __init__(self, context: Context, record: CallRecord) -> None:
        self._context = context
        self._record = record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self._context.set_trailing_metadata(_with_correlation_id(trailing_metadata, self._record))

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> NoReturn:
        # With no metadata grpc.aio keeps what was set before, which already holds the id.
        metadata = (
            _with_correlation_id(trailing_metadata, self._record) if trailing_metadata else ()
        )
        await self._context.abort(code, details, metadata)
        raise AssertionError("abort returned")  # pragma: no cover

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self.abort(status.code, status.details, status.trailing_metadata)

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._record.events_sent += 1

    async def read(self) -> Any:
        message = await self._context.read()
        if message is UNDECODABLE:
            await _abort(self._context, self._record, *_MALFORMED)
        return message


_MALFORMED: Final = ("MALFORMED_REQUEST", MALFORMED_MESSAGE)
# What ends a call as CANCELLED with nobody left to answer. A stream that yields may also be
# closed (GeneratorExit): abandoned (client gone) while its message was being written, and
# closed by the event loop afterwards.
_CANCELLED: Final = (asyncio.CancelledError,)
_STREAM_ENDED: Final = (asyncio.CancelledError, GeneratorExit)
_UNIMPLEMENTED: Final = ("UNIMPLEMENTED", "method not implemented")


def _failure_code(error: Exception, context: Context) -> grpc.StatusCode:
    """How a call that raised `error` ends (see the module docstring)."""
    # grpc.aio.InternalError: core failed a batch on this call, which is over for the client.
    if context.cancelled() or isinstance(error, grpc.aio.InternalError):
        return grpc.StatusCode.CANCELLED
    if isinstance(error, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.INTERNAL


async def _abort(context: Context, record: CallRecord, reason: str, message: str) -> NoReturn:
    status = error_status(reason, message)
    metadata = _with_correlation_id(status.trailing_metadata, record)
    await context.abort(status.code, status.details, metadata)
    raise AssertionError("abort returned")  # pragma: no cover


def _with_correlation_id(
    metadata: Sequence[tuple[str, Any]], record: CallRecord
) -> tuple[tuple[str, Any], ...]:
    items = tuple(metadata)
    if any(key == CORRELATION_ID_KEY for key, _ in items):
        return items
    return (*items, (CORRELATION_ID_KEY, record.correlation_id))


def _guarded(deserializer: Deserializer) -> Deserializer:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            # protobuf's DecodeError or anything else: the client sent bytes we cannot read.
            return UNDECODABLE

    return deserialize


async def _decoded(
    requests: AsyncIterator[Any], context: Context, record: CallRecord
) -> AsyncIterator[Any]:
    """A request stream that ends the call INVALID_ARGUMENT at the first undecodable message."""
    async for request in requests:
        if request is UNDECODABLE:
            await _abort(context, record, *_MALFORMED)
        yield request


def _code(context: Context) -> grpc.StatusCode:
    # grpc.aio's ServicerContext.code() is None until a code is set or the call aborts.
    code: grpc.StatusCode | None = context.code()
    return grpc.StatusCode.OK if code is None else code


def _forwarded_for(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    values = [
        value
        for key, value in metadata or ()
        if key == FORWARDED_FOR_KEY and isinstance(value, str)
    ]
    # Several headers count as one comma-joined list (RFC 9110 section 5.3).
    return ",".join(values) if values else None
