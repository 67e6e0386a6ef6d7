"""A cap on the streams anyone may hold open without a token (SPEC 10.1).

Health and reflection need no token, and their streaming methods (health `Watch`,
reflection `ServerReflectionInfo`) stay open for as long as the client likes. Without a cap,
an anonymous client could hold every slot of `maximum_concurrent_rpcs` and starve the
authenticated callers. At most `limit` such streams are open per process
(UMBRA_MAX_ANONYMOUS_STREAMS); one more is answered RESOURCE_EXHAUSTED with reason
TOO_MANY_ANONYMOUS_STREAMS before its handler runs, and so ends at once instead of holding
a slot. Unary health `Check` is not capped: it finishes by itself.
"""

from __future__ import annotations

from typing import Final

import grpc

from umbra_grpc.interceptors.handlers import Continuation, Handler, wrap_around
from umbra_grpc.interceptors.slots import Slots

REASON: Final = "TOO_MANY_ANONYMOUS_STREAMS"
MESSAGE: Final = "too many open health or reflection streams on this server; retry later"


class AnonymousStreamLimit(grpc.aio.ServerInterceptor):
    """Caps the open streaming calls to the methods under `public_prefixes`.

    `open_streams` is how many are open now (the metrics endpoint reads it).
    """

    def __init__(self, limit: int, public_prefixes: tuple[str, ...]) -> None:
        self._streams = Slots(limit, REASON, MESSAGE)
        self._prefixes = public_prefixes

    @property
    def open_streams(self) -> int:
        """How many capped streams are open now."""
        return self._streams.taken

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or not handler_call_details.method.startswith(self._prefixes)
            or not (handler.request_streaming or handler.response_streaming)
        ):
            return handler

        # Health's Watch writes through the context from a coroutine: wrapped as unary.
        return wrap_around(handler, self._streams.around)
