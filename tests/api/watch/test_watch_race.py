"""No event is lost or repeated between a watch stream's snapshot and its live events.

Real PostgreSQL, real server: requests are sent while streams are being opened, hundreds of
times, so that some commits land between the stream subscribing and reading its snapshot,
and (if the order were wrong) between reading the snapshot and subscribing. Whatever the
interleaving, snapshot + live must be exactly what was sent: nothing missing, nothing twice.

Each receiver also has older pending requests (written by SQL, before the cap's window), so
that its snapshot is long enough to arrive in several reads: that is the window in which a
stream subscribing after its snapshot would miss a commit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.api.streams import Event, next_event, send, until_synced, watch
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    start_server,
    stop_server,
)
from tests.support import test_config as make_config

pytestmark = pytest.mark.asyncio(loop_scope="session")
ROUNDS, PARALLEL, SENDERS, OLDER = 200, 8, 8, 150


@pytest_asyncio.fixture(loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """Room for SENDERS + 1 requests per receiver within the cap's window."""
    running = await start_server(make_config(database_url, pending_cap=SENDERS + 1))
    try:
        yield running
    finally:
        await stop_server(running)


async def older_requests(sql: Sql, receivers: list[TestUser]) -> dict[int, set[int]]:
    """OLDER pending requests an hour old to each receiver, from users made by SQL."""
    await sql.rows(
        "WITH made AS (INSERT INTO users (id, umbral_name) SELECT n, 'older' || n"
        " FROM generate_series(900000, 900000 + $1 - 1) AS n ON CONFLICT DO NOTHING"
        " RETURNING id) INSERT INTO settings (user_id) SELECT id FROM made",
        OLDER,
    )
    rows = await sql.rows(
        "INSERT INTO connection_requests (sender_id, receiver_id, created_at)"
        " SELECT sender, receiver, now() - interval '1 hour'"
        " FROM generate_series(900000, 900000 + $1 - 1) AS sender,"
        " unnest($2::bigint[]) AS receiver RETURNING id, receiver_id",
        OLDER,
        [receiver.id for receiver in receivers],
    )
    older: dict[int, set[int]] = {receiver.id: set() for receiver in receivers}
    for row in rows:
        older[row["receiver_id"]].add(row["id"])
    return older


async def one_round(
    connections: Connections, receiver: TestUser, senders: list[TestUser], marker: TestUser
) -> tuple[set[int], list[int], list[int]]:
    """Opens a stream while `senders` send to `receiver`; returns what was sent and seen."""
    call = watch(connections, receiver)
    try:
        # Sends start before, with and after the stream's opening (it is already on its way).
        sending = asyncio.gather(*(send(connections, sender, receiver) for sender in senders))
        snapshot = await until_synced(call)
        sent = {request.id for request in await sending}
        # A request sent once all the others committed: everything before it has arrived
        # when it does, so whatever is missing then was lost, and a repeat shows too.
        last = await send(connections, marker, receiver)
        live: list[Event] = []
        while (event := await next_event(call)).received.id != last.id:
            live.append(event)
    finally:
        call.cancel()
    assert all(event.WhichOneof("event") == "received" for event in snapshot + live)
    return sent, [event.received.id for event in snapshot], [e.received.id for e in live]


async def test_snapshot_plus_live_is_everything_sent_exactly_once(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    senders = [await new_user() for _ in range(SENDERS)]
    marker = await new_user()
    split = {"snapshot": 0, "live": 0, "both": 0}
    for start in range(0, ROUNDS, PARALLEL):
        receivers = list(await asyncio.gather(*(new_user() for _ in range(PARALLEL))))
        older = await older_requests(sql, receivers)
        results = await asyncio.gather(
            *(one_round(connections, receiver, senders, marker) for receiver in receivers)
        )
        for number, (receiver, (sent, snapshot, live)) in enumerate(
            zip(receivers, results, strict=True), start
        ):
            seen, mine = snapshot + live, older[receiver.id]
            assert len(seen) == len(set(seen)), f"round {number}: repeated {snapshot} + {live}"
            assert mine <= set(snapshot), f"round {number}: older requests missing"
            new = set(seen) - mine
            assert new == sent, f"round {number}: lost {sorted(sent - new)}"
            fresh = set(snapshot) - mine
            split["both" if fresh and live else "live" if live else "snapshot"] += 1
    # The race was run: some rounds split their requests between the snapshot and live events.
    assert split["both"] > 0, split
