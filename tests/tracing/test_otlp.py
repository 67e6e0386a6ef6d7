"""Traces reach a collector over OTLP/gRPC, configured by the standard variables only.

The collector is a real OTLP TraceService receiver (opentelemetry-proto's stubs) on a free
port; the server's Tracing is built by `tracing.from_environment` exactly as `serve` does.
"""

# ruff: noqa: N802 - the receiver's method is named as the RPC.

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.support import Connections, NewUser, RunningServer, start_server, stop_server, until
from tests.support import test_config as make_config
from umbra_grpc import tracing
from umbra_grpc.pb import connections_pb2

pb = connections_pb2
WAIT_SECONDS = 20.0


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, with the resource it came from."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((resource, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.aio.server()
    # opentelemetry-proto ships a .pyi for its messages but none for its _grpc modules.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        receiver, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(
    database_url: str, collector: tuple[Collector, int]
) -> AsyncIterator[RunningServer]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector[1]}",
        "OTEL_SERVICE_NAME": "umbra-otlp-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        traced = tracing.from_environment()
        assert traced is not None
    running = await start_server(make_config(database_url), tracing=traced)
    try:
        yield running
    finally:
        await stop_server(running)


async def test_spans_reach_the_collector(
    server: RunningServer,
    connections: Connections,
    new_user: NewUser,
    collector: tuple[Collector, int],
) -> None:
    receiver, _ = collector
    me = await new_user()
    await connections.ListConnections(pb.ListConnectionsRequest(), metadata=me.md)
    name = "umbra.connections.v1.ConnectionService/ListConnections"
    await until(
        lambda: any(span.name == name for _, span in receiver.spans),
        within=WAIT_SECONDS,
        what="a span at the collector",
        every=0.05,
    )
    [(resource, span)] = [(r, s) for r, s in receiver.spans if s.name == name]
    assert resource["service.name"] == "umbra-otlp-test"
    children = [s for _, s in receiver.spans if s.parent_span_id == span.span_id]
    assert children, "the call's SQL travelled with it"
