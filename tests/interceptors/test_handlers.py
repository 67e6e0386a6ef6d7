"""`wrap_around`: one piece of around-the-call logic, entered and exited for either kind of call
(the interceptors that use it are tested through their own files and real servers)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest

from tests.support import aio_unary, aio_unary_stream
from umbra_grpc.interceptors.handlers import Context, Inside, wrap_around

CONTEXT = cast(Context, object())
INNER = cast(Context, object())


class Around:
    """Notes what it is told, hands in a replacement request and context, counts messages."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.sent = 0

    def count(self) -> None:
        self.sent += 1

    @contextlib.asynccontextmanager
    async def __call__(self, request: Any, context: Context, stream: bool) -> AsyncIterator[Inside]:
        self.events.append(f"enter {request} stream={stream}")
        try:
            yield Inside(f"inner {request}", INNER, self.count)
        except BaseException as error:
            self.events.append(f"exit {type(error).__name__}")
            raise
        self.events.append("exit")


async def test_a_unary_call_runs_inside_around_with_what_it_hands_in() -> None:
    around = Around()

    async def behavior(request: Any, context: Any) -> str:
        assert context is INNER
        around.events.append(f"behaviour {request}")
        return "done"

    wrapped = aio_unary(wrap_around(grpc.unary_unary_rpc_method_handler(behavior), around))
    assert await wrapped("r", CONTEXT) == "done"
    assert around.events == ["enter r stream=False", "behaviour inner r", "exit"]

    async def failing(request: Any, context: Any) -> None:
        raise RuntimeError

    wrapped = aio_unary(wrap_around(grpc.unary_unary_rpc_method_handler(failing), around))
    with pytest.raises(RuntimeError):
        await wrapped("r", CONTEXT)
    assert around.events[-1] == "exit RuntimeError"


async def test_an_abandoned_stream_closes_its_generator_before_around_exits() -> None:
    around = Around()

    async def events(request: Any, context: Any) -> AsyncIterator[str]:
        assert context is INNER
        try:
            while True:
                yield request
        finally:
            around.events.append("generator closed")

    stream = aio_unary_stream(wrap_around(grpc.unary_stream_rpc_method_handler(events), around))(
        "r", CONTEXT
    )
    assert await anext(stream) == "inner r"
    assert await anext(stream) == "inner r"
    await stream.aclose()  # the client went away while the second message was being written
    assert around.events == ["enter r stream=True", "generator closed", "exit GeneratorExit"]
    assert around.sent == 1  # told once a message is taken and the stream resumed
