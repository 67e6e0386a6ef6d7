"""The timing floor, alone: fake clock and sleep for the rules, a real server for the latency."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import pytest

from tests.support import aio_unary, aio_unary_stream, raw_unary_unary
from umbra_grpc import rpc_errors
from umbra_grpc.interceptors.timing_floor import (
    DEFAULT_TIMING_FLOORS,
    FloorRule,
    TimingFloorInterceptor,
    parse_timing_floors,
)

SERVICE = "umbra.connections.v1.ConnectionService"
START = 1000.0


class FakeTime:
    """A clock that moves only when slept on (or when the test says work happened).

    `early` makes every real sleep wake up to that much (at most half the delay) before it was
    asked to, as the event loop's timer can; each bare yield (`sleep(0)`) lets `tick` pass.
    """

    def __init__(self, *, early: float = 0.0, tick: float = 0.0001) -> None:
        self.now = START
        self.early = early
        self.tick = tick
        self.sleeps: list[float] = []
        self.yields = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        if delay == 0:
            self.yields += 1
            self.now += self.tick
        else:
            self.sleeps.append(delay)
            self.now += delay - min(self.early, delay / 2)

    def work(self, seconds: float) -> None:
        self.now += seconds


class FakeContext:
    """Just enough of `grpc.aio.ServicerContext` for the floor: code(), set_code(), abort.

    Like grpc.aio, an abort sends the status at once (`sent_at`), then raises.
    """

    def __init__(self, fake: FakeTime | None = None) -> None:
        self._code: grpc.StatusCode | None = None
        self._fake = fake
        self.sent_at: float | None = None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        self._code = code
        self.sent_at = self._fake.now if self._fake else None
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def interceptor(
    fake: FakeTime, rules: tuple[FloorRule, ...] = DEFAULT_TIMING_FLOORS
) -> TimingFloorInterceptor:
    return TimingFloorInterceptor(rules, clock=fake.clock, sleep=fake.sleep)


async def intercepted(
    floor: TimingFloorInterceptor, method: str, handler: grpc.RpcMethodHandler[Any, Any] | None
) -> grpc.RpcMethodHandler[Any, Any] | None:
    async def continuation(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return handler

    return await floor.intercept_service(continuation, Details(f"/{SERVICE}/{method}"))


async def call(
    floor: TimingFloorInterceptor,
    method: str,
    behavior: Callable[[Any, Any], Awaitable[Any]],
    context: FakeContext | None = None,
) -> Any:
    handler = await intercepted(floor, method, grpc.unary_unary_rpc_method_handler(behavior))
    assert handler is not None
    return await aio_unary(handler)(b"request", context or FakeContext())


async def test_success_is_released_at_the_floor_counted_from_entry() -> None:
    fake = FakeTime()

    async def search(request: bytes, context: Any) -> bytes:
        fake.work(0.010)
        return b"found"

    assert await call(interceptor(fake), "Search", search) == b"found"

    assert fake.now - START >= 0.050
    assert fake.now - START == pytest.approx(0.050, abs=0.0002)
    # The work's 10 ms is part of the floor, not added to it: a floor, not a delay.
    assert fake.sleeps[0] == pytest.approx(0.050 - 0.010 - 0.002)


async def test_abort_is_held_before_its_status_is_sent_and_reraised_unchanged() -> None:
    fake = FakeTime()
    context = FakeContext(fake)
    raised: list[grpc.aio.AbortError] = []

    async def search(request: bytes, context: Any) -> bytes:
        fake.work(0.004)
        try:
            await rpc_errors.abort(context, "USER_NOT_FOUND", "no user")
        except grpc.aio.AbortError as error:
            raised.append(error)
            raise

    with pytest.raises(grpc.aio.AbortError) as caught:
        await call(interceptor(fake), "Search", search, context)

    assert caught.value is raised[0]
    assert context.code() == grpc.StatusCode.NOT_FOUND
    # grpc.aio sends the status inside abort(), so that is where the floor must be.
    assert context.sent_at is not None
    assert context.sent_at - START >= 0.050
    assert fake.now == context.sent_at  # held once, not again after the error


async def test_plain_context_abort_is_held_too() -> None:
    fake = FakeTime()
    context = FakeContext(fake)

    async def search(request: bytes, context: FakeContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    with pytest.raises(grpc.aio.AbortError):
        await call(interceptor(fake), "Search", search, context)
    assert context.sent_at is not None
    assert context.sent_at - START >= 0.050


async def test_unexpected_exception_is_floored_and_reraised() -> None:
    fake = FakeTime()
    failure = RuntimeError("relation users does not exist")

    async def search(request: bytes, context: Any) -> bytes:
        fake.work(0.003)
        raise failure

    with pytest.raises(RuntimeError) as raised:
        await call(interceptor(fake), "Search", search)

    assert raised.value is failure
    assert fake.now - START >= 0.050


async def test_send_request_is_floored_only_on_not_found() -> None:
    fake = FakeTime()

    async def accepted(request: bytes, context: Any) -> bytes:
        return b"sent"

    async def not_found(request: bytes, context: FakeContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")

    assert await call(interceptor(fake), "SendRequest", accepted) == b"sent"
    assert fake.now == START
    assert fake.sleeps == []

    context = FakeContext(fake)
    with pytest.raises(grpc.aio.AbortError):
        await call(interceptor(fake), "SendRequest", not_found, context)
    assert context.sent_at is not None
    assert context.sent_at - START >= 0.050


async def test_send_request_other_errors_are_not_floored() -> None:
    fake = FakeTime()

    async def denied(request: bytes, context: FakeContext) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    with pytest.raises(grpc.aio.AbortError):
        await call(interceptor(fake), "SendRequest", denied)
    assert fake.now == START


async def test_a_code_set_without_aborting_selects_the_floor() -> None:
    fake = FakeTime()

    async def not_found(request: bytes, context: Any) -> bytes:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        return b""

    await call(interceptor(fake), "SendRequest", not_found)
    assert fake.now - START >= 0.050


async def test_a_rule_for_the_code_wins_over_the_rule_for_any_code() -> None:
    fake = FakeTime()
    rules = parse_timing_floors("Search=50ms,Search:NOT_FOUND=80ms")

    async def not_found(request: bytes, context: FakeContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no")

    with pytest.raises(grpc.aio.AbortError):
        await call(interceptor(fake, rules), "Search", not_found)
    assert fake.now - START == pytest.approx(0.080, abs=0.0002)


@pytest.mark.parametrize("code", ["INTERNAL", "UNKNOWN"])
async def test_an_exception_matches_rules_for_internal_and_unknown(code: str) -> None:
    fake = FakeTime()

    async def broken(request: bytes, context: Any) -> bytes:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await call(interceptor(fake, parse_timing_floors(f"GetUser:{code}=5ms")), "GetUser", broken)
    assert fake.now - START >= 0.005


async def test_a_cancelled_call_is_not_held() -> None:
    fake = FakeTime()

    async def cancelled(request: bytes, context: Any) -> bytes:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await call(interceptor(fake), "Search", cancelled)
    assert fake.now == START


async def test_methods_without_a_rule_get_the_handler_unchanged() -> None:
    fake = FakeTime()

    async def get_user(request: bytes, context: Any) -> bytes:
        return b""

    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(get_user)
    assert await intercepted(interceptor(fake), "GetUser", handler) is handler
    assert await intercepted(interceptor(fake), "Search", None) is None
    search: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(get_user)
    assert await intercepted(interceptor(fake, ()), "Search", search) is search


async def test_streams_pass_unless_named_and_named_streams_hold_their_end() -> None:
    fake = FakeTime()

    async def watch(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"

    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_stream_rpc_method_handler(watch)
    assert await intercepted(interceptor(fake), "WatchRequests", handler) is handler

    floored = await intercepted(
        interceptor(fake, parse_timing_floors("WatchRequests=20ms")), "WatchRequests", handler
    )
    assert floored is not None
    received = [item async for item in aio_unary_stream(floored)(b"", FakeContext())]
    assert received == [b"one", b"two"]
    assert fake.now - START >= 0.020


async def test_overruns_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    floor = interceptor(fake)

    async def slow(request: bytes, context: Any) -> bytes:
        fake.work(0.070)
        return b"late"

    async def quick(request: bytes, context: Any) -> bytes:
        return b"quick"

    with caplog.at_level(logging.WARNING, logger="umbra_grpc.interceptors.timing_floor"):
        assert await call(floor, "Search", slow) == b"late"
        await call(floor, "Search", quick)

    assert floor.overruns == {"Search": 1}
    assert fake.sleeps[0] > 0.040  # only the quick call waited
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "method=Search" in record.getMessage()
    assert "over_ms=20.000" in record.getMessage()


@pytest.mark.parametrize("early", [0.0, 0.0007, 0.005])
async def test_the_wait_ends_with_yields_at_or_after_the_deadline(early: float) -> None:
    fake = FakeTime(early=early, tick=0.0001)

    async def search(request: bytes, context: Any) -> bytes:
        fake.work(0.0123)
        return b""

    await call(interceptor(fake), "Search", search)

    deadline = START + 0.050
    assert fake.now >= deadline
    assert fake.now < deadline + fake.tick + 1e-9
    assert all(delay > 0 for delay in fake.sleeps)
    assert fake.yields > 0


async def test_the_real_wait_reaches_the_deadline() -> None:
    floor = TimingFloorInterceptor(parse_timing_floors("Search=7.5ms"))

    async def search(request: bytes, context: Any) -> bytes:
        return b""

    start = time.perf_counter()
    await call(floor, "Search", search)
    assert time.perf_counter() - start >= 0.0075


def test_parse_default_and_off() -> None:
    assert parse_timing_floors("default") == (
        FloorRule("Search", 0.050),
        FloorRule("SendRequest", 0.050, grpc.StatusCode.NOT_FOUND),
        FloorRule("BlockUser", 0.050),
        FloorRule("UnblockUser", 0.050),
        FloorRule("GetRelationships", 0.050),
    )
    assert parse_timing_floors(" Default ") == DEFAULT_TIMING_FLOORS
    assert parse_timing_floors("off") == ()


def test_parse_a_list() -> None:
    assert parse_timing_floors(
        "Search=50ms, SendRequest:NOT_FOUND=50ms,GetUser=2.5ms,Ping:unavailable=0.1s"
    ) == (
        FloorRule("Search", 0.050),
        FloorRule("SendRequest", 0.050, grpc.StatusCode.NOT_FOUND),
        FloorRule("GetUser", 0.0025),
        FloorRule("Ping", 0.1, grpc.StatusCode.UNAVAILABLE),
    )


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "on",
        "Search",
        "Search=50",
        "Search=-1ms",
        "Search=50us",
        "Search=1e3ms",
        "Search=infs",
        "Search:NOPE=1ms",
        "Search:=1ms",
        "=1ms",
        "Se arch=1ms",
        "/pkg.Service/Search=1ms",
        "Search=50ms,",
        "Search=1ms,Search=2ms",
        "Search:NOT_FOUND=1ms,Search:not_found=2ms",
    ],
)
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="timing floors"):
        parse_timing_floors(spec)


# --- Through a real server and channel ---------------------------------------------------------


async def _search(request: bytes, context: grpc.aio.ServicerContext[object, object]) -> bytes:
    if request == b"missing":
        await rpc_errors.abort(context, "USER_NOT_FOUND", "no user")
    if request == b"boom":
        raise RuntimeError("unexpected")
    return b"found"


@contextlib.asynccontextmanager
async def serving(floor: TimingFloorInterceptor) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[floor])
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
            await channel.channel_ready()
            yield channel
    finally:
        await server.stop(None)


async def test_every_outcome_is_held_to_the_floor_through_a_real_server() -> None:
    floor = 0.030
    async with serving(TimingFloorInterceptor(parse_timing_floors("Search=30ms"))) as channel:
        search = raw_unary_unary(channel, f"/{SERVICE}/Search")
        codes: dict[bytes, grpc.StatusCode] = {}
        for request in (b"ok", b"missing", b"boom", b"ok", b"missing", b"boom"):
            start = time.perf_counter()
            call = search(request)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
            elapsed = time.perf_counter() - start
            codes[request] = await call.code()
            assert elapsed >= floor, (request, elapsed)

    assert codes == {
        b"ok": grpc.StatusCode.OK,
        b"missing": grpc.StatusCode.NOT_FOUND,
        b"boom": grpc.StatusCode.UNKNOWN,
    }
