"""`python -m cluster WORKDIR`: bring the topology up, run the scenario, check, tear down.

Prints the figures and writes them to cluster/results/latest.json; exits non-zero when any
check fails. `cluster/test-cluster.sh` (`make test-cluster`) installs the Debian packages
first and tears down again on any exit, interrupts included.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from cluster import checks
from cluster.scenario import ACTORS, WATCHERS, Scenario
from cluster.topology import (
    PENDING_CAP,
    PENDING_WINDOW,
    REPLICAS,
    Topology,
    remove,
    teardown,
    wait_for,
)
from tests.outbox.recorder import NtfyRecorder

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
SCENARIO_LIMIT_SECONDS = 300.0
STEADY_SECONDS = 8.0
REPLICA_DOWN_SECONDS = 3.0


def log(message: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {message}", flush=True)


async def run(topology: Topology) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    recorder = NtfyRecorder()
    await recorder.start()
    scenario = Scenario(topology, recorder)
    started = time.monotonic()
    await scenario.create_users()

    log("throughput: Search, 32 in flight, direct to one replica, then through HAProxy")
    direct = await scenario.throughput(topology.replica_target(1))
    balanced = await scenario.throughput(topology.lb_target)
    figures["throughput_calls_per_s"] = {
        "direct_one_replica": round(direct),
        "through_haproxy_two_replicas": round(balanced),
        "ratio": round(balanced / direct, 2),
    }

    background = [asyncio.create_task(scenario.watcher(user)) for user in WATCHERS]
    background += [asyncio.create_task(scenario.health_monitor(i)) for i in REPLICAS]
    background.append(asyncio.create_task(_progress(scenario)))
    actors = [asyncio.create_task(scenario.actor(random.Random(seed))) for seed in range(ACTORS)]
    load_started = time.monotonic()
    await asyncio.sleep(STEADY_SECONDS)  # load shaping: a steady stretch before the faults
    faults: list[tuple[str, float]] = []

    at = time.monotonic()  # the REST call returns once the switchover is done
    old, new = await asyncio.to_thread(topology.switchover)
    faults.append((f"switchover {old} -> {new}", at))
    log(f"switchover {old} -> {new}")
    await asyncio.to_thread(wait_for, "new leader", lambda: topology.role_of("leader") == new, 60)
    await scenario.settled(faults[-1][1])
    await asyncio.sleep(STEADY_SECONDS)

    killed = await asyncio.to_thread(topology.kill_primary_postgres)
    faults.append((f"SIGKILL postgres of primary {killed}", time.monotonic()))
    log(f"SIGKILL to the postmaster of {killed}")
    await asyncio.to_thread(
        wait_for, "failover", lambda: topology.role_of("leader") not in (None, killed), 90
    )
    await scenario.settled(faults[-1][1])
    rejoin_started = time.monotonic()
    await asyncio.to_thread(topology.wait_for_replication, 120)
    figures["killed_node_back_as_sync_standby_s"] = round(time.monotonic() - rejoin_started, 1)
    await asyncio.sleep(STEADY_SECONDS)

    scenario.replica_kills.append(at := time.monotonic())
    await asyncio.to_thread(topology.kill_replica, 2)
    faults.append(("SIGKILL service replica 2", at))
    log("SIGKILL to service replica 2")
    await asyncio.sleep(REPLICA_DOWN_SECONDS)  # the replica stays down this long, on purpose
    topology.start_replica(2)
    await asyncio.to_thread(topology.wait_for_replica, 2)
    await scenario.settled(faults[-1][1])
    await asyncio.sleep(STEADY_SECONDS)

    scenario.acting = False
    await asyncio.gather(*actors)
    load_ended = time.monotonic()
    log("load stopped; waiting for pushes and watchers to catch up")

    conn = await asyncpg.connect(topology.primary_url)
    try:
        drained = await _eventually(lambda: _drained(conn), within=60)
        in_sync = await _eventually(
            lambda: checks.watchers_in_sync(conn, scenario.seen, scenario.view),
            within=30,
        )
        scenario.watching = False
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        received = Counter(request.topic for request in recorder.received)
        rows = await conn.fetch(checks.STATUSES)
        figures["invariants_violations"] = await checks.invariants(
            conn, PENDING_CAP, PENDING_WINDOW
        )
        figures["lost_acknowledged_writes"] = await checks.lost_writes(conn, scenario.ledger)
        figures["requests_not_acknowledged_outside_ambiguous_pairs"] = checks.unacknowledged(
            rows, scenario.ledger
        )
        figures["watchers"] = in_sync
        figures["pushes"] = await checks.pushes(conn, received)
        figures["outbox_drained"] = drained
        figures["database"] = dict(Counter(row["status"] for row in rows))
    finally:
        await conn.close()
        await recorder.stop()
        for channel in scenario.channels:
            await channel.close()

    bounds = [t for _, t in faults] + [load_ended]
    figures["faults"] = [
        {
            "fault": name,
            **scenario.recovery(at, bounds[i + 1]),
            "health_not_serving_s": scenario.not_serving_spells(at, bounds[i + 1]),
        }
        for i, (name, at) in enumerate(faults)
    ]
    codes: Counter[str] = Counter()
    for (_, code), count in scenario.calls.items():
        codes[code] += count
    figures["calls_by_code"] = dict(codes)
    figures["calls_by_method_and_code"] = {
        f"{method} {code}": n for (method, code), n in sorted(scenario.calls.items())
    }
    figures["forbidden_codes"] = scenario.forbidden
    figures["anomalies"] = scenario.anomalies
    figures["landed_on_retry"] = dict(scenario.ledger.landed_on_retry)
    figures["ambiguous_pairs"] = len(scenario.ledger.ambiguous_pairs)
    figures["acknowledged"] = {
        "sent": len(scenario.ledger.sent),
        "accepted": len(scenario.ledger.accepted),
        "rejected": len(scenario.ledger.rejected),
        "cancelled": len(scenario.ledger.cancelled),
        "removed": len(scenario.ledger.removed),
    }
    figures["watch_stream_ends"] = dict(scenario.stream_ends)
    figures["health_transitions"] = [
        (round(t - started, 1), index, status) for t, index, status in scenario.health
    ]
    figures["load_seconds"] = round(load_ended - load_started, 1)
    figures["scenario_seconds"] = round(time.monotonic() - started, 1)
    return figures


async def _progress(scenario: Scenario) -> None:
    """A line every 5 s: calls by code since the last line, and the health of each replica."""
    last: Counter[str] = Counter()
    while True:
        await asyncio.sleep(5)
        now: Counter[str] = Counter()
        for (_, code), count in scenario.calls.items():
            now[code] += count
        health = {i: scenario.health_now(i) for i in REPLICAS}
        log(f"calls {dict(now - last)} health {health} streams {dict(scenario.stream_ends)}")
        last = now


async def _drained(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval("SELECT count(*) FROM outbox WHERE status = 'pending'")


async def _eventually(check: Any, within: float) -> Any:
    """Polls an async check until it reports success (True, or all zeros); the last answer."""
    deadline = time.monotonic() + within
    while True:
        answer = await check()
        good = answer is True or (isinstance(answer, dict) and not any(answer.values()))
        if good or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.5)


def verdict(figures: dict[str, Any]) -> list[str]:
    """Every failed check, in words (empty: the run passed)."""
    failed = []
    if figures["forbidden_codes"]:
        failed.append(f"calls ended INTERNAL/UNKNOWN: {figures['forbidden_codes'][:5]}")
    if figures["anomalies"]:
        failed.append(f"unexpected answers: {figures['anomalies'][:5]}")
    if figures["lost_acknowledged_writes"]:
        failed.append(f"acknowledged writes lost: {figures['lost_acknowledged_writes'][:5]}")
    if figures["requests_not_acknowledged_outside_ambiguous_pairs"]:
        failed.append("requests written that no client was told of")
    if any(figures["invariants_violations"].values()):
        failed.append(f"invariants violated: {figures['invariants_violations']}")
    if any(figures["watchers"].values()):
        failed.append(f"watchers out of sync: {figures['watchers']}")
    if figures["pushes"]["undelivered"] or figures["pushes"]["topics_short_of_posts"]:
        failed.append(f"pushes not delivered: {figures['pushes']}")
    db_faults = figures["faults"][:2]
    for fault in db_faults:
        if not all(fault["health_not_serving_s"].values()):
            failed.append(f"health never went NOT_SERVING on every replica: {fault['fault']}")
    for fault in figures["faults"]:
        if fault["recovered_after_s"] is None:
            failed.append(f"no successful write after {fault['fault']}")
    if figures["scenario_seconds"] > SCENARIO_LIMIT_SECONDS:
        failed.append(f"scenario took {figures['scenario_seconds']}s")
    return failed


def main() -> int:
    workdir = Path(sys.argv[1])
    topology = Topology(workdir)
    try:
        began = time.monotonic()
        log(f"bringing the topology up in {workdir}")
        topology.up()
        log(f"up in {time.monotonic() - began:.1f}s: {topology.members()}")
        figures = asyncio.run(run(topology))
    finally:
        log("tearing down")
        teardown(workdir)
    failed = verdict(figures)
    figures["passed"] = not failed
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=1, default=str) + "\n")
    _print(figures)
    for reason in failed:
        print(f"FAILED: {reason}")
    if not failed:
        remove(workdir)
    print(f"{'1 passed, 0 failed' if not failed else '0 passed, 1 failed'}")
    return 1 if failed else 0


def _print(figures: dict[str, Any]) -> None:
    skip = {"health_transitions", "calls_by_method_and_code"}
    print("\n== cluster scenario figures (cluster/results/latest.json has them all)")
    for key, value in figures.items():
        if key not in skip:
            print(f"{key}: {json.dumps(value, default=str)}")


if __name__ == "__main__":
    sys.exit(main())
