"""`python -m bench.client`: one load-generating process, driven over stdin/stdout.

Protocol: the first stdin line is a JSON job; the client prepares (channels, tokens, warm-up)
and prints one JSON line (ready); it then waits for "go" (and, for watch jobs, "stop") and
prints one JSON line of results. Calls use raw bytes (requests serialized by the bench run,
responses not parsed unless needed), so the client spends as little CPU per call as it can.
Times are `time.perf_counter()` (CLOCK_MONOTONIC on Linux), comparable across processes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import sys
import time
import traceback
from collections import Counter
from typing import Any

import grpc

from umbra_grpc.pb import connections_pb2
from umbra_grpc.tokens import mint_token

# A unary method called with raw bytes both ways (no (de)serializers: the bench measures the
# service, not protobuf in the client).
Unary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]

WATCH_METHOD = "/umbra.connections.v1.ConnectionService/WatchIncomingRequests"
SEND_METHOD = "/umbra.connections.v1.ConnectionService/SendRequest"
CALL_TIMEOUT = 30.0
OPENING_AT_ONCE = 200

Metadata = tuple[tuple[str, str], ...]


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def read_line() -> str:
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if not line:
        raise EOFError("stdin closed")
    return line.strip()


def channel(target: str, *options: tuple[str, int]) -> grpc.aio.Channel:
    # Each channel its own TCP connection (channels to one target share one by default).
    return grpc.aio.insecure_channel(
        target, options=[("grpc.use_local_subchannel_pool", 1), *options]
    )


class Tokens:
    """Bearer metadata per user id, minted once."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._cache: dict[int, Metadata] = {}

    def __call__(self, user_id: int) -> Metadata:
        found = self._cache.get(user_id)
        if found is None:
            token = mint_token(self._secret, subject=str(user_id), ttl_seconds=3600)
            found = self._cache[user_id] = (("authorization", f"Bearer {token}"),)
        return found


def load_items(job: dict[str, Any]) -> list[tuple[int, bytes]]:
    with open(job["plan"]) as plan:
        items = json.load(plan)
    return [(int(uid), base64.b64decode(raw)) for uid, raw in items]


def code_name(error: grpc.aio.AioRpcError) -> str:
    return error.code().name


async def unary(job: dict[str, Any]) -> None:
    """Closed-loop load: `in_flight` workers, each calling as soon as its last call returned."""
    items = load_items(job)
    tokens = Tokens(job["secret"])
    metadata = [tokens(uid) for uid, _ in items]
    channels = [channel(job["target"]) for _ in range(job.get("channels", 1))]
    calls: list[Unary] = [ch.unary_unary(job["method"]) for ch in channels]
    in_flight = job["in_flight"]
    cycle = job.get("cycle", False)
    position = 0
    errors: Counter[str] = Counter()
    details: dict[str, str] = {}

    def take() -> int | None:
        nonlocal position
        if position >= len(items) and not cycle:
            return None
        index = position % len(items)
        position += 1
        return index

    async def warm(count: int) -> None:
        async def worker(n: int) -> None:
            call = calls[n % len(calls)]
            for _ in range(count // in_flight + 1):
                index = take()
                if index is None:
                    return
                try:
                    await call(items[index][1], metadata=metadata[index], timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    errors["warmup:" + code_name(error)] += 1

        await asyncio.gather(*(worker(n) for n in range(in_flight)))

    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 30)
        await warm(job.get("warmup_calls", 0))
        emit({"ready": True, "warmed": position})
        await read_line()

        latencies: list[int] = []
        duration = job["duration"]
        max_calls = job.get("max_calls")
        started = 0
        exhausted = False
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + duration
        last_done = t0

        async def worker(n: int) -> None:
            nonlocal started, exhausted, last_done
            call = calls[n % len(calls)]
            while time.perf_counter() < deadline:
                if max_calls is not None and started >= max_calls:
                    return
                index = take()
                if index is None:
                    exhausted = True
                    return
                started += 1
                request, md = items[index][1], metadata[index]
                begin = time.perf_counter()
                try:
                    await call(request, metadata=md, timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    errors[code_name(error)] += 1
                    details.setdefault(code_name(error), str(error.details())[:200])
                    continue
                end = time.perf_counter()
                if end <= deadline:
                    latencies.append(int((end - begin) * 1e6))
                    last_done = end

        await asyncio.gather(*(worker(n) for n in range(in_flight)))
        # A bounded run (max_calls, or items used up) ends at its last answer.
        ended_early = exhausted or (max_calls is not None and started >= max_calls)
        elapsed = (last_done if ended_early else deadline) - t0
        emit(
            {
                "count": len(latencies),
                "elapsed": elapsed,
                "latencies_us": latencies,
                "errors": dict(errors),
                "error_details": details,
                "consumed": position,
                "exhausted": exhausted,
                "client_cpu": time.process_time() - cpu0,
            }
        )
    finally:
        for ch in channels:
            await ch.close()


async def watch(job: dict[str, Any]) -> None:
    """Opens one stream per listed user (repeats allowed), records `received` events."""
    tokens = Tokens(job["secret"])
    users: list[int] = job["users"]
    per_channel = job.get("per_channel", 100)
    options = [tuple(option) for option in job.get("channel_options", [])]
    channels = [
        channel(job["target"], *options)
        for _ in range((len(users) + per_channel - 1) // per_channel)
    ]
    methods: list[grpc.aio.UnaryStreamMultiCallable[bytes, bytes]] = [
        ch.unary_stream(WATCH_METHOD) for ch in channels
    ]
    request = connections_pb2.WatchIncomingRequestsRequest().SerializeToString()
    events: list[tuple[int, float]] = []
    ended: Counter[str] = Counter()
    details: dict[str, str] = {}
    synced = 0
    all_synced = asyncio.Event()
    opening = asyncio.Semaphore(OPENING_AT_ONCE)
    parse = connections_pb2.WatchIncomingRequestsResponse.FromString

    async def follow(n: int, user_id: int) -> None:
        nonlocal synced
        await opening.acquire()
        held = True
        try:
            call = methods[n // per_channel](request, metadata=tokens(user_id), timeout=3000)
            async for raw in call:
                arrived = time.perf_counter()
                event = parse(raw)
                kind = event.WhichOneof("event")
                if kind == "received":
                    events.append((event.received.id, arrived))
                elif kind == "synced":
                    synced += 1
                    if held:
                        opening.release()
                        held = False
                    if synced + sum(ended.values()) >= len(users):
                        all_synced.set()
            ended["OK"] += 1
        except grpc.aio.AioRpcError as error:
            ended[code_name(error)] += 1
            details.setdefault(code_name(error), f"{error.details()} {error.debug_error_string()}")
        finally:
            if held:
                opening.release()
            if synced + sum(ended.values()) >= len(users):
                all_synced.set()

    started = time.perf_counter()
    tasks = [asyncio.create_task(follow(n, uid)) for n, uid in enumerate(users)]
    try:
        try:
            await asyncio.wait_for(all_synced.wait(), job.get("open_timeout", 240))
        except TimeoutError:
            raise TimeoutError(f"{synced} of {len(users)} synced, ended {dict(ended)}") from None
        emit(
            {
                "ready": True,
                "synced": synced,
                "seconds": time.perf_counter() - started,
                "ended": dict(ended),
                "details": details,
            }
        )
        while await read_line() != "stop":
            pass
        emit({"events": events, "ended": dict(ended), "synced": synced})
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()


async def send(job: dict[str, Any]) -> None:
    """SendRequest calls paced at `rate` per second: [request id, start, end] of each.

    The first `warmup` items are sent (at the same pace) before "ready" and not reported:
    they fill the server's connection pool and statement caches.
    """
    items = load_items(job)
    tokens = Tokens(job["secret"])
    ch = channel(job["target"])
    call: Unary = ch.unary_unary(SEND_METHOD)
    errors: Counter[str] = Counter()
    concurrency = job.get("concurrency", 4)
    interval = 1.0 / job["rate"]

    async def paced(batch: list[tuple[int, bytes]]) -> list[tuple[int, float, float]]:
        sent: list[tuple[int, float, float]] = []
        origin = time.perf_counter()

        async def worker(n: int) -> None:
            for index in range(n, len(batch), concurrency):
                delay = origin + index * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                uid, request = batch[index]
                begin = time.perf_counter()
                try:
                    raw = await call(request, metadata=tokens(uid), timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as error:
                    errors[code_name(error)] += 1
                    continue
                end = time.perf_counter()
                reply = connections_pb2.SendRequestResponse.FromString(raw)
                sent.append((reply.request.id, begin, end))

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        return sent

    try:
        await asyncio.wait_for(ch.channel_ready(), 30)
        warm = job.get("warm_method")
        for uid in sorted({uid for uid, _ in items}):
            if warm:  # the server then knows the token and has the caller's "is active"
                warm_call: Unary = ch.unary_unary(warm)
                await warm_call(b"", metadata=tokens(uid), timeout=CALL_TIMEOUT)
        warmup = job.get("warmup", 0)
        await paced(items[:warmup])
        warm_errors = dict(errors)
        errors.clear()
        emit({"ready": True, "warmup_errors": warm_errors})
        await read_line()
        sent = await paced(items[warmup:])
        emit({"sent": sent, "errors": dict(errors)})
    finally:
        await ch.close()


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def floor(job: dict[str, Any]) -> None:
    """Interleaved samples of each class; "control" spins before its call.

    A class is [caller id, request bytes, method, the status code it answers with]; a call
    that answers otherwise is counted in `errors` and not sampled. Open loop: one call every
    `interval` seconds whatever the answers, so that answers (all held to the same floor)
    come back evenly spaced instead of in bursts that queue behind each other in the client
    and the server; queueing jitter would hide a 0.2 ms difference.
    """
    tokens = Tokens(job["secret"])
    classes = {
        name: (int(uid), base64.b64decode(raw), method, expected)
        for name, (uid, raw, method, expected) in job["classes"].items()
    }
    control = job["control"]  # {"like": class name, "spin": seconds}
    names = [*classes, "control"]
    rng = random.Random(job.get("seed", 7))
    order: list[str] = []
    for _ in range(job["samples"]):
        triple = list(names)
        rng.shuffle(triple)
        order.extend(triple)
    ch = channel(job["target"])
    calls: dict[str, Unary] = {
        method: ch.unary_unary(method) for _, _, method, _ in classes.values()
    }
    samples: dict[str, list[int]] = {name: [] for name in names}
    errors: Counter[str] = Counter()
    try:
        await asyncio.wait_for(ch.channel_ready(), 30)
        for uid, _, _, _ in classes.values():
            tokens(uid)
        emit({"ready": True})
        await read_line()

        async def one(name: str) -> None:
            uid, request, method, expected = classes[control["like"] if name == "control" else name]
            begin = time.perf_counter()
            if name == "control":
                spin(control["spin"])
            try:
                await calls[method](request, metadata=tokens(uid), timeout=CALL_TIMEOUT)
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = code_name(error)
            elapsed = int((time.perf_counter() - begin) * 1e9)
            if code != expected:
                errors[f"{name}:{code}"] += 1
                return
            samples[name].append(elapsed)

        interval = job["interval"]
        origin = time.perf_counter()
        tasks = []
        for index, name in enumerate(order):
            delay = origin + index * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(name)))
        await asyncio.gather(*tasks)
        emit({"samples_ns": samples, "errors": dict(errors)})
    finally:
        await ch.close()


JOBS = {"unary": unary, "watch": watch, "send": send, "floor": floor}


async def main() -> None:
    job = json.loads(await read_line())
    try:
        await JOBS[job["kind"]](job)
    except Exception as error:
        emit({"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()})


if __name__ == "__main__":
    loop_factory = None
    if "--uvloop" in sys.argv:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner, contextlib.suppress(EOFError):
        runner.run(main())
