"""`umbra-grpc serve --workers N` at N = 1 and 2."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from bench.harness import IN_FLIGHT, Bench, log

WORKERS_TARGET = 1.3


async def workers_section(bench: Bench) -> None:
    """`umbra-grpc serve --workers N` at N = 1 and 2 (GetSharedProfile, 64 in flight)."""
    cli = Path(sys.executable).parent / "umbra-grpc"
    runs: dict[str, Any] = {}
    for workers in (1, 2):
        log(f"serve --workers {workers}")
        server, target = await bench.server(
            f"workers-{workers}", argv=[str(cli), "serve", "--workers", str(workers)]
        )
        try:
            await asyncio.sleep(0.5)
            pids = server.serving_pids()
            run = await bench.load(
                target,
                "GetSharedProfile",
                in_flight=IN_FLIGHT,
                duration=bench.plan.workers_duration,
                clients=2,
                channels=4,
                meter_pids=pids,
                count_statements=False,
            )
            run["serving_processes"] = len(pids)
            runs[f"workers_{workers}"] = run
        finally:
            await bench.stop_server(server)
    ratio = runs["workers_2"]["rps"] / runs["workers_1"]["rps"]
    bench.results["workers"] = {
        **runs,
        "ratio": round(ratio, 3),
        "target": WORKERS_TARGET,
        "pass": ratio >= WORKERS_TARGET,
        "cores": os.cpu_count(),
        "note": (
            "2 client processes (4 connections each, so SO_REUSEPORT can spread them),"
            " the workers and PostgreSQL all share the machine's cores"
        ),
    }
