"""No timing oracle in blocks (SPEC 11), measured through a real server with the production
floors: BlockUser of an existing handle takes as long as of a handle nobody has, and a
blocked user's Search and SendRequest aimed at their blocker take as long as aimed at
nobody.

The method is the one of the Search floor's equivalence test (h4's
`tests/api/test_floor_equivalence.py`, written beside this one; the two should share one
helper once both are on main): samples in triples sent at the same moment (first class,
second class, and a positive control: the first class with 0.2 ms added to its measured
time) in a random order, several lanes at once; the median of the paired differences with
its distribution-free (sign-test) 99.9 % interval must lie within +-0.1 ms (equivalence,
not "no significant difference", so noise can only make sampling longer), and the
control's must lie above 0.1 ms. Sampling stops once both intervals are narrower than the
margin, after at least MIN_TRIPLES, or at BUDGET_SECONDS. The bench (`make bench`) runs
SPEC 8's KS test on the same pairs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import pytest_asyncio
from scipy.stats import binom

from tests.conftest import (
    NewUser,
    RunningServer,
    TestUser,
    separate_channel,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
Stub = connections_pb2_grpc.ConnectionServiceStub
CONTROL_SECONDS = 0.0002  # as SPEC 8's positive control
MARGIN = CONTROL_SECONDS / 2
ALPHA = 0.001
LANES = 4
MIN_TRIPLES = 200
BATCH = 10
BUDGET_SECONDS = 40.0
NOBODY = "nobody-goes-by-this-name"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """The production floors, rate limits off."""
    running = await start_server(test_config(database_url, timing_floors="default"))
    try:
        yield running
    finally:
        await stop_server(running)


@dataclasses.dataclass
class Pair:
    """Two calls that must take the same time, per lane caller; both answer `code`."""

    callers: list[TestUser]
    call: Callable[[Stub, TestUser, bool], Awaitable[object]]  # (stub, caller, first?)
    code: grpc.StatusCode


async def block_user(new_user: NewUser, connections) -> Pair:  # type: ignore[no-untyped-def]
    target = await new_user()

    def call(stub: Stub, caller: TestUser, first: bool) -> Awaitable[object]:
        handle = target.handle if first else NOBODY
        return stub.BlockUser(pb.BlockUserRequest(umbral_name=handle), metadata=caller.md)

    return Pair([await new_user() for _ in range(LANES)], call, grpc.StatusCode.OK)


async def _blocked_callers(new_user: NewUser, connections) -> tuple[TestUser, list[TestUser]]:  # type: ignore[no-untyped-def]
    blocker = await new_user()
    callers = [await new_user() for _ in range(LANES)]
    for caller in callers:
        await connections.BlockUser(
            pb.BlockUserRequest(umbral_name=caller.handle), metadata=blocker.md
        )
    return blocker, callers


async def blocked_search(new_user: NewUser, connections) -> Pair:  # type: ignore[no-untyped-def]
    blocker, callers = await _blocked_callers(new_user, connections)

    def call(stub: Stub, caller: TestUser, first: bool) -> Awaitable[object]:
        handle = blocker.handle if first else NOBODY
        return stub.Search(pb.SearchRequest(umbral_name=handle), metadata=caller.md)

    return Pair(callers, call, grpc.StatusCode.OK)


async def blocked_send(new_user: NewUser, connections) -> Pair:  # type: ignore[no-untyped-def]
    blocker, callers = await _blocked_callers(new_user, connections)

    def call(stub: Stub, caller: TestUser, first: bool) -> Awaitable[object]:
        handle = blocker.handle if first else NOBODY
        return stub.SendRequest(pb.SendRequestRequest(umbral_name=handle), metadata=caller.md)

    return Pair(callers, call, grpc.StatusCode.NOT_FOUND)


PAIRS = {
    "BlockUser: existing vs nonexistent handle": block_user,
    "blocked user's Search: blocker vs nonexistent": blocked_search,
    "blocked user's SendRequest: blocker vs nonexistent": blocked_send,
}


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


@pytest.mark.parametrize("label", list(PAIRS))
async def test_the_two_answers_take_the_same_time_and_a_control_is_told_apart(
    server: RunningServer, new_user: NewUser, connections, label: str
) -> None:
    pair = await PAIRS[label](new_user, connections)
    channels = [separate_channel(server.target) for _ in range(LANES)]
    rng = random.Random(3)
    differences: dict[str, list[float]] = {"first": [], "control": []}

    async def timed(stub: Stub, caller: TestUser, name: str) -> float:
        started = time.perf_counter()
        try:
            await pair.call(stub, caller, name != "second")
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            code = error.code()
        elapsed = time.perf_counter() - started
        assert code == pair.code, (name, code)
        return elapsed + (CONTROL_SECONDS if name == "control" else 0.0)

    async def triples(stub: Stub, caller: TestUser, count: int) -> None:
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
