"""Timing floor: a response is released no earlier than `start + floor`, whatever its outcome.

Why: "no such user", "inactive" and "not accepting requests" must not be told apart by how
long the answer took. The old router slept a fixed 50 ms *before* its work, which adds delay
but leaves the work's own timing visible. Here `start` is taken when the call enters this
interceptor's wrapped behaviour, the work runs, and only then is the wait computed, so every
outcome (success, abort, unexpected exception) leaves at `start + floor` or later.

Precision: `asyncio.sleep` wakes on the event loop's millisecond-rounded timer, which leaves a
steady ~1 ms difference between outcomes. So the wait sleeps until `spin` seconds (default
2 ms) before the deadline and finishes with bare yields (`sleep(0)`) polling the clock
(`time.perf_counter` by default).

A floor is chosen by the outcome's status code: a rule naming that code wins over a rule for
the method with no code. grpc.aio's `context.abort` sends the status *before* it raises
`grpc.aio.AbortError` (measured: the client had its NOT_FOUND while the handler was still
running), so the behaviour gets a context whose `abort` and `abort_with_status` first wait
for the floor of the code being sent; the `AbortError` then goes up unchanged. A behaviour
that returns is held with `context.code()` (OK when unset) before its response is released.
Any other exception counts as INTERNAL (what the service maps it to) and also matches a rule
for UNKNOWN (what grpc.aio sends unmapped); it is re-raised after the wait. A cancelled call
is not held: nobody receives its answer.

Methods are matched by the last segment of the full method name ("Search" in
"/umbra.connections.v1.ConnectionService/Search"). Work that takes longer than its floor is
an overrun: the floor no longer hides its timing. Overruns are counted in `overruns` (by
method) and logged as warnings.

`UMBRA_TIMING_FLOORS` (parsed by `parse_timing_floors`):

- ``default``: Search 50 ms on every outcome; SendRequest 50 ms when the outcome is NOT_FOUND;
  BlockUser, UnblockUser and GetRelationships 50 ms on every outcome (they answer alike
  whether or not a handle exists, and must take alike too).
- ``off``: no floors.
- a comma list of ``Method[:STATUS]=DURATION``, e.g.
  ``Search=50ms,SendRequest:NOT_FOUND=50ms,GetUser=2.5ms``. DURATION is a non-negative
  decimal number followed by ``ms`` or ``s``; STATUS is a `grpc.StatusCode` name (OK,
  NOT_FOUND, ...). Each (method, status) pair may appear once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn, cast

import grpc

from umbra_grpc.interceptors.handlers import Context, Continuation, Handler, Inside, wrap_around

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_SPIN_SECONDS = 0.002


@dataclasses.dataclass(frozen=True, slots=True)
class FloorRule:
    """Release `method`'s answer no earlier than `seconds` after entry (only for `code` if set)."""

    method: str
    seconds: float
    code: grpc.StatusCode | None = None


DEFAULT_TIMING_FLOORS: tuple[FloorRule, ...] = (
    FloorRule("Search", 0.050),
    FloorRule("SendRequest", 0.050, grpc.StatusCode.NOT_FOUND),
    # SPEC 11: no existence oracle in blocks or relationship states.
    FloorRule("BlockUser", 0.050),
    FloorRule("UnblockUser", 0.050),
    FloorRule("GetRelationships", 0.050),
)

# Outcome codes of a behaviour that raised something other than AbortError.
_EXCEPTION_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


class _MethodFloors:
    """The floors of one method: one for any outcome and/or one per status code."""

    def __init__(self) -> None:
        self.any_code: float | None = None
        self.by_code: dict[grpc.StatusCode, float] = {}

    def add(self, rule: FloorRule) -> None:
        if rule.code is None:
            self.any_code = rule.seconds
        else:
            self.by_code[rule.code] = rule.seconds

    def floor(self, codes: tuple[grpc.StatusCode, ...]) -> float | None:
        for code in codes:
            if code in self.by_code:
                return self.by_code[code]
        return self.any_code


class TimingFloorInterceptor(grpc.aio.ServerInterceptor):
    """Holds each floored call's answer until `start + floor`; counts and logs overruns."""

    def __init__(
        self,
        rules: Iterable[FloorRule] = DEFAULT_TIMING_FLOORS,
        *,
        clock: Clock = time.perf_counter,
        sleep: Sleep = asyncio.sleep,
        spin: float = DEFAULT_SPIN_SECONDS,
    ) -> None:
        self._floors: dict[str, _MethodFloors] = {}
        for rule in rules:
            self._floors.setdefault(rule.method, _MethodFloors()).add(rule)
        self._clock = clock
        self._sleep = sleep
        self._spin = spin
        self.overruns: collections.Counter[str] = collections.Counter()
        """Calls whose work took longer than their floor, by method name."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        floors = self._floors.get(method)
        if floors is None:
            return handler

        # For a stream only the end (its status) is held: messages go out as they come.
        @contextlib.asynccontextmanager
        async def floored(request: Any, context: Context, stream: bool) -> AsyncIterator[Inside]:
            gate = _Gate(self, method, floors)
            try:
                yield Inside(request, gate.context(context))
            except grpc.aio.AbortError:
                await gate.open((_code(context),))
                raise
            except Exception:
                await gate.open(_EXCEPTION_CODES)
                raise
            await gate.open((_code(context),))

        return wrap_around(handler, floored)

    async def _hold(
        self,
        method: str,
        floors: _MethodFloors,
        start: float,
        codes: tuple[grpc.StatusCode, ...],
    ) -> None:
        floor = floors.floor(codes)
        if floor is None:
            return
        deadline = start + floor
        over = self._clock() - deadline
        if over > 0:
            self.overruns[method] += 1
            logger.warning(
                "timing floor overrun: method=%s code=%s floor_ms=%.3f over_ms=%.3f",
                method,
                codes[0].name,
                floor * 1000,
                over * 1000,
            )
            return
        await self._wait_until(deadline)

    async def _wait_until(self, deadline: float) -> None:
        """Sleeps once to just before `deadline`, then yields until the clock reaches it."""
        # One sleep, not a loop of shrinking ones: a timer that wakes early would otherwise
        # make ever smaller sleeps that never reach the yields. Yielding always ends.
        remaining = deadline - self._clock()
        if remaining > self._spin:
            await self._sleep(remaining - self._spin)
        while self._clock() < deadline:
            await self._sleep(0)


class _Gate:
    """One call's floor: started on entry, opened once, when the outcome is known."""

    def __init__(
        self, interceptor: TimingFloorInterceptor, method: str, floors: _MethodFloors
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._floors = floors
        self._start = interceptor._clock()
        self._opened = False

    async def open(self, codes: tuple[grpc.StatusCode, ...]) -> None:
        if self._opened:
            return
        self._opened = True
        await self._interceptor._hold(self._method, self._floors, self._start, codes)

    def context(self, context: Context) -> Context:
        return cast(Context, _GatedContext(context, self))


class _GatedContext:
    """The call's context, except that an abort waits for the floor before it is sent.

    grpc.aio's `abort` sends the status at once and only then raises `AbortError`, so
    holding the call after catching the error would be too late.
    """

    def __init__(self, context: Context, gate: _Gate) -> None:
        self._context = context
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, *args: Any, **kwargs: Any) -> NoReturn:
        await self._gate.open((code,))
        await self._context.abort(code, *args, **kwargs)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        await self._gate.open((status.code,))
        await self._context.abort_with_status(status)


def _code(context: Context) -> grpc.StatusCode:
    # grpc.aio's ServicerContext.code() is None until a code is set or the call aborts.
    code: grpc.StatusCode | None = context.code()
    return grpc.StatusCode.OK if code is None else code


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s)")
_METHOD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_timing_floors(spec: str) -> tuple[FloorRule, ...]:
    """Reads `UMBRA_TIMING_FLOORS`: "default", "off" or "Method[:STATUS]=50ms,..."."""
    text = spec.strip()
    if text.lower() == "default":
        return DEFAULT_TIMING_FLOORS
    if text.lower() == "off":
        return ()
    rules: list[FloorRule] = []
    seen: set[tuple[str, grpc.StatusCode | None]] = set()
    for item in text.split(","):
        rule = _parse_floor_rule(item.strip(), spec)
        key = (rule.method, rule.code)
        if key in seen:
            raise ValueError(f"timing floors: {item.strip()!r} repeats a rule in {spec!r}")
        seen.add(key)
        rules.append(rule)
    return tuple(rules)


def _parse_floor_rule(item: str, spec: str) -> FloorRule:
    expected = (
        'expected "default", "off" or a comma list of Method[:STATUS]=DURATION '
        '(DURATION like "50ms" or "0.05s")'
    )
    target, equals, duration = item.partition("=")
    if not equals:
        raise ValueError(f"timing floors: bad item {item!r} in {spec!r}; {expected}")
    method, colon, code_name = (part.strip() for part in target.partition(":"))
    if not _METHOD.fullmatch(method):
        raise ValueError(f"timing floors: bad method name {method!r} in {spec!r}; {expected}")
    code: grpc.StatusCode | None = None
    if colon:
        try:
            code = grpc.StatusCode[code_name.upper()]
        except KeyError:
            raise ValueError(
                f"timing floors: unknown status code {code_name!r} in {spec!r}; "
                f"expected a grpc.StatusCode name such as NOT_FOUND"
            ) from None
    match = _DURATION.fullmatch(duration.strip())
    if match is None:
        raise ValueError(f"timing floors: bad duration {duration!r} in {spec!r}; {expected}")
    number, unit = match.groups()
    seconds = float(number) / 1000 if unit == "ms" else float(number)
    return FloorRule(method, seconds, code)
