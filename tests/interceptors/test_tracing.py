"""The tracing interceptor, alone, on a real grpc.aio server with raw-bytes handlers.

The handlers report the span that is current while they run, so the tests see that the
RPC's span is current in a unary handler and in every step of a generator stream, that a
stream's span ends with the stream, and that the status code lands on the span.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import raw_unary_stream, raw_unary_unary, until
from umbra_grpc.interceptors.handlers import Context
from umbra_grpc.interceptors.tracing import TracingInterceptor

SERVICE = "test.Traced"


def current_span_id() -> bytes:
    return trace.format_span_id(trace.get_current_span().get_span_context().span_id).encode()


async def unary(request: bytes, context: Context) -> bytes:
    if request == b"refuse":
        await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
    return current_span_id()


async def stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield current_span_id()


class Running:
    def __init__(self, server: grpc.aio.Server, port: int, exporter: InMemorySpanExporter):
        self.server = server
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.exporter = exporter

    async def span(self, method: str, within: float = 10.0) -> ReadableSpan:
        """The call's span, once it has ended: a refused call's span ends as its handler
        unwinds, which can be just after the client has its status."""
        [span] = await until(
            lambda: [
                s for s in self.exporter.get_finished_spans() if s.name == f"{SERVICE}/{method}"
            ],
            within=within,
            what=f"a span for {method}",
        )
        return span


@pytest_asyncio.fixture(loop_scope="session")
async def traced() -> AsyncIterator[Running]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = grpc.aio.server(interceptors=[TracingInterceptor(provider.get_tracer("test"))])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    running = Running(server, port, exporter)
    try:
        yield running
    finally:
        await running.channel.close()
        await server.stop(0)
        provider.shutdown()


def span_id(span: ReadableSpan) -> bytes:
    """The span's id as the test handlers send it back."""
    context = span.get_span_context()
    assert context is not None
    return trace.format_span_id(context.span_id).encode()


async def test_the_span_is_current_in_a_unary_handler(traced: Running) -> None:
    seen = await raw_unary_unary(traced.channel, f"/{SERVICE}/Unary")(b"", timeout=10)
    span = await traced.span("Unary")
    assert seen == span_id(span)
    assert span.kind == trace.SpanKind.SERVER
    assert (span.attributes or {})["rpc.grpc.status_code"] == 0


async def test_the_span_is_current_in_every_step_of_a_stream(traced: Running) -> None:
    call = raw_unary_stream(traced.channel, f"/{SERVICE}/Stream")(b"", timeout=10)
    seen = [message async for message in call]
    span = await traced.span("Stream")
    assert seen == [span_id(span)] * 3
    assert (span.attributes or {})["rpc.grpc.status_code"] == 0


async def test_a_server_error_marks_the_span(traced: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await raw_unary_unary(traced.channel, f"/{SERVICE}/Unary")(b"refuse", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    span = await traced.span("Unary")
    assert (span.attributes or {})["rpc.grpc.status_code"] == 14
    assert span.status.status_code == trace.StatusCode.ERROR
