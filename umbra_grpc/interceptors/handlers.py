"""Rebuilding an `RpcMethodHandler` around a wrapped behaviour.

A grpc.aio server interceptor receives the handler that `continuation` found and returns a
new one. Unary-response calls (unary-unary, stream-unary) are wrapped as coroutines; calls with
a streaming response are wrapped as async generators, because for a stream "after the call"
means after its iteration, not when the handler function returns. A few library handlers
(health's Watch) stream by `context.write` from a plain coroutine; those are wrapped as unary.

Most interceptors do the same thing around either kind of call: `wrap_around` takes that
logic once, as an async context manager entered when the call starts and exited when it ends
(for a stream, when its iteration does), and builds both wrappers from it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar, Token
from typing import Any, NamedTuple, TypeAlias, cast

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]
UnaryWrapper = Callable[[UnaryBehavior], UnaryBehavior]
StreamWrapper = Callable[[StreamBehavior], StreamBehavior]
Deserializer = Callable[[bytes], Any]


class Inside(NamedTuple):
    """What the wrapped behaviour runs with, as the logic around it hands it in."""

    request: Any
    context: Context
    sent: Callable[[], None] | None = None
    """For a stream that yields: told after each message, once the stream is resumed."""


# around(request, context, stream): `stream` is true when the behaviour is an async generator,
# so the call ends with its iteration, and a stream its client abandoned is closed later
# (GeneratorExit), by the event loop, from another task and context.
Around = Callable[[Any, Context, bool], AbstractAsyncContextManager[Inside]]

# grpc's handler classes are generic in the stubs only: strings, so nothing subscripts them
# at run time.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# What every `intercept_service` gets: finds the handler of a call (None: no such method).
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"

_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    unary: UnaryWrapper,
    stream: StreamWrapper,
    request_deserializer: Deserializer | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with its behaviour wrapped (and optionally a new deserializer)."""
    attribute, factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, attribute)
    if handler.response_streaming and inspect.isasyncgenfunction(behavior):
        wrapped: Any = stream(behavior)
    else:
        wrapped = unary(behavior)
    result: grpc.RpcMethodHandler[Any, Any] = factory(
        wrapped,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return result


def wrap_around(
    handler: grpc.RpcMethodHandler[Any, Any],
    around: Around,
    *,
    request_deserializer: Deserializer | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, its behaviour run inside `around` (see `Around`).

    A stream's own generator is closed when the wrapper is, so a stream its client abandoned
    still runs its `finally` before `around` is exited.
    """

    def unary(behavior: UnaryBehavior) -> UnaryBehavior:
        async def wrapped(request: Any, context: Context) -> Any:
            async with around(request, context, False) as inside:
                return await behavior(inside.request, inside.context)

        return wrapped

    def stream(behavior: StreamBehavior) -> StreamBehavior:
        async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
            async with around(request, context, True) as inside:
                # wrap_handler hands streams over only when they are async generators.
                responses = cast(
                    AsyncGenerator[Any, None], behavior(inside.request, inside.context)
                )
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        yield response
                        if inside.sent is not None:
                            inside.sent()

        return wrapped

    return wrap_handler(
        handler, unary=unary, stream=stream, request_deserializer=request_deserializer
    )


def reset(variable: ContextVar[Any], token: Token[Any], *, stream: bool) -> None:
    """Resets `variable` set on entering a call, as the call ends.

    A stream abandoned mid-iteration is closed later by the event loop, in another context
    (the one it set the variable in has ended with its task): there that is no error.
    """
    if stream:
        with contextlib.suppress(ValueError):
            variable.reset(token)
    else:
        variable.reset(token)
