"""OpenTelemetry tracing on a real server, spans caught by an in-memory exporter.

A span per RPC (unary and stream) with the caller's trace as parent, the SQL it sent as
children, the trace id in the access-log line, no spans for statements outside RPCs, and
the outbox push as a span of its own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.api.streams import watch
from tests.outbox.recorder import RECORDER_NETWORKS, NtfyRecorder
from tests.outbox.test_delivery import configure_ntfy
from tests.support import (
    Accounts,
    Connections,
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    access_line,
    start_server,
    stop_server,
    until,
)
from tests.support import test_config as make_config
from umbra_grpc.pb import connections_pb2
from umbra_grpc.reflection import SERVICE_NAME as REFLECTION_SERVICE
from umbra_grpc.telemetry import Tracing

pb = connections_pb2
SERVICE = "umbra.connections.v1.ConnectionService"
# A caller's W3C trace context: version, trace id, parent span id, flags (sampled).
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = ("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")
WAIT_SECONDS = 20.0


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str, exporter: InMemorySpanExporter) -> AsyncIterator[RunningServer]:
    tracing = Tracing(
        [SimpleSpanProcessor(exporter)], resource=Resource({"service.name": "umbra-test"})
    )
    config = make_config(database_url, ntfy_allowed_networks=RECORDER_NETWORKS)
    running = await start_server(config, tracing=tracing)
    try:
        yield running
    finally:
        await stop_server(running)


def hex_id(number: int, width: int) -> str:
    return format(number, f"0{width}x")


def rpc_spans(exporter: InMemorySpanExporter, method: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == f"{SERVICE}/{method}"]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    parent_id = parent.context.span_id
    return [
        span
        for span in exporter.get_finished_spans()
        if span.parent is not None and span.parent.span_id == parent_id
    ]


def one(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [span.name for span in spans]
    return spans[0]


async def test_a_call_is_a_server_span_with_its_sql_as_children(
    server: RunningServer,
    connections: Connections,
    new_user: NewUser,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender, receiver = await new_user(), await new_user()
    # Warm up: the sender's first call opens pooled connections and fills the caller cache.
    await connections.ListOutgoingRequests(pb.ListOutgoingRequestsRequest(), metadata=sender.md)
    exporter.clear()
    server.statements.reset()
    with caplog.at_level(logging.INFO, logger="umbra.access"):
        call = connections.SendRequest(
            pb.SendRequestRequest(umbral_name=receiver.handle),
            metadata=(*sender.md, TRACEPARENT),
        )
        await call
        trailers = dict(await call.trailing_metadata())

    span = one(rpc_spans(exporter, "SendRequest"))
    assert span.kind == SpanKind.SERVER
    assert hex_id(span.context.trace_id, 32) == CALLER_TRACE
    assert span.parent is not None and hex_id(span.parent.span_id, 16) == CALLER_SPAN
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert (attributes["rpc.service"], attributes["rpc.method"]) == (SERVICE, "SendRequest")
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert attributes["umbra.correlation_id"] == trailers["x-correlation-id"]
    assert span.status.status_code == StatusCode.UNSET

    sql = children(exporter, span)
    assert len(sql) == server.statements.count == 4, [s.name for s in sql]
    assert all(s.kind == SpanKind.CLIENT for s in sql)
    statements = [str((s.attributes or {}).get("db.statement")) for s in sql]
    assert statements[0].startswith("BEGIN") and statements[-1].startswith("COMMIT")
    # The transaction is tagged with the span's context, for the outbox row's push link.
    assert "umbra.traceparent" in statements[1]
    assert "umbra_send_request" in statements[2]

    [line] = [r for r in caplog.records if getattr(r, "method", "").endswith("/SendRequest")]
    assert access_line(line).trace_id == CALLER_TRACE


async def test_a_refused_call_is_not_a_server_error(
    server: RunningServer,
    connections: Connections,
    new_user: NewUser,
    exporter: InMemorySpanExporter,
) -> None:
    caller = await new_user()
    exporter.clear()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await connections.Respond(
            pb.RespondRequest(request_id=999_999, action=pb.RespondRequest.ACTION_ACCEPT),
            metadata=caller.md,
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    span = one(rpc_spans(exporter, "Respond"))
    attributes = dict(span.attributes or {})
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert span.status.status_code == StatusCode.UNSET
    # Without a caller's traceparent the span starts a trace of its own.
    assert span.parent is None


async def test_a_stream_span_lasts_as_long_as_the_stream(
    server: RunningServer,
    connections: Connections,
    new_user: NewUser,
    exporter: InMemorySpanExporter,
) -> None:
    me = await new_user()
    exporter.clear()
    call = watch(connections, me)
    synced = await call.read()
    assert isinstance(synced, connections_pb2.WatchIncomingRequestsResponse)
    assert synced.WhichOneof("event") == "synced"
    assert rpc_spans(exporter, "WatchIncomingRequests") == []
    call.cancel()
    await until(
        lambda: rpc_spans(exporter, "WatchIncomingRequests"),
        within=WAIT_SECONDS,
        what="the stream's span",
    )
    span = one(rpc_spans(exporter, "WatchIncomingRequests"))
    attributes = dict(span.attributes or {})
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert attributes["umbra.messages_sent"] == 1
    snapshot = children(exporter, span)
    assert snapshot, "the snapshot's SQL is a child of the stream's span"
    assert all(s.kind == SpanKind.CLIENT for s in snapshot)


async def test_a_generator_stream_is_traced_to_its_end(
    server: RunningServer, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    exporter.clear()
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")] * 2), timeout=10
    )
    assert len([reply async for reply in call]) == 2
    name = f"{REFLECTION_SERVICE}/ServerReflectionInfo"
    await until(
        lambda: any(span.name == name for span in exporter.get_finished_spans()),
        within=WAIT_SECONDS,
        what=f"a {name} span",
    )
    span = one([span for span in exporter.get_finished_spans() if span.name == name])
    attributes = dict(span.attributes or {})
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert attributes["umbra.messages_sent"] == 2
    assert "Failed to detach context" not in caplog.text


async def test_health_checks_make_no_traces(
    server: RunningServer, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    assert len([reply async for reply in call]) == 1
    # The reflection call's span is there, so the health check's would be by now.
    await until(exporter.get_finished_spans, within=WAIT_SECONDS, what="a finished span")
    assert [span.name for span in exporter.get_finished_spans()] == [
        f"{REFLECTION_SERVICE}/ServerReflectionInfo"
    ]


def traceparent_of(span: ReadableSpan) -> str:
    context = span.context
    flags = f"{context.trace_flags:02x}"
    return f"00-{hex_id(context.trace_id, 32)}-{hex_id(context.span_id, 16)}-{flags}"


def push_spans(exporter: InMemorySpanExporter, kind: str) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.name == "outbox push" and (span.attributes or {})["umbra.outbox.kind"] == kind
    ]


async def test_a_push_span_links_to_the_rpc_that_wrote_its_row(
    server: RunningServer,
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
    exporter: InMemorySpanExporter,
) -> None:
    sender, receiver = await new_user(), await new_user()
    for user in (sender, receiver):
        await configure_ntfy(accounts, admin, user, recorder.url)
    exporter.clear()
    sent = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=(*sender.md, TRACEPARENT)
    )
    await connections.Respond(
        pb.RespondRequest(request_id=sent.request.id, action=pb.RespondRequest.ACTION_ACCEPT),
        metadata=receiver.md,
    )
    # Each push (the request to the receiver, the acceptance to the sender) links to the
    # span of the RPC whose transaction wrote its row, whichever trace that is.
    for method, kind, user in (
        ("SendRequest", "request_received", receiver),
        ("Respond", "request_accepted", sender),
    ):
        rpc = one(rpc_spans(exporter, method))
        await until(
            functools.partial(push_spans, exporter, kind),
            within=WAIT_SECONDS,
            what=f"a {kind} push span",
        )
        push = one(push_spans(exporter, kind))
        assert push.context.trace_id != rpc.context.trace_id  # a trace of its own
        [link] = push.links
        assert link.context.trace_id == rpc.context.trace_id
        assert link.context.span_id == rpc.context.span_id
        stored = await sql.value(
            "SELECT traceparent FROM outbox WHERE user_id = $1 AND kind = $2", user.id, kind
        )
        assert stored == traceparent_of(rpc)
    assert hex_id(one(rpc_spans(exporter, "SendRequest")).context.trace_id, 32) == CALLER_TRACE


async def test_the_outbox_push_is_a_span_and_background_sql_makes_none(
    server: RunningServer,
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
    exporter: InMemorySpanExporter,
) -> None:
    sender, receiver = await new_user(), await new_user()
    topic = await configure_ntfy(accounts, admin, receiver, recorder.url)
    exporter.clear()
    await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
    )
    await recorder.wait_for(topic, 1)
    await until(
        lambda: any(span.name == "outbox push" for span in exporter.get_finished_spans()),
        within=WAIT_SECONDS,
        what="an outbox push span",
    )
    push = one([span for span in exporter.get_finished_spans() if span.name == "outbox push"])
    outbox_id = await sql.value(
        "SELECT id FROM outbox WHERE user_id = $1 ORDER BY id DESC LIMIT 1", receiver.id
    )
    attributes = dict(push.attributes or {})
    assert attributes["umbra.outbox.id"] == outbox_id
    assert attributes["umbra.outbox.kind"] == "request_received"
    assert attributes["umbra.user_id"] == receiver.id
    assert push.parent is None
    recorded = children(exporter, push)
    assert recorded and all(s.kind == SpanKind.CLIENT for s in recorded)
    # The worker's claim ran outside any span: no SQL span without a parent, ever.
    orphans = [s.name for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert all(
        s.parent is not None for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT
    ), orphans
