"""`python -m bench.run [--smoke] [--out PATH] [--doc PATH] [--sections ...]`: the bench.

1. A private PostgreSQL (`EmbeddedPostgres`, durable=False), migrated and seeded in bulk
   into a template database; every server gets its own copy.
2. `bench.server` in its own process (and, beside it, the same server on uvloop), driven by
   `bench.client` processes: echo and every SPEC 8 RPC at 64 calls in flight (throughput,
   p50/p99, server and PostgreSQL CPU per RPC) and at one in flight (p50/p99), with echo
   phases between the RPCs as local baselines; a bare grpc.aio echo for reference; the
   write RPCs again with the outbox worker off; py-spy on echo and the slowest RPC.
3. Statements per RPC, read from the server's `StatementCounter` through a bench-only RPC.
4. Watch: commit-to-client latency with 1,000 open streams; RSS with 10,000 idle streams.
5. Pagination: first page of a 1,000-row list against a page deep in a 1,000,000-row list.
6. Timing floor: KS tests, each with a 0.2 ms positive control: found vs not-found Search;
   BlockUser of an existing vs a nonexistent handle; a blocked user's Search and
   SendRequest aimed at their blocker vs at a nonexistent handle (SPEC 11).
7. `umbra-grpc serve --workers N` at N = 1 and 2.
8. Results to bench/results/latest.json and docs/PERFORMANCE.md (`bench.report`).

The harness (2, the load phase) is `bench.harness`; each section is a module: `bench.unary`
(2), `bench.statements` (3), `bench.watch` (4), `bench.pagination` (5), `bench.floor` (6),
`bench.workers` (7); the report is `bench.report` (8).

Everything listens on 127.0.0.1, every phase is bounded in time, and every process started
here is stopped in `finally` blocks, PostgreSQL last. About 4 minutes; `--smoke` under one.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.floor import floor_section
from bench.harness import FULL, SMOKE, Bench, log, machine, work_folder
from bench.procs import ROOT
from bench.profile import PY_SPY
from bench.unary import unary_section
from bench.watch import watch_section
from bench.workers import workers_section

# In running order; unary runs the statements and pagination sections on its main server.
SECTIONS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "unary": unary_section,
    "watch": watch_section,
    "floor": floor_section,
    "workers": workers_section,
}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = SMOKE if args.smoke else FULL
    work = work_folder()
    bench = Bench(plan, work, args)
    started = time.perf_counter()
    bench.results["meta"] = {
        **machine(),
        "command": "python -m bench.run" + (" --smoke" if args.smoke else ""),
        "smoke": args.smoke,
    }
    try:
        await bench.database()
        wanted = args.sections.split(",") if args.sections else SECTIONS
        for name, section in SECTIONS.items():
            if name in wanted:
                await section(bench)
    finally:
        await bench.cleanup()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    bench.results["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    return bench.results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--smoke", action="store_true", help="every section, tiny sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="markdown report (default docs/PERFORMANCE.md for a full run, none for --smoke)",
    )
    parser.add_argument("--clients", type=int, default=1, help="client processes at 64 in flight")
    parser.add_argument("--no-uvloop", action="store_true", help="skip the uvloop server")
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip py-spy on echo and the slowest RPC (always skipped with --smoke)",
    )
    parser.add_argument("--sections", help=f"comma list of {', '.join(SECTIONS)} (default all)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    args.profile = args.profile and not args.smoke and PY_SPY.exists()
    if importlib.util.find_spec("uvloop") is None:
        log("uvloop is not installed: the uvloop comparison is skipped")
        args.no_uvloop = True
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results in {args.out} ({results['meta']['seconds']}s)")
    doc = args.doc or (None if args.smoke else ROOT / "docs" / "PERFORMANCE.md")
    if doc is not None:
        from bench.report import render

        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render(results))
        log(f"report in {doc}")


if __name__ == "__main__":
    main()
