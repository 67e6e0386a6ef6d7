"""The fuzz loop: concurrent workers, a fixed seed, a call target and a time budget.

Call number `i` draws everything from `Random(f"{seed}:{i}")`: which method, who calls,
valid-shaped or hostile, the request, or raw bytes instead of a message, or a method that
does not exist. What it draws from (`Known`) fills up as responses come back, so a run is
repeatable in kind rather than call for call; every finding carries its request in text form.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tests.fuzz.calls import Client
from tests.fuzz.generator import Draw, Method, RequestMaker
from tests.fuzz.population import Population

RAW_SHARE = 0.05
UNKNOWN_METHOD_SHARE = 0.01
VALID_SHAPED_SHARE = 0.5
# Fixed byte strings every decoder should refuse or shrug off.
NASTY_BODIES = (
    b"\x0a\x02\xc3\x28",  # field 1, invalid UTF-8
    b"\x0a\x02\xc0\x80",  # field 1, overlong NUL
    b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
    b"\x0b",  # start group, never ended
    b"\x0c",  # end group, never started
    b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
    b"\x12\x05abc",  # a length just past the end
    b"\xfa\xff\xff\xff\x0f\x00",  # the largest field number
    b"\x00",  # field number 0
    b"\x1a\x02" * 20000,  # deeply nested, 40 KB
    b"\xa0\x1f\x01",  # an unknown field
)


@dataclass(frozen=True)
class Target:
    """A method and whose credentials it expects: "user", "admin" or "anonymous"."""

    method: Method
    audience: str


class Fuzzer:
    """Sends fuzzed calls until enough went out with valid tokens, or time is up."""

    def __init__(
        self,
        client: Client,
        maker: RequestMaker,
        population: Population,
        targets: Sequence[Target],
        *,
        seed: int,
        weights: dict[str, float],
    ) -> None:
        self._client = client
        self._maker = maker
        self._population = population
        self._targets = list(targets)
        counts = {audience: 0 for audience in weights}
        for target in targets:
            counts[target.audience] += 1
        self._weights = [weights[t.audience] / counts[t.audience] for t in self._targets]
        self._services = sorted({target.method.service for target in targets})
        self.seed = seed

    async def run(self, *, valid_calls: int, budget: float, workers: int) -> float:
        """Calls until `valid_calls` carried valid tokens or `budget` seconds passed."""
        started = time.monotonic()
        deadline = started + budget
        numbers = iter(range(10**9))
        record = self._client.record

        async def worker() -> None:
            while record.valid_token_calls < valid_calls and time.monotonic() < deadline:
                await self.one(next(numbers))

        await asyncio.gather(*(worker() for _ in range(workers)))
        return time.monotonic() - started

    async def one(self, index: int) -> None:
        """Call number `index`."""
        rng = random.Random(f"{self.seed}:{index}")
        target = rng.choices(self._targets, self._weights)[0]
        caller = self._population.caller(target.audience, rng)
        reads = rng.choice((0, 1, 2, 5))
        draw = Draw(rng, caller.owner, valid=rng.random() < VALID_SHAPED_SHARE)
        roll = rng.random()
        if roll < UNKNOWN_METHOD_SHARE:
            method = Method(
                service=rng.choice(self._services),
                name=rng.choice(("Nope", "search", "Search/", "", "Ünknown", "Respond2")),
                input=target.method.input,
                output=target.method.output,
                client_streaming=False,
                server_streaming=False,
            )
            await self._client.call(method, self._raw(draw, target.method), caller, index=index)
        elif roll < UNKNOWN_METHOD_SHARE + RAW_SHARE:
            body = self._raw(draw, target.method)
            await self._client.call(target.method, body, caller, index=index, reads=reads)
        else:
            request = self._maker.message(target.method.input, draw)
            await self._client.call(target.method, request, caller, index=index, reads=reads)

    def _raw(self, draw: Draw, method: Method) -> bytes:
        """Random bytes, a damaged real request, or a known-nasty encoding."""
        rng = draw.rng
        valid = self._maker.message(method.input, draw).SerializeToString()
        choice = rng.randrange(6)
        if choice == 0:
            return rng.randbytes(rng.choice((0, 1, 2, 5, 20, 100, 1000)))
        if choice == 1 and valid:
            damaged = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
            return bytes(damaged)
        if choice == 2 and valid:
            return valid[: rng.randrange(len(valid))]
        if choice == 3:
            return valid + rng.randbytes(rng.randint(1, 30))
        if choice == 4:
            return rng.choice(NASTY_BODIES)
        return valid + valid
