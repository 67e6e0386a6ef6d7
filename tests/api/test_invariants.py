"""The invariant checks of `tests/invariants.py` pass on what the service writes and catch
each kind of violation.

The rows come from real RPCs (every way a request can end, a removed connection, a deactivated
sender); each violation is then made by SQL inside a transaction that is rolled back, with the
constraint that would refuse it dropped in that transaction first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
import pytest_asyncio

from tests import invariants
from tests.rich import error_reason
from tests.support import Accounts, Connections, Metadata, NewUser, TestUser
from umbra_grpc.pb import accounts_pb2, connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
ACCEPT = pb.RespondRequest.ACTION_ACCEPT
REJECT = pb.RespondRequest.ACTION_REJECT
TEN_MINUTES = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class Scenario:
    """The users and request ids the checks are broken around."""

    a: TestUser
    b: TestUser
    c: TestUser
    connected: int  # a -> b, accepted
    pending: int  # c -> a
    removed: int  # e -> b, accepted, then removed
    rejected_early: int  # y -> x, rejected before `late` was sent
    resolved_late: int  # z -> x, rejected after `late` was sent
    late: int  # w -> x, pending


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def scenario(
    connections: Connections, accounts: Accounts, admin: Metadata, new_user: NewUser
) -> Scenario:
    a, b, c, d, e = [await new_user() for _ in range(5)]
    x, y, z, w = [await new_user() for _ in range(4)]

    async def send(sender: TestUser, receiver: TestUser) -> int:
        reply = await connections.SendRequest(
            pb.SendRequestRequest(umbral_name=receiver.handle), metadata=sender.md
        )
        return reply.request.id

    async def respond(
        receiver: TestUser, request_id: int, action: pb.RespondRequest.Action.ValueType
    ) -> None:
        await connections.Respond(
            pb.RespondRequest(request_id=request_id, action=action), metadata=receiver.md
        )

    connected = await send(a, b)
    await respond(b, connected, ACCEPT)
    pending = await send(c, a)
    cancelled = await send(b, c)
    await connections.CancelRequest(pb.CancelRequestRequest(request_id=cancelled), metadata=b.md)
    await respond(a, await send(d, a), REJECT)
    removed = await send(e, b)
    reply = await connections.Respond(
        pb.RespondRequest(request_id=removed, action=ACCEPT), metadata=b.md
    )
    await connections.RemoveConnection(
        pb.RemoveConnectionRequest(connection_id=reply.connection.id), metadata=b.md
    )
    inactive_sender = await send(e, d)
    await accounts.UpsertUser(
        accounts_pb2.UpsertUserRequest(user=accounts_pb2.User(id=e.id, umbral_name=e.handle)),
        metadata=admin,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await respond(d, inactive_sender, ACCEPT)
    assert error_reason(refused.value) == "SENDER_INACTIVE"

    rejected_early = await send(y, x)
    await respond(x, rejected_early, REJECT)
    resolved_late = await send(z, x)
    late = await send(w, x)
    await respond(x, resolved_late, REJECT)
    return Scenario(a, b, c, connected, pending, removed, rejected_early, resolved_late, late)


@pytest_asyncio.fixture(loop_scope="session")
async def conn(database_url: str, scenario: Scenario) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside a transaction that is rolled back: breaks stay in the test."""
    connection = await asyncpg.connect(database_url)
    transaction = connection.transaction()
    await transaction.start()
    try:
        yield connection
    finally:
        await transaction.rollback()
        await connection.close()


async def test_what_the_service_writes_holds_every_invariant(conn: asyncpg.Connection) -> None:
    assert await invariants.check_all(conn, cap=5, window=TEN_MINUTES) == []
    statuses = {row[0] for row in await conn.fetch("SELECT status FROM connection_requests")}
    assert statuses == {"pending", "accepted", "rejected", "cancelled"}


async def test_i1_two_pending_requests_between_one_pair(
    conn: asyncpg.Connection, scenario: Scenario
) -> None:
    await conn.execute("DROP INDEX uq_connection_requests_pending_pair")
    await conn.execute(
        "INSERT INTO connection_requests (sender_id, receiver_id) VALUES ($1, $2)",
        scenario.a.id,
        scenario.c.id,
    )
    [violation] = await invariants.i1_one_pending_request_per_pair(conn)
    assert violation.startswith("I1:")
    assert str(scenario.pending) in violation


async def test_i2_a_row_without_mirror_a_duplicate_and_a_self_connection(
    conn: asyncpg.Connection, scenario: Scenario
) -> None:
    a, b = scenario.a.id, scenario.b.id
    await conn.execute("ALTER TABLE user_connections DROP CONSTRAINT fk_user_connections_reverse")
    await conn.execute("ALTER TABLE user_connections DROP CONSTRAINT uq_user_connections_pair")
    await conn.execute("ALTER TABLE user_connections DROP CONSTRAINT ck_user_connections_not_self")
    await conn.execute(
        "DELETE FROM user_connections WHERE user_id = $1 AND connected_user_id = $2", b, a
    )
    [violation] = await invariants.i2_connections_are_symmetric(conn)
    assert "has no mirror row" in violation

    await conn.execute(
        """
        INSERT INTO user_connections (user_id, connected_user_id, person_id)
        SELECT user_id, connected_user_id, person_id FROM user_connections
        WHERE user_id = $1 AND connected_user_id = $2
        UNION ALL
        SELECT user_id, user_id, person_id FROM user_connections
        WHERE user_id = $1 AND connected_user_id = $2
        """,
        a,
        b,
    )
    found = await invariants.i2_connections_are_symmetric(conn)
    assert any(f"join {a} -> {b}" in v for v in found), found
    assert any("to themselves" in v for v in found), found


async def test_i3_cap_counts_what_was_pending_when_each_request_was_checked(
    conn: asyncpg.Connection, scenario: Scenario
) -> None:
    # x got three requests: one rejected before `late` was sent (never counts), one rejected
    # after (pending when `late` was checked), and `late` itself.
    found = await invariants.i3_pending_cap_per_window(conn, cap=1, window=TEN_MINUTES)
    late = [v for v in found if f"request {scenario.late} " in v]
    assert len(late) == 1, found
    assert f"[{scenario.resolved_late}]" in late[0]
    assert str(scenario.rejected_early) not in " ".join(found)

    assert await invariants.i3_pending_cap_per_window(conn, cap=2, window=TEN_MINUTES) == []
    # Outside the window nothing counts.
    assert await invariants.i3_pending_cap_per_window(conn, cap=1, window=dt.timedelta()) == []


async def test_i4_resolution_time_cards_and_rows_of_an_accept(
    conn: asyncpg.Connection, scenario: Scenario
) -> None:
    check = invariants.i4_resolution_and_accept_rows
    a, b = scenario.a.id, scenario.b.id
    await conn.execute(
        "ALTER TABLE connection_requests DROP CONSTRAINT ck_connection_requests_resolved_at"
    )
    await conn.execute(
        "UPDATE connection_requests SET resolved_at = NULL WHERE id = $1", scenario.removed
    )
    found = await check(conn)
    assert any(f"request {scenario.removed} is accepted with resolved_at None" in v for v in found)

    await conn.execute(
        "UPDATE connection_requests SET resolved_at = created_at WHERE id = $1", scenario.removed
    )
    found = await check(conn)
    # Its two (detached) cards no longer match any accept.
    assert sum("comes from no accept" in v for v in found) == 2, found

    await conn.execute(
        "UPDATE persons SET linked_user_id = NULL, is_umbral_contact = false"
        " WHERE owner_user_id = $1 AND linked_user_id = $2",
        a,
        b,
    )
    found = await check(conn)
    assert any("is not linked while they are connected" in v for v in found), found
    assert any(f"({a} -> {b}) has no accepted request" in v for v in found), found


async def test_i4_a_missing_card(conn: asyncpg.Connection, scenario: Scenario) -> None:
    await conn.execute(
        """
        DELETE FROM persons p USING connection_requests r
        WHERE r.id = $1 AND p.created_at = r.resolved_at AND p.owner_user_id = r.sender_id
        """,
        scenario.removed,
    )
    [violation] = await invariants.i4_resolution_and_accept_rows(conn)
    assert f"accepted request {scenario.removed}" in violation
    assert "0 cards, expected 1" in violation


async def test_i5_missing_and_misattributed_audit_rows(
    conn: asyncpg.Connection, scenario: Scenario
) -> None:
    check = invariants.i5_mutations_are_audited
    await conn.execute(
        "DELETE FROM audit_log WHERE action = 'connection.request_sent'"
        " AND detail->>'request_id' = $1",
        str(scenario.pending),
    )
    [violation] = await check(conn)
    assert f"request {scenario.pending} " in violation and "0 connection.request_sent" in violation

    await conn.execute(
        "UPDATE audit_log SET actor_id = $1 WHERE action = 'connection.accepted'"
        " AND detail->>'request_id' = $2",
        scenario.c.id,
        str(scenario.connected),
    )
    await conn.execute("DELETE FROM audit_log WHERE action = 'connection.removed'")
    found = await check(conn)
    assert any(
        f"request {scenario.connected} (accepted) was resolved by user {scenario.c.id}" in v
        for v in found
    ), found
    assert any("1 accepts, not connected now, but 0 connection.removed" in v for v in found), found
    assert len(found) == 3, found
