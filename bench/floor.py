"""Timing floor: KS tests, each pair of answers with a 0.2 ms positive control."""

from __future__ import annotations

import base64
from typing import Any

from bench import population as pop
from bench.harness import SERVICE, Bench, log
from bench.stats import latency_summary
from umbra_grpc.pb import connections_pb2 as pb

KS_ALPHA = 0.001
CONTROL_SPIN_S = 0.0002
# Open loop, one Search every 3.5 ms: about 15 in flight under a 50 ms floor.
FLOOR_INTERVAL_S = 0.0035


async def floor_section(bench: Bench) -> None:
    """KS tests under the default floors, each pair of answers with its own control:
    Search found vs not found (SPEC 8), and SPEC 11's no-oracle pairs: BlockUser of an
    existing vs a nonexistent handle, and a blocked user's Search and SendRequest
    aimed at their blocker vs at a handle nobody has."""
    log("timing floor")
    server, target = await bench.server("floors", UMBRA_TIMING_FLOORS="default")

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
            pb.BlockUserRequest(umbral_name=pop.handle(pop.FLOOR_BLOCK_TARGET)).SerializeToString(),
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
            pb.SendRequestRequest(umbral_name=pop.handle(pop.FLOOR_BLOCKER)).SerializeToString(),
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
                "secret": bench.secret,
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
                "samples": bench.plan.floor_samples,
                "interval": FLOOR_INTERVAL_S,
            }
            async with bench.client_processes([job]) as started:
                ((client, _),) = started
                await client.go()
                reply = await client.result()
            for name, count in reply["errors"].items():
                errors[f"{label} {name}"] = count
            comparisons[label] = ks_comparison(reply["samples_ns"])
    finally:
        await bench.stop_server(server)
    bench.results["timing_floor"] = {
        "floors": "default (Search, BlockUser, UnblockUser, GetRelationships 50 ms on every"
        " outcome; SendRequest 50 ms on NOT_FOUND)",
        "comparisons": comparisons,
        "errors": errors,
        "alpha": KS_ALPHA,
        "pass": all(entry["pass"] for entry in comparisons.values()),
    }


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
