"""py-spy on the server while one RPC runs at 64 in flight: where the server's time goes.

`py-spy record --format raw` writes collapsed stacks ("frame;frame;... count"); the summary
groups samples by the innermost frame that belongs to a known layer (this service's
packages, SQLAlchemy, asyncpg, grpc, logging, asyncio), so that "what dominates" reads in
a few lines. Profiling slows the server down: its figures are not the bench's figures.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.harness import Bench

PY_SPY = Path(sys.executable).parent / "py-spy"
RATE = 250
LAYERS = (
    ("umbra_grpc/interceptors/access_log", "access log interceptor"),
    ("umbra_grpc/interceptors/auth", "auth interceptor"),
    ("umbra_grpc/tokens", "auth interceptor"),  # its token verification
    ("umbra_grpc/interceptors/", "other interceptors"),
    ("umbra_grpc/logs", "logging (JSON formatter)"),
    ("logging/", "logging (stdlib)"),
    ("prometheus_client", "metrics"),
    ("umbra_grpc/api/", "servicers and conversion"),
    ("umbra_grpc/domain/", "domain"),
    ("umbra_grpc/storage/", "storage (our SQL code)"),
    ("sqlalchemy/", "SQLAlchemy"),
    ("asyncpg/", "asyncpg"),
    ("google/protobuf", "protobuf"),
    ("grpc/", "grpc (Python part)"),
    ("asyncio/", "asyncio event loop"),
    ("uuid", "uuid"),
)


def summarize(raw: str, top: int = 15) -> dict[str, Any]:
    """Shares of samples by layer (innermost known frame) and by function (inclusive)."""
    layers: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if any("Thread.run" in frame or "threading.py" in frame for frame in frames[:4]):
            continue  # grpc's poller thread, waiting in epoll
        total += count
        layer = "other (grpc C core, interpreter)"
        for frame in reversed(frames):
            found = next((name for key, name in LAYERS if key in frame), None)
            if found:
                layer = found
                break
        layers[layer] += count
        for frame in set(frames):
            if "umbra_grpc/" in frame or "bench/" in frame:
                inclusive[frame] += count
    share = {name: round(n / total, 3) for name, n in layers.most_common()} if total else {}
    functions = (
        {frame: round(n / total, 3) for frame, n in inclusive.most_common(top)} if total else {}
    )
    return {"samples": total, "by_layer": share, "our_functions_inclusive": functions}


async def profile_phase(bench: Bench, target: str, pid: int, method: str) -> dict[str, Any]:
    """Runs `method` at 64 in flight for a few seconds with py-spy attached to `pid`."""
    out = bench.work / f"profile-{method}.txt"
    duration = max(bench.plan.duration, 1.0)
    spy = await asyncio.create_subprocess_exec(
        str(PY_SPY),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(RATE),
        "--duration",
        str(int(duration + 2)),
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(0.5)
        run = await bench.load(
            target,
            method,
            in_flight=64,
            duration=duration,
            clients=bench.args.clients,
            meter_pids=[pid],
        )
        await asyncio.wait_for(spy.wait(), duration + 30)
    finally:
        if spy.returncode is None:
            spy.kill()
            await spy.wait()
    if not out.exists():
        return {"method": method, "error": "py-spy wrote nothing (ptrace not allowed?)"}
    summary = summarize(out.read_text())
    return {
        "method": method,
        "tool": f"py-spy record --rate {RATE} --nonblocking (Python frames only)",
        "rps_while_profiled": run["rps"],
        **summary,
    }
