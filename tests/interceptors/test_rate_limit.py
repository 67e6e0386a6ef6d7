"""The rate limit, alone: a fake clock for the buckets, a real server for the error details."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tests.support import aio_unary, raw_unary_unary
from umbra_grpc.interceptors.handlers import Context, UnaryBehavior, wrap_handler
from umbra_grpc.interceptors.rate_limit import (
    DEFAULT_RATE_LIMITS,
    RATE_LIMITED,
    BucketSpec,
    RateLimitInterceptor,
    parse_rate_limits,
)
from umbra_grpc.principal import Principal, current_principal
from umbra_grpc.rpc_errors import ERROR_DOMAIN

SERVICE = "umbra.connections.v1.ConnectionService"
DETAILS_KEY = "grpc-status-details-bin"


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class FakeContext:
    """Keeps the status an abort would send; raises `AbortError` as grpc.aio does."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise grpc.aio.AbortError()


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


@contextlib.contextmanager
def calling_as(subject: str | None) -> Iterator[None]:
    principal = None if subject is None else Principal(subject, 1, frozenset(), 0.0)
    token = current_principal.set(principal)
    try:
        yield
    finally:
        current_principal.reset(token)


def limiter(
    limits: Mapping[str, BucketSpec], clock: FakeClock, max_buckets: int = 100_000
) -> RateLimitInterceptor:
    return RateLimitInterceptor(limits, clock=clock, max_buckets=max_buckets)


async def intercepted(
    interceptor: RateLimitInterceptor, method: str, handler: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any] | None:
    async def continuation(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        return handler

    return await interceptor.intercept_service(continuation, Details(f"/{SERVICE}/{method}"))


class Calls:
    """Calls one method through the interceptor and counts what reached the servicer."""

    def __init__(self, interceptor: RateLimitInterceptor, method: str) -> None:
        self.interceptor = interceptor
        self.method = method
        self.served = 0

    async def __call__(self, subject: str | None = "alice") -> grpc.Status | None:
        """None when served, else the refusal status."""

        async def servicer(request: bytes, context: Any) -> bytes:
            self.served += 1
            return b"ok"

        handler = await intercepted(
            self.interceptor, self.method, grpc.unary_unary_rpc_method_handler(servicer)
        )
        assert handler is not None
        context = FakeContext()
        with calling_as(subject):
            try:
                assert await aio_unary(handler)(b"", context) == b"ok"
            except grpc.aio.AbortError:
                assert context.status is not None
                return context.status
        return None


def refusal(status: grpc.Status) -> tuple[error_details_pb2.ErrorInfo, float]:
    """The ErrorInfo and the RetryInfo delay (seconds) carried by a refusal."""
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    [details] = [value for key, value in status.trailing_metadata if key == DETAILS_KEY]
    return unpack(status_pb2.Status.FromString(details))


def unpack(rich: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo, float]:
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    assert len(rich.details) == 2
    assert rich.details[0].Unpack(info)
    assert rich.details[1].Unpack(retry)
    return info, retry.retry_delay.ToTimedelta().total_seconds()


async def test_a_burst_is_allowed_then_refused_with_retry_info() -> None:
    clock = FakeClock()
    search = Calls(limiter({"Search": BucketSpec(burst=3, interval=2.0)}, clock), "Search")

    for _ in range(3):
        assert await search() is None
    status = await search()

    assert status is not None
    assert search.served == 3
    info, delay = refusal(status)
    assert info.reason == RATE_LIMITED
    assert info.domain == ERROR_DOMAIN
    assert delay == pytest.approx(2.0)
    assert "alice" not in status.details

    clock.now += 0.5
    status = await search()
    assert status is not None
    assert refusal(status)[1] == pytest.approx(1.5)
    assert search.interceptor.refusals == {"Search": 2}


async def test_tokens_come_back_over_time_up_to_the_burst() -> None:
    clock = FakeClock()
    search = Calls(limiter({"Search": BucketSpec(burst=3, interval=2.0)}, clock), "Search")
    for _ in range(3):
        await search()
    assert await search() is not None

    clock.now += 2.0
    assert await search() is None
    assert await search() is not None

    clock.now += 3600.0
    for _ in range(3):
        assert await search() is None
    assert await search() is not None
    assert search.served == 7


async def test_callers_and_methods_have_their_own_buckets() -> None:
    clock = FakeClock()
    interceptor = limiter(
        {"Search": BucketSpec(1, 60.0), "SendRequest": BucketSpec(1, 60.0)}, clock
    )
    search, send = Calls(interceptor, "Search"), Calls(interceptor, "SendRequest")

    assert await search("alice") is None
    assert await search("alice") is not None
    assert await search("bob") is None
    assert await send("alice") is None
    assert await send("alice") is not None


async def test_without_a_principal_calls_share_the_empty_subject() -> None:
    search = Calls(limiter({"Search": BucketSpec(1, 60.0)}, FakeClock()), "Search")

    assert await search(None) is None
    assert await search(None) is not None
    assert await search("") is not None  # the same bucket
    assert await search("alice") is None


async def test_defaults_limit_search_and_send_request() -> None:
    clock = FakeClock()
    interceptor = RateLimitInterceptor(clock=clock)
    search, send = Calls(interceptor, "Search"), Calls(interceptor, "SendRequest")

    for _ in range(20):
        assert await search() is None
    status = await search()
    assert status is not None
    assert refusal(status)[1] == pytest.approx(1.0)

    for _ in range(10):
        assert await send() is None
    status = await send()
    assert status is not None
    assert refusal(status)[1] == pytest.approx(30.0)


async def test_unlimited_methods_streams_and_off_pass_untouched() -> None:
    async def unary(request: bytes, context: Any) -> bytes:
        return b""

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b""

    get_user: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(unary)
    watch: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_stream_rpc_method_handler(stream)
    search: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(unary)
    default = RateLimitInterceptor()
    off = RateLimitInterceptor(parse_rate_limits("off"))

    assert await intercepted(default, "GetUser", get_user) is get_user
    assert await intercepted(default, "Search", watch) is watch
    assert await intercepted(off, "Search", search) is search
    assert await intercepted(default, "Search", search) is not search

    async def nothing(_: grpc.HandlerCallDetails) -> None:
        return None

    assert await default.intercept_service(nothing, Details(f"/{SERVICE}/Search")) is None


async def test_buckets_are_capped_least_recently_used_out() -> None:
    clock = FakeClock()
    interceptor = limiter({"Search": BucketSpec(1, 100.0)}, clock, max_buckets=2)
    search = Calls(interceptor, "Search")

    assert await search("alice") is None
    assert await search("bob") is None
    assert await search("alice") is not None  # alice is now the most recently used
    assert await search("carol") is None  # evicts bob
    assert interceptor.bucket_count == 2
    assert await search("alice") is not None  # alice kept her empty bucket
    assert await search("bob") is None  # bob's was evicted: a fresh one

    for number in range(1000):
        await search(f"user-{number}")
    assert interceptor.bucket_count == 2


async def test_idle_buckets_that_refilled_are_dropped() -> None:
    clock = FakeClock()
    interceptor = limiter({"Search": BucketSpec(2, 1.0)}, clock)
    search = Calls(interceptor, "Search")

    await search("alice")
    await search("bob")
    assert interceptor.bucket_count == 2

    clock.now += 1.0  # both are full again
    await search("carol")
    assert interceptor.bucket_count == 1


def test_parse_default_and_off() -> None:
    assert parse_rate_limits("default") == {
        "Search": BucketSpec(burst=20, interval=1.0),
        "SendRequest": BucketSpec(burst=10, interval=30.0),
        "CancelRequest": BucketSpec(burst=10, interval=30.0),
        "Respond": BucketSpec(burst=30, interval=2.0),
        "UpdateSharingOverrides": BucketSpec(burst=30, interval=2.0),
        "RemoveConnection": BucketSpec(burst=10, interval=6.0),
        "MarkNotificationsRead": BucketSpec(burst=30, interval=1.0),
        "BlockUser": BucketSpec(burst=10, interval=6.0),
        "UnblockUser": BucketSpec(burst=10, interval=6.0),
        "UpsertUser": BucketSpec(burst=1000, interval=0.001),
        "UpdateSettings": BucketSpec(burst=1000, interval=0.001),
    }
    assert parse_rate_limits(" DEFAULT ") == dict(DEFAULT_RATE_LIMITS)
    assert parse_rate_limits("off") == {}


def test_parse_a_list() -> None:
    assert parse_rate_limits("Search=20/1s, SendRequest=10/30s,GetUser=5/250ms,Ping=1/1.5m") == {
        "Search": BucketSpec(20, 1.0),
        "SendRequest": BucketSpec(10, 30.0),
        "GetUser": BucketSpec(5, 0.25),
        "Ping": BucketSpec(1, 90.0),
    }
    assert parse_rate_limits("Search=3/2h") == {"Search": BucketSpec(3, 7200.0)}


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "on",
        "Search",
        "Search=20",
        "Search=20/1",
        "Search=20/s",
        "Search=0/1s",
        "Search=20/0s",
        "Search=-1/1s",
        "Search=2.5/1s",
        "Search=20/1d",
        "Search=20/infs",
        "=20/1s",
        "Se arch=20/1s",
        "Search=20/1s,",
        "Search=20/1s,Search=5/1s",
    ],
)
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="rate limits"):
        parse_rate_limits(spec)


def test_bucket_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="burst"):
        BucketSpec(0, 1.0)
    with pytest.raises(ValueError, match="interval"):
        BucketSpec(1, 0.0)


# --- Through a real server and channel ---------------------------------------------------------


class SubjectFromMetadata(grpc.aio.ServerInterceptor):
    """Test-only stand-in for auth: the caller is whatever `x-test-subject` says."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def with_principal(request: Any, context: Context) -> Any:
                subject = dict(context.invocation_metadata() or ()).get("x-test-subject")
                with calling_as(None if subject is None else str(subject)):
                    return await behavior(request, context)

            return with_principal

        return wrap_handler(handler, unary=unary, stream=lambda behavior: behavior)


async def _search(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return b"found"


@contextlib.asynccontextmanager
async def serving(limiter: RateLimitInterceptor) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[SubjectFromMetadata(), limiter])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE, {"Search": grpc.unary_unary_rpc_method_handler(_search)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def test_a_refusal_through_a_real_server_carries_reason_and_retry_info() -> None:
    async with serving(RateLimitInterceptor(parse_rate_limits("Search=2/10s"))) as channel:
        search = raw_unary_unary(channel, f"/{SERVICE}/Search")
        alice = (("x-test-subject", "alice"),)

        assert await search(b"", metadata=alice) == b"found"
        assert await search(b"", metadata=alice) == b"found"
        call = search(b"", metadata=alice)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert await search(b"", metadata=(("x-test-subject", "bob"),)) == b"found"

    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    rich = await rpc_status.aio.from_call(call)
    assert rich is not None
    assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info, delay = unpack(rich)
    assert info.reason == RATE_LIMITED
    assert info.domain == ERROR_DOMAIN
    # The real clock moved a little since the first call; one token is at most 10 s away.
    assert 9.0 < delay <= 10.0
