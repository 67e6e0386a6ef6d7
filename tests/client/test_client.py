"""UmbraClient's table, channel config, retries, keys, tokens and deadlines.

The table is checked against the service descriptor. Retries, idempotency keys, token
rotation and deadlines are checked on the wire, against a real grpc.aio server answering from
a script (`scripted.py`): the real service cannot be made to fail UNAVAILABLE on cue.
"""

from __future__ import annotations

import functools
import re
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tests.client.scripted import ScriptedServer
from umbra_grpc.client import IDEMPOTENCY_KEY_HEADER, UmbraClient, error_reason
from umbra_grpc.client.rpc import SERVICE, Rpc, rpcs_of, service_config
from umbra_grpc.pb import connections_pb2

# Streaming RPCs and the client method that serves each.
STREAMING = {"WatchIncomingRequests": "watch_incoming"}
# AIP standard methods that only read; every other RPC changes something.
READ_PREFIXES = ("Get", "List", "Search")


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_every_rpc_has_a_client_method() -> None:
    service = connections_pb2.DESCRIPTOR.services_by_name["ConnectionService"]
    unary = [method for method in service.methods if not method.server_streaming]
    for method in service.methods:
        if method.server_streaming:
            assert method.name in STREAMING, f"no client method for stream {method.name}"
            assert callable(getattr(UmbraClient, STREAMING[method.name]))
            continue
        rpc = vars(UmbraClient).get(snake(method.name))
        assert isinstance(rpc, Rpc), f"UmbraClient has no {snake(method.name)} for {method.name}"
        assert rpc.name == method.name
        request = rpc.request  # the message class, typed as the callable that builds it
        assert isinstance(request, type) and issubclass(request, Message)
        assert request.DESCRIPTOR is method.input_type
        assert rpc.response.DESCRIPTOR is method.output_type
        assert rpc.write is not method.name.startswith(READ_PREFIXES), method.name
    assert sorted(rpc.name for rpc in rpcs_of(UmbraClient)) == sorted(m.name for m in unary)


def retried_methods(config: dict[str, Any]) -> set[str]:
    methods: set[str] = set()
    for entry in config["methodConfig"]:
        assert entry["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
        methods.update(name["method"] for name in entry["name"] if name["service"] == SERVICE)
    return methods


def test_service_config_retries_reads_and_writes_only_when_asked() -> None:
    rpcs = rpcs_of(UmbraClient)
    reads = {rpc.name for rpc in rpcs if not rpc.write}
    configured = functools.partial(
        service_config, rpcs, attempts=4, initial_backoff=0.1, max_backoff=1.0
    )
    assert retried_methods(configured(write_retries=False)) == reads
    everything = configured(write_retries=True)
    assert retried_methods(everything) == {rpc.name for rpc in rpcs}
    assert everything["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}
    assert (
        service_config(rpcs, write_retries=True, attempts=1, initial_backoff=0.1, max_backoff=1)[
            "methodConfig"
        ]
        == []
    )
    with pytest.raises(ValueError, match="attempts must be 1-5"):
        service_config(rpcs, write_retries=False, attempts=6, initial_backoff=0.1, max_backoff=1)


async def test_reads_are_retried_on_unavailable(scripted: ScriptedServer) -> None:
    scripted.script.unavailable_first = 2
    async with UmbraClient(scripted.target, "t") as client:
        reply = await client.search(umbral_name="bob")
    assert reply.found is True
    assert len(scripted.script.seen("Search")) == 3


async def test_writes_are_not_retried_when_switched_off(scripted: ScriptedServer) -> None:
    scripted.script.unavailable_first = 1
    async with UmbraClient(scripted.target, "t", write_retries=False) as client:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.send_request(umbral_name="bob")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(failed.value) == "STORAGE_BUSY"
    [attempt] = scripted.script.seen("SendRequest")
    key = attempt[IDEMPOTENCY_KEY_HEADER]
    assert isinstance(key, str)
    assert uuid.UUID(key)


async def test_writes_are_retried_by_default_under_one_key_per_call(
    scripted: ScriptedServer,
) -> None:
    scripted.script.unavailable_first = 2
    async with UmbraClient(scripted.target, "t") as client:
        reply = await client.send_request(umbral_name="bob")
        assert reply.request.receiver_umbral_name == "bob"
        await client.send_request(umbral_name="bob")
    keys = [attempt[IDEMPOTENCY_KEY_HEADER] for attempt in scripted.script.seen("SendRequest")]
    assert len(keys) == 4
    assert len(set(keys[:3])) == 1, "the retries of one call share its key"
    assert keys[3] != keys[0], "another call gets another key"


async def test_reads_carry_no_key_and_callers_may_bring_theirs(
    scripted: ScriptedServer,
) -> None:
    async with UmbraClient(scripted.target, "t") as client:
        await client.search(umbral_name="x")
        await client.with_options(idempotency_key="order-42_a").send_request(umbral_name="x")
        with pytest.raises(ValueError, match="1-64 characters"):
            client.with_options(idempotency_key="no spaces")
        with pytest.raises(ValueError, match="1-64 characters"):
            client.with_options(idempotency_key="k" * 65)
    [search] = scripted.script.seen("Search")
    assert IDEMPOTENCY_KEY_HEADER not in search
    assert scripted.script.seen("SendRequest")[0][IDEMPOTENCY_KEY_HEADER] == "order-42_a"


async def test_the_token_provider_is_asked_for_every_call(scripted: ScriptedServer) -> None:
    tokens = iter(["first", "second", "third"])
    async with UmbraClient(scripted.target, lambda: next(tokens)) as client:
        await client.search(umbral_name="x")
        await client.send_request(umbral_name="x")
        await client.search(umbral_name="x")
    sent = [
        attempt["authorization"]
        for method in ("Search", "SendRequest")
        for attempt in scripted.script.seen(method)
    ]
    assert sorted(sent) == ["Bearer first", "Bearer second", "Bearer third"]


async def test_calls_have_a_default_deadline(scripted: ScriptedServer) -> None:
    async with UmbraClient(scripted.target, "t", timeout=0.3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.list_connections(page_size=5)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as shorter:
            await client.with_options(timeout=0.05).list_connections()
        assert shorter.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.aio.AioRpcError) as kept:
            await client.with_options(idempotency_key="k").list_connections()
        assert kept.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The two 0.3 s calls reached the server and were cut there by their deadline (the server
    # answers after SLOW_SECONDS). The 50 ms one may expire before its handler runs at all on
    # a loaded machine, so it is not counted (failed once in five loaded runs).
    assert len(scripted.script.seen("ListConnections")) >= 2


async def test_the_callers_trace_goes_with_the_call(scripted: ScriptedServer) -> None:
    tracer = TracerProvider().get_tracer("test")
    async with UmbraClient(scripted.target, "t") as client:
        await client.search(umbral_name="x")
        with tracer.start_as_current_span("caller") as span:
            await client.search(umbral_name="x")
    untraced, traced = scripted.script.seen("Search")
    assert "traceparent" not in untraced
    trace_id = trace.format_trace_id(span.get_span_context().trace_id)
    traceparent = traced["traceparent"]
    assert isinstance(traceparent, str)
    assert traceparent.split("-")[1] == trace_id
