"""Rebuilding an `RpcMethodHandler` around a wrapped behaviour.

A grpc.aio server interceptor receives the handler that `continuation` found and returns a
new one. Unary-response calls (unary-unary, stream-unary) are wrapped as coroutines; calls with
a streaming response are wrapped as async generators, because for a stream "after the call"
means after its iteration, not when the handler function returns. A few library handlers
(health's Watch) stream by `context.write` from a plain coroutine; those are wrapped as unary.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]
UnaryWrapper = Callable[[UnaryBehavior], UnaryBehavior]
StreamWrapper = Callable[[StreamBehavior], StreamBehavior]
Deserializer = Callable[[bytes], Any]
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
