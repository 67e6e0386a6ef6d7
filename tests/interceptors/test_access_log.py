"""The access-log interceptor, alone (and once with auth inside it), on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from umbra.connections.v1 import connections_pb2

from tests.support import (
    AccessLine,
    access_line,
    aio_unary_stream,
    raw_stream_unary,
    raw_unary_stream,
    raw_unary_unary,
)
from umbra_grpc import rpc_errors
from umbra_grpc.call_record import current_call
from umbra_grpc.config import Config
from umbra_grpc.interceptors.access_log import CORRELATION_ID_KEY, AccessLogInterceptor
from umbra_grpc.interceptors.auth import AuthInterceptor
from umbra_grpc.logs import configure_logging
from umbra_grpc.peer import client_address, parse_networks
from umbra_grpc.tokens import TokenVerifier, mint_token

SERVICE = "umbra.connections.v1.ConnectionService"
SEARCH = f"/{SERVICE}/Search"
ECHO = f"/{SERVICE}/Echo"
WATCH = f"/{SERVICE}/WatchIncomingRequests"
WRITTEN = f"/{SERVICE}/Written"
UPLOAD = f"/{SERVICE}/Upload"

LEAK = "SELECT ntfy_auth_token FROM settings WHERE user_id = 7"
SECRET = "access-log-secret-5e7a9c1b3d5f7a9c1b3d5e7f"
CORRELATION_ID = re.compile(r"[0-9a-f]{32}")


# --- log capture --------------------------------------------------------------------------


class Lines(logging.Handler):
    """Collects the access log's records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[AccessLine] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(access_line(record))
        self._changed.set()

    async def wait_for(self, count: int) -> list[AccessLine]:
        """The records once there are `count`. A line is written as the call's handler unwinds,
        which can be after the client has its status (or gave up): read lines through this,
        or a late one is missed here and lands in the next test's records."""
        async with asyncio.timeout(5):
            while len(self.records) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.records


@pytest.fixture
def lines() -> Iterator[Lines]:
    access = logging.getLogger("umbra.access")
    handler = Lines()
    level = access.level
    access.setLevel(logging.INFO)
    access.addHandler(handler)
    try:
        yield handler
    finally:
        access.removeHandler(handler)
        access.setLevel(level)


# --- handlers -----------------------------------------------------------------------------


class Service:
    """Tiny handlers whose outcome the request picks."""

    def __init__(self, lines: Lines | None = None) -> None:
        self.lines = lines
        self.search_calls = 0
        self.lines_before_stream_end: list[int] = []

    async def search(
        self, request: connections_pb2.SearchRequest, context: Any
    ) -> connections_pb2.SearchResponse:
        self.search_calls += 1
        name = request.umbral_name
        if name == "missing":
            await rpc_errors.abort(context, "USER_NOT_FOUND", "no such user")
        if name == "boom":
            raise RuntimeError(LEAK)
        if name == "unimplemented":
            _not_implemented(context)
        if name == "hung-up":
            # What grpc core raises when it cannot send on a call any more (the client left
            # while it was being answered); here the client is still there, to see what it gets.
            raise grpc.aio.InternalError('Failed "execute_batch"')
        if name == "set-code":
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            context.set_details("not now")
        if name == "slow":
            await asyncio.sleep(3600)
        if name == "caller":
            record = current_call.get()
            assert record is not None
            record.caller = "42"
        return connections_pb2.SearchResponse(found=True)

    async def echo(self, request: bytes, context: Any) -> bytes:
        record = current_call.get()
        assert record is not None
        context.set_trailing_metadata((("x-extra", "1"),))
        return json.dumps({"peer": record.peer, "correlation_id": record.correlation_id}).encode()

    async def watch(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        count = 3 if request == b"forever" else int(request.split(b":")[-1] or b"3")
        for index in range(count):
            yield str(index).encode()
        if request.startswith(b"boom"):
            raise RuntimeError(LEAK)
        if request.startswith(b"unimplemented"):
            _not_implemented(context)
        if request.startswith(b"abort"):
            await rpc_errors.abort(context, "STREAM_TOO_SLOW", "too slow")
        if request == b"forever":
            await asyncio.sleep(3600)
        if self.lines is not None:
            self.lines_before_stream_end.append(len(self.lines.records))

    async def written(self, request: bytes, context: Any) -> None:
        await context.write(b"a")
        await context.write(b"b")

    async def upload(
        self, requests: AsyncIterator[connections_pb2.SearchRequest], context: Any
    ) -> connections_pb2.SearchResponse:
        names = [request.umbral_name async for request in requests]
        return connections_pb2.SearchResponse(found=bool(names))

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Search": grpc.unary_unary_rpc_method_handler(
                    self.search,
                    request_deserializer=connections_pb2.SearchRequest.FromString,
                    response_serializer=connections_pb2.SearchResponse.SerializeToString,
                ),
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
                "WatchIncomingRequests": grpc.unary_stream_rpc_method_handler(self.watch),
                "Written": grpc.unary_stream_rpc_method_handler(self.written),
                "Upload": grpc.stream_unary_rpc_method_handler(
                    self.upload,
                    request_deserializer=connections_pb2.SearchRequest.FromString,
                    response_serializer=connections_pb2.SearchResponse.SerializeToString,
                ),
            },
        )


def _not_implemented(context: Any) -> None:
    """What a generated servicer base class does for a method nobody implemented."""
    context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    context.set_details("Method not implemented!")
    raise NotImplementedError("Method not implemented!")


@contextlib.asynccontextmanager
async def serving(
    service: Service,
    *,
    trusted: tuple[str, ...] = (),
    inner: tuple[grpc.aio.ServerInterceptor, ...] = (),
    **options: Any,
) -> AsyncIterator[grpc.aio.Channel]:
    access_log = AccessLogInterceptor(parse_networks(trusted), **options)
    server = grpc.aio.server(interceptors=[access_log, *inner])
    server.add_generic_rpc_handlers([service.handlers()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def search(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        SEARCH,
        request_serializer=connections_pb2.SearchRequest.SerializeToString,
        response_deserializer=connections_pb2.SearchResponse.FromString,
    )


def trailer(metadata: Any, key: str) -> Any:
    values = [value for item_key, value in metadata or () if item_key == key]
    assert len(values) <= 1
    return values[0] if values else None


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = status_pb2.Status.FromString(
        trailer(error.trailing_metadata(), "grpc-status-details-bin")
    )
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert status.message == error.details()
    return info


async def drain(call: Any, into: list[bytes]) -> None:
    async for item in call:
        into.append(item)


async def failed(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


# --- one line per call --------------------------------------------------------------------


async def test_one_line_per_unary_call_with_its_fields(lines: Lines) -> None:
    async with serving(Service()) as channel:
        call = search(channel)(connections_pb2.SearchRequest(umbral_name="ok"))
        assert (await call).found
        trailing = await call.trailing_metadata()
    [line] = await lines.wait_for(1)
    assert line.name == "umbra.access"
    assert line.levelno == logging.INFO
    fields = {key: getattr(line, key) for key in ("method", "caller", "peer", "code")}
    assert fields == {"method": SEARCH, "caller": None, "peer": "127.0.0.1", "code": "OK"}
    assert CORRELATION_ID.fullmatch(line.correlation_id)
    assert trailer(trailing, CORRELATION_ID_KEY) == line.correlation_id
    assert line.duration_ms >= 0
    assert not hasattr(line, "events_sent")


async def test_every_call_gets_its_own_correlation_id(lines: Lines) -> None:
    async with serving(Service()) as channel:
        for _ in range(5):
            await search(channel)(connections_pb2.SearchRequest(umbral_name="ok"))
    ids = [line.correlation_id for line in await lines.wait_for(5)]
    assert len(ids) == 5
    assert len(set(ids)) == 5


async def test_duration_comes_from_the_clock(lines: Lines) -> None:
    ticks = iter([100.0, 100.25])
    async with serving(Service(), clock=lambda: next(ticks), new_id=lambda: "fixed-id") as ch:
        await search(ch)(connections_pb2.SearchRequest(umbral_name="ok"))
    [line] = await lines.wait_for(1)
    assert (line.duration_ms, line.correlation_id) == (250.0, "fixed-id")


async def test_caller_filled_in_by_an_inner_layer(lines: Lines) -> None:
    async with serving(Service()) as channel:
        await search(channel)(connections_pb2.SearchRequest(umbral_name="caller"))
    assert (await lines.wait_for(1))[0].caller == "42"


async def test_abort_is_logged_with_its_code_and_not_swallowed(
    lines: Lines, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(Service()) as channel:
        error = await failed(search(channel)(connections_pb2.SearchRequest(umbral_name="missing")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert (error.details(), error_info(error).reason) == ("no such user", "USER_NOT_FOUND")
    [line] = await lines.wait_for(1)
    assert line.code == "NOT_FOUND"
    # The inner layer's own trailing metadata (the rich status) keeps the correlation id.
    assert trailer(error.trailing_metadata(), CORRELATION_ID_KEY) == line.correlation_id
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_code_set_without_abort_is_logged(lines: Lines) -> None:
    async with serving(Service()) as channel:
        error = await failed(search(channel)(connections_pb2.SearchRequest(umbral_name="set-code")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await lines.wait_for(1))[0].code == "FAILED_PRECONDITION"


async def test_unknown_method_gets_a_line_under_one_label(lines: Lines) -> None:
    async with serving(Service()) as channel:
        error = await failed(raw_unary_unary(channel, f"/{SERVICE}/Nope")(b""))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    [line] = await lines.wait_for(1)
    assert (line.method, line.code) == ("unknown", "UNIMPLEMENTED")


async def test_inner_trailing_metadata_keeps_the_correlation_id(lines: Lines) -> None:
    async with serving(Service()) as channel:
        call = raw_unary_unary(channel, ECHO)(b"")
        body = json.loads(await call)
        trailing = await call.trailing_metadata()
    assert trailer(trailing, "x-extra") == "1"
    assert trailer(trailing, CORRELATION_ID_KEY) == body["correlation_id"]
    assert (await lines.wait_for(1))[0].correlation_id == body["correlation_id"]


# --- unexpected exceptions ----------------------------------------------------------------


async def test_exception_becomes_internal_with_a_correlation_id(
    lines: Lines, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(Service()) as channel:
        error = await failed(search(channel)(connections_pb2.SearchRequest(umbral_name="boom")))
    [line] = await lines.wait_for(1)
    correlation_id = line.correlation_id
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == f"internal error (correlation id {correlation_id})"
    assert error_info(error).reason == "INTERNAL"
    assert trailer(error.trailing_metadata(), CORRELATION_ID_KEY) == correlation_id
    assert line.code == "INTERNAL"
    # Nothing of the exception reaches the client...
    client_side = repr(error) + repr(error.trailing_metadata())
    assert "SELECT" not in client_side
    assert "RuntimeError" not in client_side
    # ...it is in the server log, with its traceback and the same correlation id.
    [logged] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert logged.__dict__["correlation_id"] == correlation_id  # set through `extra=`
    assert correlation_id in logged.getMessage()
    assert logged.exc_info is not None
    assert LEAK in str(logged.exc_info[1])
    assert "Traceback" in caplog.text


async def test_a_method_nobody_implemented_is_unimplemented_not_internal(
    lines: Lines, caplog: pytest.LogCaptureFixture
) -> None:
    # The fuzzer found grpcio-health-checking's aio servicer without Health/List: every call
    # was INTERNAL with an ERROR traceback, for anyone, without a token.
    async with serving(Service()) as channel:
        error = await failed(
            search(channel)(connections_pb2.SearchRequest(umbral_name="unimplemented"))
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await drain(raw_unary_stream(channel, WATCH)(b"unimplemented:1"), [])
    for failure in (error, raised.value):
        assert failure.code() == grpc.StatusCode.UNIMPLEMENTED
        assert error_info(failure).reason == "UNIMPLEMENTED"
        assert trailer(failure.trailing_metadata(), CORRELATION_ID_KEY) is not None
    assert [line.code for line in await lines.wait_for(2)] == ["UNIMPLEMENTED", "UNIMPLEMENTED"]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_a_call_grpc_can_no_longer_answer_ends_cancelled_without_an_error(
    lines: Lines, caplog: pytest.LogCaptureFixture
) -> None:
    # The fuzzer saw two ERROR tracebacks (ours, then grpc's "Unexpected [UsageError]" for a
    # second abort) whenever a client hung up while its call was being refused.
    async with serving(Service()) as channel:
        error = await failed(
            search(channel)(connections_pb2.SearchRequest(umbral_name="hung-up"), timeout=0.5)
        )
        [line] = await lines.wait_for(1)
    # Nothing more is sent on such a call: no INTERNAL status, no second abort.
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert line.code == "CANCELLED"
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_cancelled_call_is_logged_cancelled(lines: Lines) -> None:
    service = Service()
    async with serving(service) as channel:
        error = await failed(
            # Long enough for the handler to start on a loaded machine: a call that expires
            # before it reaches the handler gets no line at all.
            search(channel)(connections_pb2.SearchRequest(umbral_name="slow"), timeout=1.0)
        )
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        [line] = await lines.wait_for(1)
    assert line.code == "CANCELLED"


# --- undecodable requests -----------------------------------------------------------------


async def test_undecodable_bytes_are_invalid_argument(
    lines: Lines, caplog: pytest.LogCaptureFixture
) -> None:
    service = Service()
    async with serving(service) as channel:
        # Raw bytes through identity serializers, to a method that parses protobuf.
        error = await failed(raw_unary_unary(channel, SEARCH)(b"\xff\xff\xff"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "request could not be decoded"
    assert error_info(error).reason == "MALFORMED_REQUEST"
    assert service.search_calls == 0
    [line] = await lines.wait_for(1)
    assert line.code == "INVALID_ARGUMENT"
    assert trailer(error.trailing_metadata(), CORRELATION_ID_KEY) == line.correlation_id
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_undecodable_message_in_a_request_stream(lines: Lines) -> None:
    good = connections_pb2.SearchRequest(umbral_name="ok").SerializeToString()
    async with serving(Service()) as channel:
        upload = raw_stream_unary(channel, UPLOAD)
        assert await upload(iter([good, good])) == (
            connections_pb2.SearchResponse(found=True).SerializeToString()
        )
        error = await failed(upload(iter([good, b"\xff\xff\xff"])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "MALFORMED_REQUEST"
    assert [line.code for line in await lines.wait_for(2)] == ["OK", "INVALID_ARGUMENT"]


# --- streams ------------------------------------------------------------------------------


async def test_stream_line_is_written_after_the_iteration(lines: Lines) -> None:
    service = Service(lines)
    async with serving(service) as channel:
        call = raw_unary_stream(channel, WATCH)(b"ok:3")
        assert [item async for item in call] == [b"0", b"1", b"2"]
        assert trailer(await call.trailing_metadata(), CORRELATION_ID_KEY) is not None
    assert service.lines_before_stream_end == [0]
    [line] = await lines.wait_for(1)
    assert (line.method, line.code, line.events_sent) == (WATCH, "OK", 3)


async def test_stream_exception_becomes_internal(lines: Lines) -> None:
    async with serving(Service()) as channel:
        received: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await drain(raw_unary_stream(channel, WATCH)(b"boom:2"), received)
    assert received == [b"0", b"1"]
    [line] = await lines.wait_for(1)
    assert (line.code, line.events_sent) == ("INTERNAL", 2)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert line.correlation_id in (raised.value.details() or "")
    assert "SELECT" not in repr(raised.value)


async def test_stream_abort_is_logged_with_its_code(lines: Lines) -> None:
    async with serving(Service()) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await drain(raw_unary_stream(channel, WATCH)(b"abort:1"), [])
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(raised.value).reason == "STREAM_TOO_SLOW"
    [line] = await lines.wait_for(1)
    assert (line.code, line.events_sent) == ("RESOURCE_EXHAUSTED", 1)
    assert trailer(raised.value.trailing_metadata(), CORRELATION_ID_KEY) == line.correlation_id


async def test_stream_cancelled_by_the_client(lines: Lines) -> None:
    async with serving(Service()) as channel:
        call = raw_unary_stream(channel, WATCH)(b"forever")
        for _ in range(3):
            await call.read()
        call.cancel()
        [line] = await lines.wait_for(1)
    assert (line.code, line.events_sent) == ("CANCELLED", 3)


async def test_stream_written_through_the_context_counts_its_events(lines: Lines) -> None:
    async with serving(Service()) as channel:
        assert [item async for item in raw_unary_stream(channel, WRITTEN)(b"")] == [b"a", b"b"]
    [line] = await lines.wait_for(1)
    assert (line.code, line.events_sent) == ("OK", 2)


# --- peer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "forwarded_for", "peer"),
    [
        ((), None, "127.0.0.1"),
        ((), "203.0.113.9", "127.0.0.1"),  # not from a trusted proxy: ignored
        (("127.0.0.1",), "203.0.113.9", "203.0.113.9"),
        (("127.0.0.0/8", "10.0.0.0/8"), "198.51.100.7, 10.1.2.3", "198.51.100.7"),
        (("127.0.0.1",), "1.1.1.1, 198.51.100.7", "198.51.100.7"),  # leftmost is the client's
        (("127.0.0.1",), "not-an-address", "127.0.0.1"),
    ],
)
async def test_forwarded_for_only_from_trusted_proxies(
    lines: Lines, trusted: tuple[str, ...], forwarded_for: str | None, peer: str
) -> None:
    metadata = (("x-forwarded-for", forwarded_for),) if forwarded_for else ()
    async with serving(Service(), trusted=trusted) as channel:
        body = json.loads(await raw_unary_unary(channel, ECHO)(b"", metadata=metadata))
    assert body["peer"] == peer
    assert (await lines.wait_for(1))[0].peer == peer


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        ("ipv4:10.0.0.2:5000", "203.0.113.9", "203.0.113.9"),
        ("ipv4:192.0.2.1:5000", "203.0.113.9", "192.0.2.1"),
        ("ipv6:[::1]:5000", "2001:db8::1", "::1"),
        ("unix:/tmp/socket", "203.0.113.9", None),
    ],
)
def test_client_address(peer: str, forwarded_for: str, expected: str | None) -> None:
    assert client_address(peer, forwarded_for, parse_networks(["10.0.0.0/8"])) == expected


# --- with auth inside ---------------------------------------------------------------------


async def test_caller_comes_from_the_auth_interceptor(lines: Lines) -> None:
    async def is_active(user_id: int) -> bool:
        return user_id == 7

    auth = AuthInterceptor(TokenVerifier.from_config(Config(jwt_secret=SECRET)), is_active)
    token = mint_token(SECRET, subject="7")
    async with serving(Service(), inner=(auth,)) as channel:
        stub = search(channel)
        request = connections_pb2.SearchRequest(umbral_name="ok")
        await stub(request, metadata=(("authorization", f"Bearer {token}"),))
        error = await failed(stub(request))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        malformed = await failed(raw_unary_unary(channel, SEARCH)(b"\xff"))
        assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [(line.caller, line.code) for line in await lines.wait_for(3)] == [
        ("7", "OK"),
        (None, "UNAUTHENTICATED"),
        (None, "INVALID_ARGUMENT"),
    ]
    assert trailer(error.trailing_metadata(), CORRELATION_ID_KEY) == lines.records[1].correlation_id


# --- log formats --------------------------------------------------------------------------


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_json_format_is_one_object_per_line_with_the_extra_fields() -> None:
    out = io.StringIO()
    configure_logging("json", "INFO", stream=out)
    configure_logging("json", "INFO", stream=out)  # idempotent: still one handler
    logging.getLogger("umbra.access").info(
        "%s %s", SEARCH, "OK", extra={"method": SEARCH, "code": "OK", "duration_ms": 1.5}
    )
    logging.getLogger("umbra.test").debug("below the level")
    try:
        raise ValueError("kaput")
    except ValueError:
        logging.getLogger("umbra.test").exception("failed", extra={"correlation_id": "abc"})
    first, second = (json.loads(line) for line in out.getvalue().splitlines() if line[0] == "{")
    assert first["message"] == f"{SEARCH} OK"
    assert (first["logger"], first["level"], first["method"], first["duration_ms"]) == (
        "umbra.access",
        "INFO",
        SEARCH,
        1.5,
    )
    assert first["time"].endswith("Z")
    assert second["correlation_id"] == "abc"
    assert "ValueError: kaput" in second["exception"]
    assert len(out.getvalue().strip().splitlines()) == 2  # the traceback stays inside its line


@pytest.mark.usefixtures("restore_root_logger")
def test_text_format_is_a_readable_line() -> None:
    out = io.StringIO()
    configure_logging("json", "DEBUG", stream=out)
    configure_logging("text", "debug", stream=out)  # replaces the JSON handler
    logging.getLogger("umbra.access").info(
        "hello", extra={"method": SEARCH, "caller": None, "note": "two words"}
    )
    [line] = out.getvalue().splitlines()
    assert f'INFO umbra.access: hello method={SEARCH} caller=- note="two words"' in line
    assert logging.getLogger().level == logging.DEBUG


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", "INFO")


class FakeContext:
    """Just enough of a servicer context for a stream that is never aborted."""

    def __init__(self) -> None:
        self.trailing: Any = ()

    def peer(self) -> str:
        return "ipv4:192.0.2.10:40000"

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata

    def code(self) -> None:
        return None


class Details(grpc.HandlerCallDetails):
    method = WATCH
    invocation_metadata = ()


async def test_abandoned_stream_still_gets_its_line(lines: Lines) -> None:
    """grpc.aio leaves a stream suspended when its client goes away mid-write; the event loop
    closes it later from another task. That still writes the line, as CANCELLED."""

    async def events(request: bytes, context: Any) -> AsyncIterator[bytes]:
        while True:
            yield b"event"

    async def continuation(details: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_stream_rpc_method_handler(events)

    handler = await AccessLogInterceptor().intercept_service(continuation, Details())
    assert handler is not None
    stream = aio_unary_stream(handler)(b"", FakeContext())

    async def two() -> None:
        await anext(stream)
        await anext(stream)

    await asyncio.create_task(two())
    assert lines.records == []
    await asyncio.create_task(stream.aclose(), context=contextvars.Context())
    [line] = await lines.wait_for(1)
    assert (line.code, line.events_sent, line.peer) == ("CANCELLED", 1, "192.0.2.10")
