"""SPEC 10.13: descriptor-driven fuzzing of every RPC of a real `umbra-grpc serve` process.

The server runs as a subprocess (its own core on this 2-core box, and a crash is a dead
process) with rate limits and timing floors at their defaults, a 5 s pending-cap window (so
the window rolls over many times and I3 is exercised) and the push worker off (the fuzzer
writes arbitrary ntfy URLs; nothing should be POSTed to them). A population is seeded through
the real RPCs, then the fuzzer sends calls until at least FUZZ_CALLS (default 10,500) of them
carried valid tokens, within a time budget, 32 at a time.

Afterwards: no call ended INTERNAL or UNKNOWN, none hung, the process is alive and still
answers health and normal calls, its log has no ERROR line, invariants I1-I5 hold in the
database, and what the database holds matches what the calls were told (a failed call left
nothing behind, every successful mutation has its audit row).

`FUZZ_SEED=<n>` replays another seed; `-m fuzz` selects this test alone.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from tests import invariants
from tests.fuzz.calls import Client, Record
from tests.fuzz.fuzzer import Fuzzer, Target
from tests.fuzz.generator import Known, RequestMaker, methods
from tests.fuzz.population import ADMIN, Seeder, user_caller
from tests.serve import serving
from tests.support import separate_channel
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2, connections_pb2_grpc

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.fuzz]
pb = connections_pb2

SEED = int(os.environ.get("FUZZ_SEED", "20261210"))
VALID_CALLS = int(os.environ.get("FUZZ_CALLS", "10500"))
MIN_VALID_CALLS = 10_000
BUDGET_SECONDS = 60.0
WORKERS = 32
CHANNELS = 8
POPULATION = 150
PENDING_CAP = 5
PENDING_WINDOW = dt.timedelta(seconds=5)
# Who each service expects, and its share of the calls.
AUDIENCES = {
    connections_pb2.DESCRIPTOR.services_by_name["ConnectionService"]: "user",
    accounts_pb2.DESCRIPTOR.services_by_name["AccountService"]: "admin",
    health_pb2.DESCRIPTOR.services_by_name["Health"]: "anonymous",
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]: "anonymous",
}
WEIGHTS = {"user": 0.78, "admin": 0.16, "anonymous": 0.06}


def summary(name: str, record: Record, seconds: float) -> str:
    """Figures of one phase: calls, rate, outcomes by code and by method."""
    lines = [
        f"{name}: {record.calls} calls ({record.valid_token_calls} with valid tokens) in "
        f"{seconds:.1f}s = {record.calls / max(seconds, 1e-9):.0f} calls/s",
        "  by code: " + ", ".join(f"{c} {n}" for c, n in record.by_code().most_common()),
    ]
    methods_seen = sorted({method for method, _ in record.outcomes})
    for method in methods_seen:
        codes = [(c, n) for (m, c), n in record.outcomes.items() if m == method]
        reasons = [(r, n) for (m, r), n in record.reasons.items() if m == method]
        lines.append(
            f"  {method}: "
            + ", ".join(f"{c} {n}" for c, n in sorted(codes, key=lambda x: -x[1]))
            + ("; reasons " + ", ".join(f"{r} {n}" for r, n in sorted(reasons)) if reasons else "")
        )
    return "\n".join(lines)


def log_problems(log: str) -> list[str]:
    """ERROR lines and tracebacks of the server's log, each with a little context."""
    lines = log.splitlines()
    return [
        "\n".join(lines[i : i + 12])
        for i, line in enumerate(lines)
        if " ERROR " in line or line.startswith("Traceback")
    ]


async def still_serves(target: str) -> None:
    """Health says SERVING and ordinary calls work, for a new user too."""
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        newcomer = accounts_pb2.User(id=2**62, umbral_name="fuzz_survivor", is_active=True)
        await accounts_pb2_grpc.AccountServiceStub(channel).UpsertUser(
            accounts_pb2.UpsertUserRequest(user=newcomer), metadata=ADMIN.metadata, timeout=10
        )
        reply = await connections_pb2_grpc.ConnectionServiceStub(channel).ListConnections(
            pb.ListConnectionsRequest(), metadata=user_caller(2**62).metadata, timeout=10
        )
        assert list(reply.connections) == []


async def database_agrees(database_url: str, record: Record) -> list[str]:
    """Invariants I1-I5, and rows against what the calls were told."""
    conn = await asyncpg.connect(database_url)
    try:
        found = await invariants.check_all(conn, cap=PENDING_CAP, window=PENDING_WINDOW)
        counts = dict(
            await conn.fetch("SELECT status, count(*) FROM connection_requests GROUP BY status")
        )
        audits = dict(await conn.fetch("SELECT action, count(*) FROM audit_log GROUP BY action"))
        # What BlockUser swept away (SPEC 11), by audit action.
        by_blocks = dict(
            await conn.fetch(
                "SELECT action, count(*) FROM audit_log WHERE detail->>'reason' = 'block'"
                " GROUP BY action"
            )
        )
    finally:
        await conn.close()
    accepted = pb.ConnectionRequest.STATUS_ACCEPTED
    rejected = pb.ConnectionRequest.STATUS_REJECTED
    exact = {
        "requests written = SendRequest OK": (sum(counts.values()), record.ok("SendRequest")),
        "accepted = Respond OK accepted": (
            counts.get("accepted", 0),
            record.statuses[("Respond", accepted)],
        ),
        "rejected = Respond OK rejected + SENDER_INACTIVE": (
            counts.get("rejected", 0),
            record.statuses[("Respond", rejected)] + record.reasons[("Respond", "SENDER_INACTIVE")],
        ),
        "cancelled = CancelRequest OK + cancelled by blocks": (
            counts.get("cancelled", 0),
            record.ok("CancelRequest")
            + by_blocks.get("connection.request_cancelled", 0)
            + by_blocks.get("connection.request_cancelled_by_receiver", 0),
        ),
        "connection.removed audits = RemoveConnection OK + removed by blocks": (
            audits.get("connection.removed", 0),
            record.ok("RemoveConnection") + by_blocks.get("connection.removed", 0),
        ),
        "account.user_upserted audits = UpsertUser OK": (
            audits.get("account.user_upserted", 0),
            record.ok("UpsertUser"),
        ),
        "account.settings_updated audits = UpdateSettings OK": (
            audits.get("account.settings_updated", 0),
            record.ok("UpdateSettings"),
        ),
    }
    found += [
        f"{what}: {rows} rows, {calls} calls"
        for what, (rows, calls) in exact.items()
        if rows != calls
    ]
    # Calls that change nothing need not write an audit row; more rows than calls is a bug.
    at_most = {
        "connection.sharing_updated": record.ok("UpdateSharingOverrides"),
        "notifications.marked_read": record.ok("MarkNotificationsRead"),
    }
    found += [
        f"{action}: {audits.get(action, 0)} audit rows for {calls} successful calls"
        for action, calls in at_most.items()
        if audits.get(action, 0) > calls
    ]
    return found


@dataclass
class Run:
    """What the seeding and fuzzing phases came back with."""

    seeding: Record
    fuzzing: Record
    report: str

    def merged(self) -> Record:
        """Both phases' counts together."""
        record = Record()
        for phase in (self.seeding, self.fuzzing):
            record.outcomes.update(phase.outcomes)
            record.reasons.update(phase.reasons)
            record.statuses.update(phase.statuses)
        return record


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def seed_and_fuzz(target: str, server_pid: int) -> Run:
    """Seeds the population, then fuzzes; returns both phases' records and the figures."""
    every_method = methods(*AUDIENCES)
    targets = [
        Target(method, AUDIENCES[service])
        for service in AUDIENCES
        for method in every_method
        if method.service == service.full_name
    ]
    known = Known()
    channels = [separate_channel(target) for _ in range(CHANNELS)]
    try:
        seeding = Client(channels, known)
        started = time.monotonic()
        population = await Seeder(seeding, every_method, random.Random(SEED)).population(POPULATION)
        seeded_in = time.monotonic() - started
        fuzzing = Client(channels, known)
        fuzzer = Fuzzer(
            fuzzing, RequestMaker(known), population, targets, seed=SEED, weights=WEIGHTS
        )
        cpu = time.process_time(), cpu_seconds(server_pid)
        elapsed = await fuzzer.run(valid_calls=VALID_CALLS, budget=BUDGET_SECONDS, workers=WORKERS)
        client_cpu, server_cpu = time.process_time() - cpu[0], cpu_seconds(server_pid) - cpu[1]
    finally:
        for channel in channels:
            await channel.close()
    report = (
        f"seed {SEED}\n{summary('seeding', seeding.record, seeded_in)}\n"
        f"{summary('fuzzing', fuzzing.record, elapsed)}\n"
        f"  CPU while fuzzing: client {client_cpu:.1f}s, server {server_cpu:.1f}s"
    )
    return Run(seeding.record, fuzzing.record, report)


async def test_fuzzed_calls_never_fail_internally_and_leave_every_invariant_holding(
    database_url: str, tmp_path: Path
) -> None:
    async with serving(
        database_url,
        tmp_path,
        UMBRA_RATE_LIMITS="default",
        UMBRA_TIMING_FLOORS="default",
        UMBRA_PENDING_CAP=str(PENDING_CAP),
        UMBRA_PENDING_WINDOW_SECONDS=str(PENDING_WINDOW.total_seconds()),
        UMBRA_OUTBOX_ENABLED="false",
    ) as server:
        run = await seed_and_fuzz(server.target, server.process.pid)
        print(run.report)
        assert server.process.returncode is None, f"the server died\n{server.stderr[-5000:]}"
        # Read before the last checks' own calls add rows.
        violations = await database_agrees(database_url, run.merged())
        await still_serves(server.target)

    findings = run.seeding.findings + run.fuzzing.findings
    assert not findings, (
        f"{len(findings)} calls ended INTERNAL, UNKNOWN or past their deadline:\n"
        + "\n".join(map(str, findings))
        + f"\n{run.report}"
    )
    assert run.fuzzing.valid_token_calls >= min(MIN_VALID_CALLS, VALID_CALLS), (
        f"only {run.fuzzing.valid_token_calls} calls with valid tokens in "
        f"{BUDGET_SECONDS:.0f}s: make the fuzzer more concurrent, not the count smaller\n"
        f"{run.report}"
    )
    problems = log_problems(server.stderr)
    assert not problems, "the server logged errors:\n" + "\n---\n".join(problems[:20])
    assert not violations, "\n".join(violations) + f"\n{run.report}"
