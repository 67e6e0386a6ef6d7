"""Concurrency cap: at most `limit` unary calls in progress per process (UMBRA_MAX_CONCURRENT_RPCS).

Why here and not only in grpc: grpc.aio's `maximum_concurrent_rpcs` counts every call, and
an open watch stream is a call for as long as it stays open. Set to the unary cap alone,
1,000 idle watchers would refuse every other call; set to the cap plus the stream limit (as
the server does, as a backstop), it lets unary calls run far past the cap while few streams
are open. So this interceptor counts calls with a unary response on their own and refuses
the one past `limit` with RESOURCE_EXHAUSTED `TOO_MANY_CALLS`; streams are held to their own
limits (UMBRA_WATCH_MAX_STREAMS and the per-user one) where they are served.

A call counts from the moment it reaches this interceptor until its response is sent, the
time it spends in the interceptors inside this one (auth, rate limit, timing floor) included.
"""

from __future__ import annotations

from typing import Final

import grpc

from umbra_grpc.interceptors.handlers import Continuation, Handler, wrap_around
from umbra_grpc.interceptors.slots import Slots

TOO_MANY_CALLS: Final = "TOO_MANY_CALLS"


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a unary call with `TOO_MANY_CALLS` while `limit` others are in progress."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the concurrency limit must be at least 1")
        self._in_progress = Slots(
            limit, TOO_MANY_CALLS, f"the server has {limit} calls in progress; retry shortly"
        )

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.response_streaming:
            return handler
        return wrap_around(handler, self._in_progress.around)
