"""`Slots`, the count the concurrency and anonymous-stream caps share, on its own (through
real servers: tests/api/test_concurrency_limit.py and test_anonymous_callers.py)."""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.support import AioUnary, AioUnaryStream, aio_unary, aio_unary_stream
from umbra_grpc.interceptors.handlers import Context, wrap_around
from umbra_grpc.interceptors.slots import Slots


class Refusing:
    """Just enough of a servicer context to be ended with a status."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.status = status
        raise grpc.aio.AbortError

    @property
    def context(self) -> Context:
        return cast(Context, self)


def unary(slots: Slots, behavior: Any) -> AioUnary:
    """`behavior` as a unary-unary call holding one of `slots`."""
    return aio_unary(wrap_around(grpc.unary_unary_rpc_method_handler(behavior), slots.around))


def stream(slots: Slots, behavior: Any) -> AioUnaryStream:
    """`behavior` (an async generator) as a unary-stream call holding one of `slots`."""
    return aio_unary_stream(
        wrap_around(grpc.unary_stream_rpc_method_handler(behavior), slots.around)
    )


async def test_a_call_past_the_limit_is_refused_and_takes_no_slot() -> None:
    slots = Slots(1, "TOO_MANY_CALLS", "busy")
    started, release = asyncio.Event(), asyncio.Event()

    async def work(request: Any, context: Any) -> str:
        started.set()
        await release.wait()
        return "done"

    held = unary(slots, work)
    first = asyncio.ensure_future(held(None, Refusing().context))
    await asyncio.wait_for(started.wait(), 5)
    refused = Refusing()
    with pytest.raises(grpc.aio.AbortError):
        await held(None, refused.context)
    assert slots.taken == 1
    release.set()
    assert await first == "done"
    assert slots.taken == 0
    assert refused.status is not None
    assert (refused.status.code, refused.status.details) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "busy",
    )
    [(_, details)] = refused.status.trailing_metadata
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(details).details[0].Unpack(info)
    assert info.reason == "TOO_MANY_CALLS"


async def test_a_slot_is_given_back_however_the_call_ends() -> None:
    slots = Slots(1, "TOO_MANY_CALLS", "busy")

    async def failing(request: Any, context: Any) -> None:
        raise RuntimeError

    async def streaming(request: Any, context: Any) -> Any:
        yield 1
        yield 2

    with pytest.raises(RuntimeError):
        await unary(slots, failing)(None, Refusing().context)
    assert slots.taken == 0
    responses = stream(slots, streaming)(None, Refusing().context)
    assert await anext(responses) == 1
    assert slots.taken == 1
    await responses.aclose()  # abandoned mid-stream
    assert slots.taken == 0
