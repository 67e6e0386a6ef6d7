"""A fixed number of slots that calls hold while they run, for the interceptors that cap calls.

A call takes a slot as it enters and gives it back however it ends (a stream: when its
iteration ends); one that finds every slot taken is ended with the cap's refusal instead,
before anything inner runs. The server runs on one event loop and nothing awaits between the
check and the count, so no lock is needed.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from umbra_grpc.interceptors.handlers import Context, Inside
from umbra_grpc.rpc_errors import abort


class Slots:
    """`limit` slots, taken by the calls wrapped with `around`.

    `taken` is how many are held now. A refused call is ended with `reason` and `message`.
    """

    __slots__ = ("_limit", "_message", "_reason", "taken")

    def __init__(self, limit: int, reason: str, message: str) -> None:
        self._limit = limit
        self.taken = 0
        self._reason = reason
        self._message = message

    def around(self, request: Any, context: Context, stream: bool) -> _Slot:
        """One call's slot (`wrap_around`): held until the call, or a stream's iteration, ends."""
        return _Slot(self, request, context)

    async def _take(self, context: Context) -> None:
        if self.taken >= self._limit:
            await abort(context, self._reason, self._message)
        self.taken += 1


class _Slot:
    """One call's slot: taken on entry (or the call is refused), given back on exit."""

    __slots__ = ("_context", "_request", "_slots")

    def __init__(self, slots: Slots, request: Any, context: Context) -> None:
        self._slots = slots
        self._request = request
        self._context = context

    async def __aenter__(self) -> Inside:
        await self._slots._take(self._context)
        return Inside(self._request, self._context)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._slots.taken -= 1
