"""Statements per RPC, read from the server's `StatementCounter` through a bench-only RPC."""

from __future__ import annotations

import json
from typing import Any

import grpc

from bench.client import Unary
from bench.echo import ECHO_METHOD, TAKE_STATEMENTS_METHOD
from bench.harness import SERVICE, TARGETS, Bench, log


async def statements_section(bench: Bench) -> None:
    """Statements per call, with the caller's "is active" answer cached (warm).

    On a server of its own whose caller cache keeps answers for an hour (as the tests'
    servers do): with the default second, a stall between the warming echo and the call
    (CI machines stall) let the cache expire and counted the caller check in the call.
    """
    log("statements")
    counts: dict[str, Any] = {}
    server, target = await bench.server("statements", UMBRA_USER_CACHE_SECONDS="3600")
    async with grpc.aio.insecure_channel(target) as channel:
        echo: Unary = channel.unary_unary(ECHO_METHOD)
        take: Unary = channel.unary_unary(TAKE_STATEMENTS_METHOD)
        for method in ["Echo", *TARGETS]:
            call = echo if method == "Echo" else channel.unary_unary(SERVICE + method)
            items, _ = bench.take_items(target, method, bench.plan.statement_calls)
            seen = []
            texts: list[str] = []
            for uid, request in items[: bench.plan.statement_calls]:
                md = bench.bearer(uid)
                await echo(b"", metadata=md, timeout=10)  # caches "uid is active"
                await take(b"", metadata=md, timeout=10)
                await call(request, metadata=md, timeout=10)
                taken = json.loads(await take(b"", metadata=md, timeout=10))
                seen.append(taken["count"])
                texts = [" ".join(text.split())[:160] for text in taken["statements"]]
            budget = TARGETS[method][0] if method in TARGETS else 0
            counts[method] = {
                "count": max(seen),
                "counts": seen,
                "budget": budget,
                "pass": max(seen) <= budget,
                "statements": texts,
            }
    bench.results["statements"] = counts
    await bench.stop_server(server)
