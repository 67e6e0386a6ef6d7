"""The bench's harness: sizes (`Plan`), the private PostgreSQL, server and client processes,
and the closed-loop load phase every section is built from (`Bench`)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench import population as pop
from bench.client import Unary
from bench.echo import ECHO_METHOD, TAKE_STATEMENTS_METHOD
from bench.procs import (
    ROOT,
    ClientProcess,
    CpuMeter,
    ServerProcess,
    postgres_pids,
)
from bench.stats import latency_summary
from umbra_grpc.embedded import EmbeddedPostgres, free_port
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
    """One run: the database, the servers, the plans, the results; each section is a function
    of its own module that takes it (`bench.run.SECTIONS`)."""

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
        self.turn = 0  # which loop goes first in `unary.measure`

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
            take: Unary = channel.unary_unary(TAKE_STATEMENTS_METHOD)
            raw = await take(b"", metadata=self.bearer(user_id), timeout=10)
        taken: dict[str, Any] = json.loads(raw)
        return taken

    def bearer(self, user_id: int) -> tuple[tuple[str, str], ...]:
        token = mint_token(self.secret, subject=str(user_id), ttl_seconds=3600)
        return (("authorization", f"Bearer {token}"),)


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


def work_folder() -> Path:
    work = Path(tempfile.mkdtemp(prefix="umbra-bench-"))
    work.chmod(0o711)  # PostgreSQL runs as another user under root: it must pass through
    return work
