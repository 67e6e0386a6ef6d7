"""Rate limit: a token bucket per caller and method, refusing with RESOURCE_EXHAUSTED.

Why: Search can be used to enumerate handles and SendRequest to spam people, so each caller
gets a small burst that refills slowly. Buckets key on the verified token's `sub`
(`current_principal`), not on the peer address: the peer is usually another backend that
speaks for many users. The auth interceptor always runs outside this one, so a principal is
set for every limited method; if none is set (a configuration without auth, or a test), all
such calls share the bucket of the empty subject.

A refusal is RESOURCE_EXHAUSTED with `ErrorInfo(reason="RATE_LIMITED")` and a `RetryInfo`
holding the time until the caller's next token. Methods without a limit, and calls with a
streaming response, pass through untouched. Methods are matched by the last segment of the
full method name ("Search" in "/umbra.connections.v1.ConnectionService/Search").

Memory stays bounded: at most `max_buckets` buckets (default 100,000) are kept,
least-recently-used first out; buckets that have refilled to full are dropped as soon as they
are the least recently used, since a full bucket is the same as no bucket. Evicting a bucket
that is not yet full hands its caller a fresh burst; that needs `max_buckets` distinct valid
tokens at once, and the cap is there to bound memory, not to be the limit.

Defaults (`DEFAULT_RATE_LIMITS`): every write RPC has one, so that no caller can grow the
audit log, notifications or outbox without bound (SPEC 10.9).

- Search: burst 20, one token back every second (20/1s): typing in a search box is fine,
  walking the handle space is not.
- SendRequest: burst 10, one token back every 30 seconds (10/30s); CancelRequest the same,
  since each cancel withdraws a request (and its notification) someone was shown.
- Respond, UpdateSharingOverrides: 30/2s (a user working through a list of requests or
  connections); RemoveConnection: 10/6s; MarkNotificationsRead: 30/1s; BlockUser and
  UnblockUser: 10/6s (each block may remove a connection and cancel requests; a tight
  block/unblock loop would churn someone's requests).
- UpsertUser, UpdateSettings: 1000/1ms, i.e. a burst of 1,000 and 1,000 a second
  sustained, per backend service (the token's `sub`): a backend speaks for all its users
  under one subject, so these are generous and only stop a runaway loop.

`UMBRA_RATE_LIMITS` (parsed by `parse_rate_limits`):

- ``default``: the limits above.
- ``off``: no limits.
- a comma list of ``Method=BURST/INTERVAL``, e.g. ``Search=20/1s,SendRequest=10/30s``: BURST
  is a whole number >= 1 (the bucket's size, so the number of calls allowed at once) and
  INTERVAL a positive decimal number with a unit ``ms``, ``s``, ``m`` or ``h``: the time for
  one token to come back. Each method may appear once; methods not listed are not limited
  (a list replaces the defaults as a whole: copy the ones to keep).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import grpc

from umbra_grpc.interceptors.handlers import (
    Context,
    Continuation,
    Handler,
    StreamBehavior,
    UnaryBehavior,
    wrap_handler,
)
from umbra_grpc.principal import current_principal
from umbra_grpc.rpc_errors import abort

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

RATE_LIMITED = "RATE_LIMITED"
DEFAULT_MAX_BUCKETS = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class BucketSpec:
    """A bucket of `burst` tokens, one of which comes back every `interval` seconds."""

    burst: int
    interval: float

    def __post_init__(self) -> None:
        if self.burst < 1 or not (self.interval > 0 and math.isfinite(self.interval)):
            raise ValueError(f"rate limit needs burst >= 1 and interval > 0, got {self}")


DEFAULT_RATE_LIMITS: Mapping[str, BucketSpec] = MappingProxyType(
    {
        "Search": BucketSpec(burst=20, interval=1.0),
        "SendRequest": BucketSpec(burst=10, interval=30.0),
        "CancelRequest": BucketSpec(burst=10, interval=30.0),
        "Respond": BucketSpec(burst=30, interval=2.0),
        "UpdateSharingOverrides": BucketSpec(burst=30, interval=2.0),
        "RemoveConnection": BucketSpec(burst=10, interval=6.0),
        "MarkNotificationsRead": BucketSpec(burst=30, interval=1.0),
        "BlockUser": BucketSpec(burst=10, interval=6.0),
        "UnblockUser": BucketSpec(burst=10, interval=6.0),
        "UpsertUser": BucketSpec(burst=1000, interval=0.001),
        "UpdateSettings": BucketSpec(burst=1000, interval=0.001),
    }
)


@dataclasses.dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    full_at: float


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Per-caller token buckets for the configured methods; refuses with `RATE_LIMITED`."""

    def __init__(
        self,
        limits: Mapping[str, BucketSpec] = DEFAULT_RATE_LIMITS,
        *,
        clock: Clock = time.monotonic,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self._limits = dict(limits)
        self._clock = clock
        self._max_buckets = max_buckets
        # (method, subject) -> bucket, least recently used first.
        self._buckets: collections.OrderedDict[tuple[str, str], _Bucket] = collections.OrderedDict()
        self.refusals: collections.Counter[str] = collections.Counter()
        """Refused calls, by method name."""

    @property
    def bucket_count(self) -> int:
        """How many buckets are held in memory now."""
        return len(self._buckets)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        spec = self._limits.get(method)
        if spec is None or handler.response_streaming:
            return handler

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def limited(request: Any, context: Context) -> Any:
                principal = current_principal.get()
                subject = "" if principal is None else principal.subject
                wait = self.take(method, subject, spec)
                if wait is not None:
                    self.refusals[method] += 1
                    logger.debug("rate limited: method=%s retry_after=%.3fs", method, wait)
                    await abort(
                        context,
                        RATE_LIMITED,
                        f"too many {method} calls; retry in {wait:.1f} s",
                        retry_after=wait,
                    )
                return await behavior(request, context)

            return limited

        def stream(behavior: StreamBehavior) -> StreamBehavior:
            return behavior  # unreachable: streaming responses are returned above

        return wrap_handler(handler, unary=unary, stream=stream)

    def take(self, method: str, subject: str, spec: BucketSpec) -> float | None:
        """Takes one token: None when allowed, else the seconds until a token is back."""
        now = self._clock()
        self._drop_full(now)
        key = (method, subject)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=float(spec.burst), updated=now, full_at=now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(spec.burst), bucket.tokens + elapsed / spec.interval)
            bucket.updated = now
        if bucket.tokens < 1:
            return (1 - bucket.tokens) * spec.interval
        bucket.tokens -= 1
        bucket.full_at = now + (spec.burst - bucket.tokens) * spec.interval
        return None

    def _drop_full(self, now: float) -> None:
        # Amortised O(1): each bucket is dropped at most once; stops at the first one in use.
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if bucket.full_at > now:
                return
            del self._buckets[key]


_LIMIT = re.compile(r"(\d+)/(\d+(?:\.\d+)?)(ms|s|m|h)")
_METHOD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate_limits(spec: str) -> dict[str, BucketSpec]:
    """Reads `UMBRA_RATE_LIMITS`: "default", "off" or "Method=BURST/INTERVAL,..."."""
    text = spec.strip()
    if text.lower() == "default":
        return dict(DEFAULT_RATE_LIMITS)
    if text.lower() == "off":
        return {}
    expected = (
        'expected "default", "off" or a comma list of Method=BURST/INTERVAL '
        '(e.g. "Search=20/1s,SendRequest=10/30s"; units ms, s, m, h)'
    )
    limits: dict[str, BucketSpec] = {}
    for raw in text.split(","):
        item = raw.strip()
        method, equals, limit = (part.strip() for part in item.partition("="))
        if not equals or not _METHOD.fullmatch(method):
            raise ValueError(f"rate limits: bad item {item!r} in {spec!r}; {expected}")
        if method in limits:
            raise ValueError(f"rate limits: {method} appears twice in {spec!r}")
        match = _LIMIT.fullmatch(limit)
        if match is None:
            raise ValueError(f"rate limits: bad limit {limit!r} in {spec!r}; {expected}")
        burst, number, unit = match.groups()
        interval = float(number) * _UNIT_SECONDS[unit]
        if int(burst) < 1 or interval <= 0:
            raise ValueError(
                f"rate limits: {item!r} needs a burst of at least 1 and an interval above 0"
            )
        limits[method] = BucketSpec(burst=int(burst), interval=interval)
    return limits
