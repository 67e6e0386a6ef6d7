"""A fixed number of slots that calls hold while they run, for the interceptors that cap calls.

A call takes a slot as it enters and gives it back however it ends (a stream: when its
iteration ends); one that finds every slot taken is ended with the cap's refusal instead,
before anything inner runs. The server runs on one event loop and nothing awaits between the
check and the count, so no lock is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Any, cast

from umbra_grpc.interceptors.handlers import Context, StreamBehavior, UnaryBehavior
from umbra_grpc.rpc_errors import abort


class Slots:
    """`limit` slots, taken by the behaviours `unary` and `stream` wrap.

    `taken` is how many are held now. A refused call is ended with `reason` and `message`.
    """

    __slots__ = ("_limit", "_message", "_reason", "taken")

    def __init__(self, limit: int, reason: str, message: str) -> None:
        self._limit = limit
        self.taken = 0
        self._reason = reason
        self._message = message

    def unary(self, behavior: UnaryBehavior) -> UnaryBehavior:
        """`behavior`, holding a slot until it returns or raises."""

        async def held(request: Any, context: Context) -> Any:
            async with _Slot(self, context):
                return await behavior(request, context)

        return held

    def stream(self, behavior: StreamBehavior) -> StreamBehavior:
        """`behavior` (an async generator), holding a slot until its stream ends."""

        async def held(request: Any, context: Context) -> AsyncIterator[Any]:
            async with _Slot(self, context):
                # wrap_handler hands streams over only when they are async generators.
                responses = cast(AsyncGenerator[Any, None], behavior(request, context))
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        yield response

        return held

    async def _take(self, context: Context) -> None:
        if self.taken >= self._limit:
            await abort(context, self._reason, self._message)
        self.taken += 1


class _Slot:
    """One call's slot: taken on entry (or the call is refused), given back on exit."""

    __slots__ = ("_context", "_slots")

    def __init__(self, slots: Slots, context: Context) -> None:
        self._slots = slots
        self._context = context

    async def __aenter__(self) -> None:
        await self._slots._take(self._context)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._slots.taken -= 1
