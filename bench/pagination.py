"""Pagination: the first page of a 1,000-row list against a page deep in a 1,000,000-row
list, latency at one in flight and throughput at 64."""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc

from bench import population as pop
from bench.harness import IN_FLIGHT, SERVICE, Bench, log
from umbra_grpc.config import Config
from umbra_grpc.domain.pages import PageTokens
from umbra_grpc.pb import connections_pb2 as pb
from umbra_grpc.server import page_token_key

PAGE_RATIO = 1.5


async def pagination_section(bench: Bench, target: str, pid: int) -> None:
    """First page of a 1,000-row list against a page deep in the large list."""
    log("pagination")
    sizes = bench.plan.sizes
    scope = "notifications.all"
    keys = PageTokens(page_token_key(Config(page_token_secret=bench.page_secret)))
    depth = int(sizes.large_list * 0.9)
    conn = await asyncpg.connect(bench.database_url(bench.databases[target]))
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
        md = bench.bearer(pop.LARGE_PAGES_USER)
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
            pb.ListNotificationsRequest(page_size=50, page_token=deep_token).SerializeToString(),
        ),
    }
    phases: dict[str, Any] = {}
    for label, item in requests.items():
        bench.pools[bench.databases[target]]["ListNotifications"] = [item]
        phases[label] = {
            "in_flight_1": await bench.load(
                target,
                "ListNotifications",
                in_flight=1,
                duration=bench.plan.one_duration,
                clients=1,
                meter_pids=[pid],
                warmup_calls=20,
                max_calls=bench.plan.page_samples,
            ),
            "in_flight_64": await bench.load(
                target,
                "ListNotifications",
                in_flight=IN_FLIGHT,
                duration=bench.plan.duration / 2,
                clients=bench.args.clients,
                meter_pids=[pid],
            ),
        }
    small, large = phases.values()
    ratio_p50 = large["in_flight_1"]["p50_ms"] / small["in_flight_1"]["p50_ms"]
    ratio_rps = small["in_flight_64"]["rps"] / large["in_flight_64"]["rps"]
    bench.results["pagination"] = {
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
