"""Watch: commit-to-client latency with 1,000 open streams; RSS with 10,000 idle streams."""

from __future__ import annotations

import asyncio
import time

from bench import population as pop
from bench.echo import ECHO_METHOD
from bench.harness import Bench, log
from bench.procs import rss_bytes
from bench.stats import latency_summary
from umbra_grpc.pb import connections_pb2 as pb

WATCH_P99_MS = 20.0
WATCH_WARMUP_EVENTS = 50
IDLE_RSS_MB = 600.0


async def watch_section(bench: Bench) -> None:
    """Event latency with `watchers` open streams, then RSS with `idle_streams`."""
    log("watch")
    sizes = bench.plan.sizes
    # Watch streams count against their own limit (UMBRA_WATCH_MAX_STREAMS, 10,000 by
    # default), not UMBRA_MAX_CONCURRENT_RPCS: room above the streams opened here.
    limit = str(sizes.idle_streams + 2_000)
    server, target = await bench.server("watch", UMBRA_WATCH_MAX_STREAMS=limit)
    try:
        rss_start = rss_bytes(server.pid)
        watchers = [pop.WATCHERS_FROM + n for n in range(sizes.watchers)]
        job = {"kind": "watch", "target": target, "secret": bench.secret, "users": watchers}
        # The first events only warm the server (pool connections, statement caches).
        warmup = min(WATCH_WARMUP_EVENTS, sizes.watchers - bench.plan.watch_events)
        receivers = watchers[: bench.plan.watch_events + warmup]
        senders = [pop.WATCH_SENDERS[n % len(pop.WATCH_SENDERS)] for n in range(len(receivers))]
        send_items = [
            (s, pb.SendRequestRequest(umbral_name=pop.handle(r)).SerializeToString())
            for s, r in zip(senders, receivers, strict=True)
        ]
        send_job = {
            "kind": "send",
            "target": target,
            "secret": bench.secret,
            "plan": bench.plan_file(send_items),
            "rate": bench.plan.watch_rate,
            "concurrency": 4,
            "warm_method": ECHO_METHOD,
            "warmup": warmup,
        }
        async with bench.client_processes([job]) as watching:
            ((watcher, opened),) = watching
            await asyncio.sleep(1.0)  # let the opening burst settle
            rss_watchers = rss_bytes(server.pid)
            async with bench.client_processes([send_job]) as sending:
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
                "secret": bench.secret,
                "users": idle_users[n::processes],
                "open_timeout": 240,
            }
            for n in range(processes)
        ]
        started = time.perf_counter()
        async with bench.client_processes(jobs) as idle:
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
        bench.results["watch"] = {"latency": latency, "idle_rss": rss}
    finally:
        await bench.stop_server(server)
