"""Tracing: one OpenTelemetry SERVER span per RPC (only in the chain when tracing is on).

It sits right inside the access log, so the span covers auth, rate limit, timing floor and
the handler, and the access log's `CallRecord` (`call_record.current_call`) is there to take
the span's trace id (written into the access-log line) and give its correlation id (a span
attribute). The caller's W3C trace context (`traceparent` metadata), when sent, becomes the
span's parent. A stream's span ends when the stream does, not when its handler returns; the
span is current only while the handler runs (for a stream, during each step that produces a
message), so the SQL the handler sends becomes its children, and nothing leaks into the
context of whoever iterates the stream.

Health checks are not traced (a trace every few seconds per load balancer says nothing).

Span status follows the OpenTelemetry conventions for gRPC servers: ERROR for UNKNOWN,
DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS, unset for the others
(a refusal is the caller's business, not a fault). An unexpected exception is recorded by
type only (its text may hold SQL); the access log has the traceback under the correlation id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Final, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from umbra_grpc.call_record import current_call
from umbra_grpc.interceptors.handlers import (
    Context,
    Continuation,
    Handler,
    StreamBehavior,
    UnaryBehavior,
    wrap_handler,
)

# Load balancers and orchestrators ask for health every few seconds: a trace each is noise.
UNTRACED_PREFIXES: Final = ("/grpc.health.v1.Health/",)
SERVER_ERRORS: Final = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Starts a span per call with `tracer` and ends it when the call ends."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNTRACED_PREFIXES):
            return handler
        name = handler_call_details.method.lstrip("/")
        service, _, method = name.rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        carrier = _carrier(handler_call_details.invocation_metadata)
        streaming = handler.response_streaming

        def begin() -> trace.Span:
            span = self._tracer.start_span(
                name,
                context=propagate.extract(carrier),
                kind=trace.SpanKind.SERVER,
                attributes=attributes,
            )
            record = current_call.get()
            span_context = span.get_span_context()
            if record is not None:
                span.set_attribute("umbra.correlation_id", record.correlation_id)
                if span_context.is_valid:
                    record.trace_id = trace.format_trace_id(span_context.trace_id)
            return span

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def traced(request: Any, context: Context) -> Any:
                span = begin()
                token = otel_context.attach(trace.set_span_in_context(span))
                code = grpc.StatusCode.OK
                try:
                    response = await behavior(request, context)
                    code = _code(context)
                    return response
                except BaseException as error:
                    code = _failed(error, context, span)
                    raise
                finally:
                    otel_context.detach(token)
                    _end(span, code, streaming=streaming)

            return traced

        def stream(behavior: StreamBehavior) -> StreamBehavior:
            async def traced(request: Any, context: Context) -> AsyncIterator[Any]:
                span = begin()
                current = trace.set_span_in_context(span)
                # wrap_handler hands streams over only when they are async generators.
                responses = cast(AsyncGenerator[Any, None], behavior(request, context))
                code = grpc.StatusCode.OK
                try:
                    async with contextlib.aclosing(responses):
                        while True:
                            token = otel_context.attach(current)
                            try:
                                response = await anext(responses)
                            except StopAsyncIteration:
                                break
                            finally:
                                otel_context.detach(token)
                            yield response
                    code = _code(context)
                except BaseException as error:
                    code = _failed(error, context, span)
                    raise
                finally:
                    _end(span, code, streaming=True)

            return traced

        return wrap_handler(handler, unary=unary, stream=stream)


def _carrier(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {key: value for key, value in metadata or () if isinstance(value, str)}


def _code(context: Context) -> grpc.StatusCode:
    # grpc.aio's ServicerContext.code() is None until a code is set or the call aborts.
    code: grpc.StatusCode | None = context.code()
    return grpc.StatusCode.OK if code is None else code


def _failed(error: BaseException, context: Context, span: trace.Span) -> grpc.StatusCode:
    """The status a call ending with `error` gets (the access log, outside, answers
    INTERNAL for an unexpected exception)."""
    if isinstance(error, grpc.aio.AbortError):
        return _code(context)
    if isinstance(error, asyncio.CancelledError | GeneratorExit) or context.cancelled():
        return grpc.StatusCode.CANCELLED
    span.set_attribute("error.type", type(error).__qualname__)
    return grpc.StatusCode.INTERNAL


def _end(span: trace.Span, code: grpc.StatusCode, *, streaming: bool) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    record = current_call.get()
    if streaming and record is not None:
        # Counted by the access log, whichever way the handler sends (yield or write).
        span.set_attribute("umbra.messages_sent", record.events_sent)
    if code in SERVER_ERRORS:
        span.set_status(trace.StatusCode.ERROR, code.name)
    span.end()
