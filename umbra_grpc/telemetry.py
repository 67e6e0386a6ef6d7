"""OpenTelemetry for one server process (imported only when tracing is on: `tracing.py`).

What is traced:
- every RPC: a SERVER span named `package.Service/Method`, child of the caller's span when
  the call carries W3C `traceparent` metadata, ended when the call ends (for a stream, when
  the stream ends), with the gRPC status code; its trace id goes into the access-log line
  (`interceptors/tracing.py`);
- every SQL statement sent inside a span (BEGIN and COMMIT included), by the asyncpg
  instrumentation, as a CLIENT child span holding the statement text (never its
  parameters). Statements outside any span (health probes, the LISTEN connection, outbox
  claims) make no spans: otherwise each probe would be a trace of its own;
- every outbox push: a span of its own trace, `outbox push`, with the outbox row's id, kind,
  attempt and user id, and the SQL that records its outcome as children, linked to the span
  of the RPC that wrote the row: every traced transaction sets `umbra.traceparent`
  (`traceparent`, through `Database.tag_transactions`) and the row keeps it (migration
  0005).

`Tracing` is given its span processors, so tests use an in-memory exporter and nothing global
is set; `exporting_to()` builds the production ones from the OTEL_* variables.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from umbra_grpc.interceptors.tracing import TracingInterceptor
from umbra_grpc.storage.outbox import ClaimedPush

DEFAULT_SERVICE_NAME: Final = "umbra-grpc"
_W3C: Final = TraceContextTextMapPropagator()
SCOPE: Final = "umbra_grpc"


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class Tracing:
    """The tracer providers of this process and what they instrument.

    Two providers share the span processors: RPC and outbox spans come from one sampled as
    OTEL_TRACES_SAMPLER says; SQL spans from one that samples `ParentBased(ALWAYS_OFF)`, i.e.
    only under a sampled span (a statement outside any RPC makes no span).
    """

    def __init__(self, processors: Sequence[SpanProcessor], *, resource: Resource) -> None:
        self.provider = TracerProvider(resource=resource)
        self._sql_provider = TracerProvider(
            resource=resource, sampler=ParentBased(ALWAYS_OFF), shutdown_on_exit=False
        )
        for processor in processors:
            self.provider.add_span_processor(processor)
            self._sql_provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer(SCOPE)
        self._instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]

    @classmethod
    def exporting_to(cls, exporters: Sequence[str]) -> Tracing:
        """Spans batched to each named exporter (`otlp`, `console`)."""
        return cls([BatchSpanProcessor(_exporter(name)) for name in exporters], resource=resource())

    def interceptor(self) -> TracingInterceptor:
        """The server interceptor making a span per RPC."""
        return TracingInterceptor(self._tracer)

    def start(self) -> None:
        """Instruments asyncpg (process-wide) so statements become child spans."""
        self._instrumentor.instrument(tracer_provider=self._sql_provider)

    def shutdown(self) -> None:
        """Stops instrumenting and sends the spans still buffered."""
        self._instrumentor.uninstrument()
        self.provider.shutdown()

    @staticmethod
    def traceparent() -> str | None:
        """The current span's W3C traceparent when it is sampled (a link to a trace nobody
        keeps leads nowhere), else None."""
        carrier: dict[str, str] = {}
        if trace.get_current_span().get_span_context().trace_flags.sampled:
            _W3C.inject(carrier)
        return carrier.get("traceparent")

    @contextlib.contextmanager
    def push_span(self, push: ClaimedPush) -> Iterator[None]:
        """Around one outbox push: sending it and recording the outcome."""
        attributes: dict[str, str | int] = {
            "umbra.outbox.id": push.id,
            "umbra.outbox.kind": push.kind,
            "umbra.outbox.attempt": push.attempt,
            "umbra.user_id": push.user_id,
        }
        # A root span (the worker's own context holds no RPC), linked to the writing RPC's.
        writer = trace.get_current_span(_W3C.extract({"traceparent": push.traceparent or ""}))
        links = (
            [trace.Link(writer.get_span_context())] if writer.get_span_context().is_valid else []
        )
        with self._tracer.start_as_current_span(
            "outbox push",
            context=otel_context.Context(),
            kind=trace.SpanKind.PRODUCER,
            attributes=attributes,
            links=links,
        ):
            yield


def resource() -> Resource:
    """The OTEL_* variables' resource, service.name `umbra-grpc` unless they name one."""
    detected = Resource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected
