"""The unary section: echo and every SPEC 8 RPC at 64 calls in flight (on both event loops)
and at one in flight, each against the echo phases around it; a bare grpc.aio echo; the
write RPCs with the outbox worker off; a second client process as a check; py-spy. It runs
the statements and pagination sections on its main server too."""

from __future__ import annotations

import math
import sys
from typing import Any

from bench import population as pop
from bench.harness import IN_FLIGHT, TARGETS, Bench, log
from bench.pagination import pagination_section
from bench.procs import ServerProcess
from bench.profile import profile_phase
from bench.statements import statements_section

ONE_IN_FLIGHT_P50_MS = 1.0
ONE_IN_FLIGHT_P99_MS = 2.0


async def unary_section(bench: Bench) -> None:
    """Echo and every SPEC 8 RPC: 64 in flight on both loops, then one in flight.

    The machine is shared, so its speed drifts during a run: each RPC is compared with
    the mean of the echo phases just before and just after it (on the same server), and
    the run's echo figure is the mean of all echo phases.
    """
    await bare_reference(bench)
    main, main_target = await bench.server("main")
    seconds = await pop.seed_large_list(
        bench.database_url(bench.databases[main_target]), bench.plan.sizes
    )
    bench.results["seed"]["seconds"]["large_list"] = seconds
    log(f"large list seeded in {seconds}s")
    uv_target = None
    uv = None
    if not bench.args.no_uvloop:
        uv, uv_target = await bench.server("main-uvloop", uvloop=True)
    rpcs: dict[str, Any] = {}
    log("unary Echo")
    first = await measure(bench, "Echo", main_target, main.pid, uv_target, uv)
    rpcs["Echo (first)"] = first
    echo_runs = [first["in_flight_64"]["rps"]]
    before = echo_runs[0]
    methods = list(TARGETS)
    last: dict[str, Any] = {}
    for n, method in enumerate(methods):
        log(f"unary {method}")
        entry = await measure(bench, method, main_target, main.pid, uv_target, uv)
        if n + 1 < len(methods):
            after = (await echo_phase(bench, main_target, main.pid))["rps"]
        else:
            log("unary Echo")
            last = await measure(bench, "Echo", main_target, main.pid, uv_target, uv)
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
    uv_echo = [e["uvloop_in_flight_64"]["rps"] for e in (first, last) if "uvloop_in_flight_64" in e]
    uv_echo_rps = sum(uv_echo) / len(uv_echo) if uv_echo else None
    for method in TARGETS:
        entry = rpcs[method]
        entry["ratio_to_run_echo"] = round(entry["in_flight_64"]["rps"] / echo_rps, 3)
        if uv_echo_rps and "uvloop_in_flight_64" in entry:
            entry["uvloop_ratio"] = round(entry["uvloop_in_flight_64"]["rps"] / uv_echo_rps, 3)
    bench.results["unary"] = {
        "echo_rps": round(echo_rps, 1),
        "echo_phases_rps": echo_runs,
        "uvloop_echo_rps": round(uv_echo_rps, 1) if uv_echo_rps else None,
        "rpcs": rpcs,
        "clients": bench.args.clients,
        "note": (
            f"{bench.args.clients} client process(es), {IN_FLIGHT} calls in flight in all;"
            " the client, the server and PostgreSQL share the machine's cores"
        ),
    }
    if uv_echo_rps:
        bench.results["uvloop"] = uvloop_summary(rpcs, echo_rps, uv_echo_rps)
    if uv is not None:
        await bench.stop_server(uv)
    await client_check(bench, main_target, main.pid, last["in_flight_64"])
    await statements_section(bench)
    await pagination_section(bench, main_target, main.pid)
    if bench.args.profile:
        await profile_section(bench, main_target, main.pid)
    await bench.stop_server(main)
    await outbox_cost(bench)


async def echo_phase(
    bench: Bench, target: str, pid: int, clients: int | None = None
) -> dict[str, Any]:
    return await bench.load(
        target,
        "Echo",
        in_flight=IN_FLIGHT,
        duration=bench.plan.duration,
        clients=clients or bench.args.clients,
        meter_pids=[pid],
    )


async def measure(
    bench: Bench,
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
    plan = bench.plan
    bench.turn += 1
    servers = [("in_flight_64", target, pid)]
    if uv is not None and uv_target is not None:
        servers.append(("uvloop_in_flight_64", uv_target, uv.pid))
        if bench.turn % 2 == 0:
            servers.reverse()
    entry: dict[str, Any] = {}
    for key, where, serving in servers:
        entry[key] = await bench.load(
            where,
            method,
            in_flight=IN_FLIGHT,
            duration=plan.duration,
            clients=bench.args.clients,
            meter_pids=[serving],
        )
    entry["in_flight_1"] = await bench.load(
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


async def bare_reference(bench: Bench) -> None:
    """Echo on a bare grpc.aio server: what the gRPC stack alone costs here."""
    log("bare grpc.aio echo")
    server, target = await bench.server(
        "bare", argv=[sys.executable, "-m", "bench.bare"], database=False
    )
    try:
        bench.results["bare_grpc_echo"] = {
            "in_flight_64": await bench.load(
                target,
                "Echo",
                in_flight=IN_FLIGHT,
                duration=bench.plan.duration,
                clients=bench.args.clients,
                meter_pids=[server.pid],
                pg_meter=False,
                count_statements=False,
            ),
            "in_flight_1": await bench.load(
                target,
                "Echo",
                in_flight=1,
                duration=bench.plan.one_duration,
                clients=1,
                meter_pids=[server.pid],
                pg_meter=False,
                warmup_calls=20,
                max_calls=bench.plan.one_max_calls,
                count_statements=False,
            ),
            "note": "grpc.aio server with the echo handler only: no interceptors, no logs",
        }
    finally:
        await bench.stop_server(server)


async def outbox_cost(bench: Bench) -> None:
    """SendRequest and Respond with the outbox worker off: what delivery costs."""
    log("outbox worker off")
    server, target = await bench.server("no-outbox", UMBRA_OUTBOX_ENABLED="false")
    try:
        runs = {}
        for method in ("Echo", "SendRequest", "Respond"):
            runs[method] = await bench.load(
                target,
                method,
                in_flight=IN_FLIGHT,
                duration=bench.plan.duration,
                clients=bench.args.clients,
                meter_pids=[server.pid],
            )
        rpcs = bench.results["unary"]["rpcs"]
        bench.results["outbox_off"] = {
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
        await bench.stop_server(server)


async def client_check(bench: Bench, target: str, pid: int, one: dict[str, Any]) -> None:
    """Echo with two client processes against the last echo (one): is one the limit?"""
    bench.results["client_check"] = {
        "1_client_processes": one,
        "2_client_processes": await echo_phase(bench, target, pid, clients=2),
    }


async def profile_section(bench: Bench, target: str, pid: int) -> None:
    """py-spy on the server during echo and during the RPC with the lowest ratio."""
    rpcs = bench.results["unary"]["rpcs"]
    slowest = min(TARGETS, key=lambda method: rpcs[method]["ratio"])
    profiles = {}
    for method in ("Echo", slowest):
        log(f"profile {method}")
        profiles[method] = await profile_phase(bench, target, pid, method)
    bench.results["profile"] = profiles


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
