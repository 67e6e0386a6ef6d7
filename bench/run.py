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

Everything listens on 127.0.0.1, every phase is bounded in time, and every process started
here is stopped in `finally` blocks, PostgreSQL last. About 4 minutes; `--smoke` under one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench import population as pop
from bench.echo import ECHO_METHOD, TAKE_STATEMENTS_METHOD
from bench.procs import (
    ROOT,
    ClientProcess,
    CpuMeter,
    ServerProcess,
    postgres_pids,
    rss_bytes,
)
from bench.profile import PY_SPY, profile_phase
from bench.stats import latency_summary
from umbra_grpc.config import Config
from umbra_grpc.domain.pages import PageTokens
from umbra_grpc.embedded import EmbeddedPostgres, free_port
from umbra_grpc.pb import connections_pb2 as pb
from umbra_grpc.server import page_token_key
from umbra_grpc.storage import migrate
from umbra_grpc.tokens import mint_token

SERVICE = "/umbra.connections.v1.ConnectionService/"
# SPEC 8: (statements max, throughput vs echo at 64 in flight).
TARGETS: dict[str, tuple[int, float]] = {
    "Search": (1, 0.45),
    "SendRequest": (4, 0.30),
    "Respond": (4, 0.25),
    "ListIncomingRequests": (1, 0.35),
    "ListConnections": (1, 0.35),
    "GetSharedProfile": (1, 0.45),
    "RemoveConnection": (3, 0.30),
    # SPEC 11
    "GetRelationships": (1, 0.35),
    "BlockUser": (3, 0.30),
}
CONSUMED = {"SendRequest", "Respond", "RemoveConnection", "BlockUser"}
ONE_IN_FLIGHT_P50_MS = 1.0
ONE_IN_FLIGHT_P99_MS = 2.0
WATCH_P99_MS = 20.0
WATCH_WARMUP_EVENTS = 50
IDLE_RSS_MB = 600.0
PAGE_RATIO = 1.5
KS_ALPHA = 0.001
CONTROL_SPIN_S = 0.0002
# Open loop, one Search every 3.5 ms: about 15 in flight under a 50 ms floor.
FLOOR_INTERVAL_S = 0.0035
WORKERS_TARGET = 1.3
IN_FLIGHT = 64
SEED_DATABASE = "bench_seed"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run."""

    sizes: pop.Sizes
    duration: float  # measured window at 64 in flight
    warmup_calls: int
    one_duration: float  # measured window at one in flight
    one_max_calls: int
    statement_calls: int
    watch_events: int
    watch_rate: float
    page_samples: int
    floor_samples: int
    workers_duration: float


FULL = Plan(
    sizes=pop.Sizes(
        list_size=60,
        sends=24_000,
        responds=24_000,
        removes=24_000,
        watchers=1_000,
        idle_streams=10_000,
        small_list=1_000,
        large_list=1_000_000,
        blocks=24_000,
    ),
    duration=2.5,
    warmup_calls=256,
    one_duration=1.5,
    one_max_calls=2_000,
    statement_calls=3,
    watch_events=400,
    watch_rate=100.0,
    page_samples=400,
    floor_samples=1_000,
    workers_duration=3.0,
)
SMOKE = Plan(
    sizes=pop.Sizes(
        list_size=60,
        sends=3_000,
        responds=3_000,
        removes=3_000,
        watchers=50,
        idle_streams=200,
        small_list=1_000,
        large_list=20_000,
        blocks=3_000,
    ),
    duration=0.3,
    warmup_calls=16,
    one_duration=0.2,
    one_max_calls=200,
    statement_calls=1,
    watch_events=20,
    watch_rate=100.0,
    page_samples=20,
    floor_samples=40,
    workers_duration=0.3,
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    """One run: the database, the servers, the plans; every section is a method."""

    def __init__(self, plan: Plan, work: Path, args: argparse.Namespace) -> None:
        self.plan = plan
        self.work = work
        self.args = args
        self.secret = secrets.token_urlsafe(48)
        self.page_secret = secrets.token_urlsafe(32)
        self.cluster: EmbeddedPostgres | None = None
        self.admin_url = ""
        self.servers: list[ServerProcess] = []
        self.clients: list[ClientProcess] = []
        self.plans: dict[str, list[pop.Item]] = {}
        # The calls still to make, per database (writes consume theirs), and which database
        # each server target uses.
        self.pools: dict[str, dict[str, list[pop.Item]]] = {}
        self.databases: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self._plan_files = 0
        self._turn = 0

    # -- set-up -------------------------------------------------------------------------

    async def database(self) -> None:
        self.cluster = EmbeddedPostgres(self.work / "postgres", durable=False)
        self.admin_url = self.cluster.start()
        await self.sql(f'CREATE DATABASE "{SEED_DATABASE}"')
        seed_url = self.database_url(SEED_DATABASE)
        await asyncio.to_thread(migrate.upgrade, seed_url)
        seeded = await pop.seed(seed_url, self.plan.sizes)
        self.plans = await pop.plans(seed_url, self.plan.sizes)
        self.results["seed"] = {"seconds": seeded, "sizes": dataclasses.asdict(self.plan.sizes)}
        log(f"seeded in {sum(seeded.values()):.1f}s: {seeded}")

    def database_url(self, name: str) -> str:
        return f"{self.admin_url.rpartition('/')[0]}/{name}"

    async def sql(self, statement: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def clone(self, name: str) -> str:
        """A fresh copy of the seeded database, with its own pool of calls to make."""
        await self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{SEED_DATABASE}" STRATEGY FILE_COPY')
        self.pools[name] = {method: list(items) for method, items in self.plans.items()}
        return self.database_url(name)

    def env(self, port: int, database_url: str, **overrides: str) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "UMBRA_DATABASE_URL": database_url,
            "UMBRA_LISTEN": f"127.0.0.1:{port}",
            "UMBRA_DATA_DIR": str(self.work / "data"),
            "UMBRA_JWT_SECRET": self.secret,
            "UMBRA_PAGE_TOKEN_SECRET": self.page_secret,
            "UMBRA_RATE_LIMITS": "off",
            "UMBRA_TIMING_FLOORS": "off",
            "UMBRA_LOG_FORMAT": "json",
            "UMBRA_LOG_LEVEL": "INFO",
            "UMBRA_GRACE_SECONDS": "1",
            # asyncio's own loop (`serve`'s default) unless a server is started with
            # uvloop=True, for the comparison.
            "UMBRA_EVENT_LOOP": "asyncio",
        }
        for name in list(env):
            if (
                name.startswith("UMBRA_")
                and name not in overrides
                and name
                not in (
                    "UMBRA_DATABASE_URL",
                    "UMBRA_LISTEN",
                    "UMBRA_DATA_DIR",
                    "UMBRA_JWT_SECRET",
                    "UMBRA_PAGE_TOKEN_SECRET",
                    "UMBRA_RATE_LIMITS",
                    "UMBRA_TIMING_FLOORS",
                    "UMBRA_LOG_FORMAT",
                    "UMBRA_LOG_LEVEL",
                    "UMBRA_GRACE_SECONDS",
                    "UMBRA_EVENT_LOOP",
                )
            ):
                del env[name]  # the caller's own UMBRA_* settings do not leak into the bench
        env.update(overrides)
        return env

    async def server(
        self,
        name: str,
        *,
        uvloop: bool = False,
        argv: Sequence[str] | None = None,
        database: bool = True,
        **env: str,
    ) -> tuple[ServerProcess, str]:
        """Starts a server on its own copy of the seeded database (`database=False`: none)."""
        port = free_port()
        command = list(argv) if argv else [sys.executable, "-m", "bench.server"]
        if uvloop:
            env["UMBRA_EVENT_LOOP"] = "uvloop"
        db_name = "bench_" + name.replace("-", "_")
        url = await self.clone(db_name) if database else self.database_url(SEED_DATABASE)
        process = ServerProcess(
            name, command, self.env(port, url, **env), self.work / f"{name}.log"
        )
        self.servers.append(process)
        target = f"127.0.0.1:{port}"
        self.databases[target] = db_name
        await process.start(target)
        log(f"server {name} (pid {process.pid}) on {target}")
        return process, target

    async def stop_server(self, process: ServerProcess) -> None:
        await process.stop()
        with contextlib.suppress(ValueError):
            self.servers.remove(process)

    def plan_file(self, items: Sequence[pop.Item]) -> str:
        self._plan_files += 1
        path = self.work / f"plan-{self._plan_files}.json"
        path.write_text(json.dumps([[uid, base64.b64encode(raw).decode()] for uid, raw in items]))
        return str(path)

    @contextlib.asynccontextmanager
    async def client_processes(
        self, jobs: Sequence[dict[str, Any]]
    ) -> AsyncIterator[list[tuple[ClientProcess, dict[str, Any]]]]:
        started: list[tuple[ClientProcess, dict[str, Any]]] = []
        try:
            for job in jobs:
                client = ClientProcess(job)
                self.clients.append(client)
                ready = await asyncio.wait_for(client.start(), 300)
                started.append((client, ready))
            yield started
        finally:
            for client, _ in started:
                await client.stop()
                with contextlib.suppress(ValueError):
                    self.clients.remove(client)

    async def cleanup(self) -> None:
        for client in list(self.clients):
            with contextlib.suppress(Exception):
                await client.stop()
        for server in list(self.servers):
            with contextlib.suppress(Exception):
                await server.stop()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.stop()

    # -- load phases ---------------------------------------------------------------------

    def take_items(self, target: str, method: str, count: int) -> tuple[list[pop.Item], bool]:
        """Calls for a phase: all of them (cycled) for reads, a fresh slice for writes."""
        pool = self.pools.get(self.databases[target], self.plans)
        if method not in CONSUMED:
            return pool[method], True
        taken, pool[method] = pool[method][:count], pool[method][count:]
        return taken, False

    def give_back(self, target: str, method: str, unused: list[pop.Item]) -> None:
        if method in CONSUMED:
            pool = self.pools[self.databases[target]]
            pool[method] = unused + pool[method]

    async def load(
        self,
        target: str,
        method: str,
        *,
        in_flight: int,
        duration: float,
        clients: int,
        meter_pids: Sequence[int] = (),
        pg_meter: bool = True,
        warmup_calls: int | None = None,
        max_calls: int | None = None,
        channels: int = 1,
        budget: int | None = None,
        count_statements: bool = True,
    ) -> dict[str, Any]:
        """One closed-loop phase against `target`; figures merged over client processes."""
        full_method = ECHO_METHOD if method == "Echo" else SERVICE + method
        warm = self.plan.warmup_calls if warmup_calls is None else warmup_calls
        need = budget or int(max(2_500 * duration, 100) + warm + in_flight)
        items, cycle = self.take_items(target, method, need)
        per_client = max(in_flight // clients, 1)
        if cycle:  # every client all of them, from a different start
            slices = [
                items[n * len(items) // clients :] + items[: n * len(items) // clients]
                for n in range(clients)
            ]
        else:
            slices = [items[n::clients] for n in range(clients)]
        jobs = [
            {
                "kind": "unary",
                "target": target,
                "method": full_method,
                "secret": self.secret,
                "plan": self.plan_file(part),
                "cycle": cycle,
                "in_flight": per_client,
                "channels": channels,
                "duration": duration,
                "warmup_calls": warm // clients,
                "max_calls": max_calls,
            }
            for part in slices
        ]
        server_meter = CpuMeter(meter_pids)
        pg = CpuMeter(postgres_pids(self.cluster.pgdata) if self.cluster and pg_meter else [])
        async with self.client_processes(jobs) as started:
            if count_statements:
                await self.take_statements(target)
            server_meter.start()
            pg.start()
            for client, _ in started:
                await client.go()
            if max_calls is None:  # the measured window is the duration: CPU over it alone
                await asyncio.sleep(duration)
                server_cpu, pg_cpu = server_meter.stop(), pg.stop()
            replies = [await client.result() for client, _ in started]
            if max_calls is not None:
                server_cpu, pg_cpu = server_meter.stop(), pg.stop()
        statements = await self.take_statements(target) if count_statements else None
        unused: list[pop.Item] = []
        for part, reply in zip(slices, replies, strict=True):
            unused.extend(part[reply["consumed"] :])
        self.give_back(target, method, unused)
        latencies = [us for reply in replies for us in reply["latencies_us"]]
        count = sum(reply["count"] for reply in replies)
        elapsed = max(reply["elapsed"] for reply in replies)
        errors: dict[str, int] = {}
        error_details: dict[str, str] = {}
        for reply in replies:
            for code, n in reply["errors"].items():
                errors[code] = errors.get(code, 0) + n
            error_details.update(reply["error_details"])
        return {
            "rps": round(count / elapsed, 1) if elapsed > 0 else 0.0,
            **latency_summary(latencies),
            "server_cpu_us_per_rpc": round(server_cpu / count * 1e6, 1) if count else None,
            "postgres_cpu_us_per_rpc": round(pg_cpu / count * 1e6, 1)
            if count and pg_meter
            else None,
            "statements_per_rpc_under_load": round(statements["count"] / count, 2)
            if count and statements
            else None,
            "client_cpu_share": [
                round(reply["client_cpu"] / max(reply["elapsed"], 1e-9), 2) for reply in replies
            ],
            "clients": clients,
            "in_flight": in_flight,
            "elapsed_s": round(elapsed, 3),
            "errors": errors,
            **({"error_details": error_details} if error_details else {}),
            "exhausted": any(reply["exhausted"] for reply in replies),
        }

    async def take_statements(self, target: str, user_id: int = pop.CALLERS[0]) -> dict[str, Any]:
        async with grpc.aio.insecure_channel(target) as channel:
            take = channel.unary_unary(TAKE_STATEMENTS_METHOD)
            raw = await take(b"", metadata=self.bearer(user_id), timeout=10)
        taken: dict[str, Any] = json.loads(raw)
        return taken

    def bearer(self, user_id: int) -> tuple[tuple[str, str], ...]:
        token = mint_token(self.secret, subject=str(user_id), ttl_seconds=3600)
        return (("authorization", f"Bearer {token}"),)

    # -- sections ------------------------------------------------------------------------

    async def unary_section(self) -> None:
        """Echo and every SPEC 8 RPC: 64 in flight on both loops, then one in flight.

        The machine is shared, so its speed drifts during a run: each RPC is compared with
        the mean of the echo phases just before and just after it (on the same server), and
        the run's echo figure is the mean of all echo phases.
        """
        await self.bare_reference()
        main, main_target = await self.server("main")
        seconds = await pop.seed_large_list(
            self.database_url(self.databases[main_target]), self.plan.sizes
        )
        self.results["seed"]["seconds"]["large_list"] = seconds
        log(f"large list seeded in {seconds}s")
        uv_target = None
        uv = None
        if not self.args.no_uvloop:
            uv, uv_target = await self.server("main-uvloop", uvloop=True)
        rpcs: dict[str, Any] = {}
        log("unary Echo")
        first = await self.measure("Echo", main_target, main.pid, uv_target, uv)
        rpcs["Echo (first)"] = first
        echo_runs = [first["in_flight_64"]["rps"]]
        before = echo_runs[0]
        methods = list(TARGETS)
        last: dict[str, Any] = {}
        for n, method in enumerate(methods):
            log(f"unary {method}")
            entry = await self.measure(method, main_target, main.pid, uv_target, uv)
            if n + 1 < len(methods):
                after = (await self.echo_phase(main_target, main.pid))["rps"]
            else:
                log("unary Echo")
                last = await self.measure("Echo", main_target, main.pid, uv_target, uv)
                after = last["in_flight_64"]["rps"]
            echo_runs.append(after)
            local = (before + after) / 2
            ratio = entry["in_flight_64"]["rps"] / local
            one = entry["in_flight_1"]
            entry.update(
                {
                    "echo_rps_before_after": [before, after],
                    "target_ratio": TARGETS[method][1],
                    "ratio": round(ratio, 3),
                    "pass": ratio >= TARGETS[method][1],
                    "one_in_flight_pass": one["p50_ms"] <= ONE_IN_FLIGHT_P50_MS
                    and one["p99_ms"] <= ONE_IN_FLIGHT_P99_MS,
                }
            )
            rpcs[method] = entry
            before = after
        rpcs["Echo (last)"] = last
        echo_rps = sum(echo_runs) / len(echo_runs)
        uv_echo = [
            e["uvloop_in_flight_64"]["rps"] for e in (first, last) if "uvloop_in_flight_64" in e
        ]
        uv_echo_rps = sum(uv_echo) / len(uv_echo) if uv_echo else None
        for method in TARGETS:
            entry = rpcs[method]
            entry["ratio_to_run_echo"] = round(entry["in_flight_64"]["rps"] / echo_rps, 3)
            if uv_echo_rps and "uvloop_in_flight_64" in entry:
                entry["uvloop_ratio"] = round(entry["uvloop_in_flight_64"]["rps"] / uv_echo_rps, 3)
        self.results["unary"] = {
            "echo_rps": round(echo_rps, 1),
            "echo_phases_rps": echo_runs,
            "uvloop_echo_rps": round(uv_echo_rps, 1) if uv_echo_rps else None,
            "rpcs": rpcs,
            "clients": self.args.clients,
            "note": (
                f"{self.args.clients} client process(es), {IN_FLIGHT} calls in flight in all;"
                " the client, the server and PostgreSQL share the machine's cores"
            ),
        }
        if uv_echo_rps:
            self.results["uvloop"] = uvloop_summary(rpcs, echo_rps, uv_echo_rps)
        if uv is not None:
            await self.stop_server(uv)
        await self.client_check(main_target, main.pid, last["in_flight_64"])
        await self.statements_section()
        await self.pagination_section(main_target, main.pid)
        if self.args.profile:
            await self.profile_section(main_target, main.pid)
        await self.stop_server(main)
        await self.outbox_cost()

    async def echo_phase(self, target: str, pid: int, clients: int | None = None) -> dict[str, Any]:
        return await self.load(
            target,
            "Echo",
            in_flight=IN_FLIGHT,
            duration=self.plan.duration,
            clients=clients or self.args.clients,
            meter_pids=[pid],
        )

    async def measure(
        self,
        method: str,
        target: str,
        pid: int,
        uv_target: str | None = None,
        uv: ServerProcess | None = None,
    ) -> dict[str, Any]:
        """64 in flight (and on uvloop, interleaved), then one in flight.

        The two loops take turns going first, so that a machine speeding up or slowing down
        during the run does not favour one of them.
        """
        plan = self.plan
        self._turn += 1
        servers = [("in_flight_64", target, pid)]
        if uv is not None and uv_target is not None:
            servers.append(("uvloop_in_flight_64", uv_target, uv.pid))
            if self._turn % 2 == 0:
                servers.reverse()
        entry: dict[str, Any] = {}
        for key, where, serving in servers:
            entry[key] = await self.load(
                where,
                method,
                in_flight=IN_FLIGHT,
                duration=plan.duration,
                clients=self.args.clients,
                meter_pids=[serving],
            )
        entry["in_flight_1"] = await self.load(
            target,
            method,
            in_flight=1,
            duration=plan.one_duration,
            clients=1,
            meter_pids=[pid],
            warmup_calls=20,
            max_calls=plan.one_max_calls,
            budget=plan.one_max_calls + 40,
        )
        return entry

    async def bare_reference(self) -> None:
        """Echo on a bare grpc.aio server: what the gRPC stack alone costs here."""
        log("bare grpc.aio echo")
        server, target = await self.server(
            "bare", argv=[sys.executable, "-m", "bench.bare"], database=False
        )
        try:
            self.results["bare_grpc_echo"] = {
                "in_flight_64": await self.load(
                    target,
                    "Echo",
                    in_flight=IN_FLIGHT,
                    duration=self.plan.duration,
                    clients=self.args.clients,
                    meter_pids=[server.pid],
                    pg_meter=False,
                    count_statements=False,
                ),
                "in_flight_1": await self.load(
                    target,
                    "Echo",
                    in_flight=1,
                    duration=self.plan.one_duration,
                    clients=1,
                    meter_pids=[server.pid],
                    pg_meter=False,
                    warmup_calls=20,
                    max_calls=self.plan.one_max_calls,
                    count_statements=False,
                ),
                "note": "grpc.aio server with the echo handler only: no interceptors, no logs",
            }
        finally:
            await self.stop_server(server)

    async def outbox_cost(self) -> None:
        """SendRequest and Respond with the outbox worker off: what delivery costs."""
        log("outbox worker off")
        server, target = await self.server("no-outbox", UMBRA_OUTBOX_ENABLED="false")
        try:
            runs = {}
            for method in ("Echo", "SendRequest", "Respond"):
                runs[method] = await self.load(
                    target,
                    method,
                    in_flight=IN_FLIGHT,
                    duration=self.plan.duration,
                    clients=self.args.clients,
                    meter_pids=[server.pid],
                )
            rpcs = self.results["unary"]["rpcs"]
            self.results["outbox_off"] = {
                "rpcs": runs,
                "ratios": {
                    method: round(runs[method]["rps"] / runs["Echo"]["rps"], 3)
                    for method in ("SendRequest", "Respond")
                },
                "server_cpu_us_with_worker": {
                    method: rpcs[method]["in_flight_64"]["server_cpu_us_per_rpc"]
                    for method in ("SendRequest", "Respond")
                },
                "note": (
                    "UMBRA_OUTBOX_ENABLED=false: rows are still written, nobody delivers them;"
                    " the difference is what the worker (one per process) costs per RPC"
                ),
            }
        finally:
            await self.stop_server(server)

    async def client_check(self, target: str, pid: int, one: dict[str, Any]) -> None:
        """Echo with two client processes against the last echo (one): is one the limit?"""
        self.results["client_check"] = {
            "1_client_processes": one,
            "2_client_processes": await self.echo_phase(target, pid, clients=2),
        }

    async def statements_section(self) -> None:
        """Statements per call, with the caller's "is active" answer cached (warm).

        On a server of its own whose caller cache keeps answers for an hour (as the tests'
        servers do): with the default second, a stall between the warming echo and the call
        (CI machines stall) let the cache expire and counted the caller check in the call.
        """
        log("statements")
        counts: dict[str, Any] = {}
        server, target = await self.server("statements", UMBRA_USER_CACHE_SECONDS="3600")
        async with grpc.aio.insecure_channel(target) as channel:
            echo = channel.unary_unary(ECHO_METHOD)
            take = channel.unary_unary(TAKE_STATEMENTS_METHOD)
            for method in ["Echo", *TARGETS]:
                call = echo if method == "Echo" else channel.unary_unary(SERVICE + method)
                items, _ = self.take_items(target, method, self.plan.statement_calls)
                seen = []
                texts: list[str] = []
                for uid, request in items[: self.plan.statement_calls]:
                    md = self.bearer(uid)
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
        self.results["statements"] = counts
        await self.stop_server(server)

    async def pagination_section(self, target: str, pid: int) -> None:
        """First page of a 1,000-row list against a page deep in the large list."""
        log("pagination")
        sizes = self.plan.sizes
        scope = "notifications.all"
        keys = PageTokens(page_token_key(Config(page_token_secret=self.page_secret)))
        depth = int(sizes.large_list * 0.9)
        conn = await asyncpg.connect(self.database_url(self.databases[target]))
        try:
            row = await conn.fetchrow(
                "SELECT created_at, id FROM notifications WHERE user_id = $1"
                " ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
                pop.LARGE_PAGES_USER,
                depth - 1,
            )
            expected_next = await conn.fetchval(
                "SELECT id FROM notifications WHERE user_id = $1"
                " ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
                pop.LARGE_PAGES_USER,
                depth,
            )
        finally:
            await conn.close()
        deep_token = keys.encode(scope, pop.LARGE_PAGES_USER, (row["created_at"], row["id"]))
        method = SERVICE + "ListNotifications"
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary(
                method,
                request_serializer=pb.ListNotificationsRequest.SerializeToString,
                response_deserializer=pb.ListNotificationsResponse.FromString,
            )
            md = self.bearer(pop.LARGE_PAGES_USER)
            # The server's own token for page 2 decodes with our key: same key, same format.
            first = await call(pb.ListNotificationsRequest(page_size=50), metadata=md)
            assert keys.decode(first.next_page_token, scope, pop.LARGE_PAGES_USER) is not None
            deep = await call(
                pb.ListNotificationsRequest(page_size=50, page_token=deep_token), metadata=md
            )
            assert len(deep.notifications) == 50
            assert deep.notifications[0].id == expected_next
        requests = {
            "first page of 1,000": (
                pop.SMALL_PAGES_USER,
                pb.ListNotificationsRequest(page_size=50).SerializeToString(),
            ),
            f"page at row {depth:,} of {sizes.large_list:,}": (
                pop.LARGE_PAGES_USER,
                pb.ListNotificationsRequest(
                    page_size=50, page_token=deep_token
                ).SerializeToString(),
            ),
        }
        phases: dict[str, Any] = {}
        for label, item in requests.items():
            self.pools[self.databases[target]]["ListNotifications"] = [item]
            phases[label] = {
                "in_flight_1": await self.load(
                    target,
                    "ListNotifications",
                    in_flight=1,
                    duration=self.plan.one_duration,
                    clients=1,
                    meter_pids=[pid],
                    warmup_calls=20,
                    max_calls=self.plan.page_samples,
                ),
                "in_flight_64": await self.load(
                    target,
                    "ListNotifications",
                    in_flight=IN_FLIGHT,
                    duration=self.plan.duration / 2,
                    clients=self.args.clients,
                    meter_pids=[pid],
                ),
            }
        small, large = phases.values()
        ratio_p50 = large["in_flight_1"]["p50_ms"] / small["in_flight_1"]["p50_ms"]
        ratio_rps = small["in_flight_64"]["rps"] / large["in_flight_64"]["rps"]
        self.results["pagination"] = {
            "phases": phases,
            "page_size": 50,
            "deep_cursor": (
                "minted with the server's page-token key (UMBRA_PAGE_TOKEN_SECRET, set by the"
                " bench) for the row at that depth; the server's own page-2 token decodes with"
                " the same key, and the deep page starts at the expected row"
            ),
            "latency_ratio_p50": round(ratio_p50, 3),
            "cost_ratio_throughput": round(ratio_rps, 3),
            "target": PAGE_RATIO,
            "pass": ratio_p50 <= PAGE_RATIO and ratio_rps <= PAGE_RATIO,
        }

    async def watch_section(self) -> None:
        """Event latency with `watchers` open streams, then RSS with `idle_streams`."""
        log("watch")
        sizes = self.plan.sizes
        # Watch streams count against their own limit (UMBRA_WATCH_MAX_STREAMS, 10,000 by
        # default), not UMBRA_MAX_CONCURRENT_RPCS: room above the streams opened here.
        limit = str(sizes.idle_streams + 2_000)
        server, target = await self.server("watch", UMBRA_WATCH_MAX_STREAMS=limit)
        try:
            rss_start = rss_bytes(server.pid)
            watchers = [pop.WATCHERS_FROM + n for n in range(sizes.watchers)]
            job = {"kind": "watch", "target": target, "secret": self.secret, "users": watchers}
            # The first events only warm the server (pool connections, statement caches).
            warmup = min(WATCH_WARMUP_EVENTS, sizes.watchers - self.plan.watch_events)
            receivers = watchers[: self.plan.watch_events + warmup]
            senders = [pop.WATCH_SENDERS[n % len(pop.WATCH_SENDERS)] for n in range(len(receivers))]
            send_items = [
                (s, pb.SendRequestRequest(umbral_name=pop.handle(r)).SerializeToString())
                for s, r in zip(senders, receivers, strict=True)
            ]
            send_job = {
                "kind": "send",
                "target": target,
                "secret": self.secret,
                "plan": self.plan_file(send_items),
                "rate": self.plan.watch_rate,
                "concurrency": 4,
                "warm_method": ECHO_METHOD,
                "warmup": warmup,
            }
            async with self.client_processes([job]) as watching:
                ((watcher, opened),) = watching
                await asyncio.sleep(1.0)  # let the opening burst settle
                rss_watchers = rss_bytes(server.pid)
                async with self.client_processes([send_job]) as sending:
                    ((sender, _),) = sending
                    await sender.go()
                    sent = await sender.result()
                await asyncio.sleep(0.5)
                await watcher.command("stop")
                arrived = await watcher.result()
                events = {rid: t for rid, t in arrived["events"]}
                from_return = []
                from_start = []
                for rid, begin, end in sent["sent"]:
                    if rid in events:
                        from_return.append((events[rid] - end) * 1e6)
                        from_start.append((events[rid] - begin) * 1e6)
                latency = {
                    "streams": sizes.watchers,
                    "open_seconds": round(opened["seconds"], 2),
                    "warmup_events": warmup,
                    "events_sent": len(sent["sent"]),
                    "events_received": len(from_return),
                    "send_errors": sent["errors"],
                    "from_sender_return": latency_summary(from_return),
                    "from_sender_start": latency_summary(from_start),
                    "negative_from_return": sum(1 for v in from_return if v < 0),
                    "target_p99_ms": WATCH_P99_MS,
                }
                latency["pass"] = (
                    latency["events_received"] == latency["events_sent"]
                    and latency["from_sender_return"]["p99_ms"] <= WATCH_P99_MS
                )
            # Idle streams: many users, at most 5 streams each and 100 per connection.
            await asyncio.sleep(0.5)
            rss_before_idle = rss_bytes(server.pid)
            idle_users = [
                pop.WATCHERS_FROM + sizes.watchers + n // pop.PENDING_CAP
                for n in range(sizes.idle_streams)
            ]
            processes = 4 if sizes.idle_streams >= 2_000 else 1
            jobs = [
                {
                    "kind": "watch",
                    "target": target,
                    "secret": self.secret,
                    "users": idle_users[n::processes],
                    "open_timeout": 240,
                }
                for n in range(processes)
            ]
            started = time.perf_counter()
            async with self.client_processes(jobs) as idle:
                opened_seconds = time.perf_counter() - started
                synced = sum(ready["synced"] for _, ready in idle)
                idle_ended: dict[str, int] = {}
                for _, ready in idle:
                    for code, n in ready["ended"].items():
                        idle_ended[code] = idle_ended.get(code, 0) + n
                await asyncio.sleep(1.0)
                rss_idle = rss_bytes(server.pid)
            rss = {
                "streams": synced,
                "wanted": sizes.idle_streams,
                "open_seconds": round(opened_seconds, 1),
                "ended_before_sync": idle_ended,
                "rss_mb_at_start": round(rss_start / 2**20, 1),
                "rss_mb_with_watchers": round(rss_watchers / 2**20, 1),
                "rss_mb_before_idle": round(rss_before_idle / 2**20, 1),
                "rss_mb": round(rss_idle / 2**20, 1),
                "kb_per_stream": round((rss_idle - rss_before_idle) / max(synced, 1) / 1024, 1),
                "target_mb": IDLE_RSS_MB,
            }
            rss["pass"] = synced == sizes.idle_streams and rss["rss_mb"] <= IDLE_RSS_MB
            self.results["watch"] = {"latency": latency, "idle_rss": rss}
        finally:
            await self.stop_server(server)

    async def floor_section(self) -> None:
        """KS tests under the default floors, each pair of answers with its own control:
        Search found vs not found (SPEC 8), and SPEC 11's no-oracle pairs: BlockUser of an
        existing vs a nonexistent handle, and a blocked user's Search and SendRequest
        aimed at their blocker vs at a handle nobody has."""
        log("timing floor")
        server, target = await self.server("floors", UMBRA_TIMING_FLOORS="default")

        def search(handle: str) -> bytes:
            return pb.SearchRequest(umbral_name=handle).SerializeToString()

        nobody = pop.NOT_FOUND_HANDLE
        # label: (caller, method, expected code, first class, second class)
        pairs = {
            "Search: found vs not found": (
                pop.FLOOR_CALLERS[0],
                "Search",
                "OK",
                search(pop.handle(pop.PARTNERS_FROM)),
                search(nobody),
            ),
            "BlockUser: existing vs nonexistent handle": (
                pop.FLOOR_BLOCKING_CALLER,
                "BlockUser",
                "OK",
                pb.BlockUserRequest(
                    umbral_name=pop.handle(pop.FLOOR_BLOCK_TARGET)
                ).SerializeToString(),
                pb.BlockUserRequest(umbral_name=nobody).SerializeToString(),
            ),
            "blocked user's Search: blocker vs nonexistent": (
                pop.FLOOR_BLOCKED,
                "Search",
                "OK",
                search(pop.handle(pop.FLOOR_BLOCKER)),
                search(nobody),
            ),
            "blocked user's SendRequest: blocker vs nonexistent": (
                pop.FLOOR_BLOCKED,
                "SendRequest",
                "NOT_FOUND",
                pb.SendRequestRequest(
                    umbral_name=pop.handle(pop.FLOOR_BLOCKER)
                ).SerializeToString(),
                pb.SendRequestRequest(umbral_name=nobody).SerializeToString(),
            ),
        }
        comparisons: dict[str, Any] = {}
        errors: dict[str, int] = {}
        try:
            for label, (caller, method, code, first, second) in pairs.items():
                log(f"timing floor: {label}")
                job = {
                    "kind": "floor",
                    "target": target,
                    "secret": self.secret,
                    "classes": {
                        "first": [caller, base64.b64encode(first).decode(), SERVICE + method, code],
                        "second": [
                            caller,
                            base64.b64encode(second).decode(),
                            SERVICE + method,
                            code,
                        ],
                    },
                    "control": {"like": "first", "spin": CONTROL_SPIN_S},
                    "samples": self.plan.floor_samples,
                    "interval": FLOOR_INTERVAL_S,
                }
                async with self.client_processes([job]) as started:
                    ((client, _),) = started
                    await client.go()
                    reply = await client.result()
                for name, count in reply["errors"].items():
                    errors[f"{label} {name}"] = count
                comparisons[label] = ks_comparison(reply["samples_ns"])
        finally:
            await self.stop_server(server)
        self.results["timing_floor"] = {
            "floors": "default (Search, BlockUser, UnblockUser, GetRelationships 50 ms on every"
            " outcome; SendRequest 50 ms on NOT_FOUND)",
            "comparisons": comparisons,
            "errors": errors,
            "alpha": KS_ALPHA,
            "pass": all(entry["pass"] for entry in comparisons.values()),
        }

    async def workers_section(self) -> None:
        """`umbra-grpc serve --workers N` at N = 1 and 2 (GetSharedProfile, 64 in flight)."""
        cli = Path(sys.executable).parent / "umbra-grpc"
        runs: dict[str, Any] = {}
        for workers in (1, 2):
            log(f"serve --workers {workers}")
            server, target = await self.server(
                f"workers-{workers}", argv=[str(cli), "serve", "--workers", str(workers)]
            )
            try:
                await asyncio.sleep(0.5)
                pids = server.serving_pids()
                run = await self.load(
                    target,
                    "GetSharedProfile",
                    in_flight=IN_FLIGHT,
                    duration=self.plan.workers_duration,
                    clients=2,
                    channels=4,
                    meter_pids=pids,
                    count_statements=False,
                )
                run["serving_processes"] = len(pids)
                runs[f"workers_{workers}"] = run
            finally:
                await self.stop_server(server)
        ratio = runs["workers_2"]["rps"] / runs["workers_1"]["rps"]
        self.results["workers"] = {
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

    async def profile_section(self, target: str, pid: int) -> None:
        """py-spy on the server during echo and during the RPC with the lowest ratio."""
        rpcs = self.results["unary"]["rpcs"]
        slowest = min(TARGETS, key=lambda method: rpcs[method]["ratio"])
        profiles = {}
        for method in ("Echo", slowest):
            log(f"profile {method}")
            profiles[method] = await profile_phase(self, target, pid, method)
        self.results["profile"] = profiles


def ks_comparison(samples_ns: dict[str, list[int]]) -> dict[str, Any]:
    """Two classes (`first`, `second`) that must not be told apart, and the control (`first`
    with a 0.2 ms spin) that must be: two-sample KS tests on the latencies."""
    from scipy.stats import ks_2samp

    samples = {name: [v / 1e3 for v in values] for name, values in samples_ns.items()}
    real = ks_2samp(samples["first"], samples["second"])
    control = ks_2samp(samples["control"], samples["second"])
    shifted = ks_2samp([v + CONTROL_SPIN_S * 1e6 for v in samples["first"]], samples["second"])
    return {
        "samples_per_class": {name: len(values) for name, values in samples.items()},
        "latency": {name: latency_summary(values) for name, values in samples.items()},
        "first_vs_second": {"ks": round(float(real.statistic), 4), "p": float(real.pvalue)},
        "control_spin_vs_second": {
            "ks": round(float(control.statistic), 4),
            "p": float(control.pvalue),
            "how": "a 0.2 ms busy spin inside the measured time of first-class calls",
        },
        "control_shift_vs_second": {
            "ks": round(float(shifted.statistic), 4),
            "p": float(shifted.pvalue),
            "how": "0.2 ms added to the measured first-class latencies",
        },
        "pass": bool(real.pvalue >= KS_ALPHA and control.pvalue < KS_ALPHA),
    }


def uvloop_summary(rpcs: dict[str, Any], echo_rps: float, uv_echo_rps: float) -> dict[str, Any]:
    """Throughput and server CPU per RPC, uvloop against the default loop, per RPC."""
    rows = {}
    for method, entry in rpcs.items():
        if "uvloop_in_flight_64" not in entry:
            continue
        base, uv = entry["in_flight_64"], entry["uvloop_in_flight_64"]
        rows[method] = {
            "rps": base["rps"],
            "uvloop_rps": uv["rps"],
            "rps_gain": round(uv["rps"] / base["rps"], 3) if base["rps"] else None,
            "server_cpu_us": base["server_cpu_us_per_rpc"],
            "uvloop_server_cpu_us": uv["server_cpu_us_per_rpc"],
        }
    gains = [row["rps_gain"] for row in rows.values() if row["rps_gain"]]
    geo = math.exp(sum(math.log(g) for g in gains) / len(gains)) if gains else None
    return {
        "rpcs": rows,
        "echo_rps": round(echo_rps, 1),
        "uvloop_echo_rps": round(uv_echo_rps, 1),
        "geometric_mean_gain": round(geo, 3) if geo else None,
        "wins": bool(geo and geo > 1.03),
    }


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


SECTIONS = ("unary", "watch", "floor", "workers")


def work_folder() -> Path:
    work = Path(tempfile.mkdtemp(prefix="umbra-bench-"))
    work.chmod(0o711)  # PostgreSQL runs as another user under root: it must pass through
    return work


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
        for name in SECTIONS:
            if name in wanted:
                await getattr(bench, f"{name}_section")()
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
