"""Two answers that must take the same time, measured through a real server with the
production floors: a paired-difference equivalence test with a positive control.

Samples come in triples sent at the same moment (first class, second class, and a positive
control: the first class with 0.2 ms added to its measured time) in a random order, several
lanes at once; the median of the paired differences with its distribution-free (sign-test)
99.9 % interval must lie within +-0.1 ms (equivalence, not "no significant difference", so
noise can only make sampling longer), and the control's must lie above 0.1 ms. Sampling
stops once both intervals are narrower than the margin, after at least MIN_TRIPLES, or at
BUDGET_SECONDS. The bench (`make bench`) runs SPEC 8's KS test on the same pairs.

A test module imports `floored_server` (its fixture named `server`) and `assert_equivalent`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest_asyncio
from scipy.stats import binom

from tests.support import (
    Connections,
    RunningServer,
    TestUser,
    separate_channel,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.pb import connections_pb2_grpc

Stub = connections_pb2_grpc.ConnectionServiceStub
CONTROL_SECONDS = 0.0002  # as SPEC 8's positive control
MARGIN = CONTROL_SECONDS / 2
ALPHA = 0.001
LANES = 4
MIN_TRIPLES = 200
BATCH = 10
BUDGET_SECONDS = 40.0
NOBODY = "nobody-goes-by-this-name"


@pytest_asyncio.fixture(scope="module", loop_scope="session", name="server")
async def floored_server(database_url: str) -> AsyncIterator[RunningServer]:
    """The production floors, rate limits off."""
    running = await start_server(test_config(database_url, timing_floors="default"))
    try:
        yield running
    finally:
        await stop_server(running)


@dataclasses.dataclass
class Pair:
    """Two calls that must take the same time, per lane caller (LANES of them); both
    answer `code`."""

    callers: list[TestUser]
    call: Callable[[Connections, TestUser, bool], Awaitable[object]]  # (stub, caller, first?)
    code: grpc.StatusCode


def median_interval(differences: list[float]) -> tuple[float, float, float]:
    """Median of paired differences, and its 1 - ALPHA sign-test confidence interval."""
    ordered = sorted(differences)
    n = len(ordered)
    k = int(binom.ppf(ALPHA / 2, n, 0.5))
    assert k >= 1, f"too few samples ({n}) for a {1 - ALPHA:.1%} interval"
    return statistics.median(ordered), ordered[k - 1], ordered[n - k]


def in_ms(values: tuple[float, ...]) -> str:
    median, low, high = (round(value * 1000, 3) for value in values)
    return f"{median} ms [{low}, {high}]"


async def assert_equivalent(server: RunningServer, pair: Pair, label: str) -> None:
    """The pair's two calls take the same time, and the control is told apart."""
    channels = [separate_channel(server.target) for _ in range(LANES)]
    rng = random.Random(3)
    differences: dict[str, list[float]] = {"first": [], "control": []}

    async def timed(stub: Connections, caller: TestUser, name: str) -> float:
        started = time.perf_counter()
        try:
            await pair.call(stub, caller, name != "second")
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            code = error.code()
        elapsed = time.perf_counter() - started
        assert code == pair.code, (name, code)
        return elapsed + (CONTROL_SECONDS if name == "control" else 0.0)

    async def triples(stub: Connections, caller: TestUser, count: int) -> None:
        for _ in range(count):
            order = ["first", "second", "control"]
            rng.shuffle(order)
            took = dict(
                zip(
                    order,
                    await asyncio.gather(*(timed(stub, caller, name) for name in order)),
                    strict=True,
                )
            )
            for name in ("first", "control"):
                differences[name].append(took[name] - took["second"])

    async def round_of(count: int) -> None:
        await asyncio.gather(
            *(
                triples(Stub(channel), caller, count)
                for channel, caller in zip(channels, pair.callers, strict=True)
            )
        )

    def narrow_enough() -> bool:
        intervals = map(median_interval, differences.values())
        return all(high - low < MARGIN for _, low, high in intervals)

    try:
        await round_of(2)  # channels connected, callers cached, statements prepared
        for samples in differences.values():
            samples.clear()
        started = time.monotonic()
        while len(differences["first"]) < MIN_TRIPLES or (
            not narrow_enough() and time.monotonic() - started < BUDGET_SECONDS
        ):
            await round_of(BATCH)
        took = time.monotonic() - started
    finally:
        for channel in channels:
            await channel.close()

    first, control = median_interval(differences["first"]), median_interval(differences["control"])
    summary = (
        f"{label}: {len(differences['first'])} triples in {took:.1f}s; median"
        f" [{1 - ALPHA:.1%} interval] of first - second: {in_ms(first)}; of control - second:"
        f" {in_ms(control)}"
    )
    print(summary)
    assert -MARGIN < first[1] < first[2] < MARGIN, "the two answers differ: " + summary
    assert control[1] > MARGIN, "the control was not told apart: " + summary
