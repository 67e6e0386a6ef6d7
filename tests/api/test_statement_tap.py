"""The statement counter the budget tests read (SPEC 8) agrees with what PostgreSQL is asked.

The server's pool goes through a wire tap (`tests/pg_proxy.py`), which lists the statements
clients run as the server sees them. For every ConnectionService unary RPC, the statements
the code reported (the counter, background work included) must be exactly those on the wire:
a statement sent around the counter (on `conn.raw`, say) would make every budget test read
too little, and shows up here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from tests.pg_proxy import NotificationDroppingProxy
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    TestUser,
    start_server,
    stop_server,
    until,
)
from tests.support import test_config as make_config
from umbra_grpc.pb import connections_pb2
from umbra_grpc.storage.database import StatementCounter

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
T = TypeVar("T")
# What the server sends around the counter on purpose: the health monitor's ping and the
# listener probe's NOTIFY, background work that no RPC budget counts.
UNCOUNTED = {"SELECT 1", "SELECT pg_notify($1, $2)"}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def proxy(database_url: str) -> AsyncIterator[NotificationDroppingProxy]:
    tap = NotificationDroppingProxy(database_url)
    await tap.start()
    try:
        yield tap
    finally:
        await tap.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(
    database_url: str, proxy: NotificationDroppingProxy
) -> AsyncIterator[RunningServer]:
    """The pool through the tap (one connection: no new connection's set-up mid-test), the
    listener straight to the server; no push worker, no sweeper."""
    config = make_config(
        proxy.url,
        listen_database_url=database_url,
        db_pool_size=1,
        outbox_enabled=False,
        expiry_sweep_seconds=0,
    )
    running = await start_server(config)
    try:
        yield running
    finally:
        await stop_server(running)


def _plain(sql: str) -> str:
    return sql.strip().rstrip(";").strip()


class Tapped:
    """Makes RPCs and checks that the counter and the wire agree on each."""

    def __init__(self, proxy: NotificationDroppingProxy, counter: StatementCounter) -> None:
        self._proxy = proxy
        self._counter = counter
        self.checked: dict[str, int] = {}
        self.checking = False

    def _since(self, wire_from: int, counted_from: int) -> tuple[list[str], list[str]]:
        wire = [_plain(sql) for sql in self._proxy.executed[wire_from:]]
        counted = [_plain(sql) for sql in self._counter.statements[counted_from:]]
        return [sql for sql in wire if sql not in UNCOUNTED], counted

    def _agreed(self, wire_from: int, counted_from: int) -> tuple[list[str], list[str]] | None:
        wire, counted = self._since(wire_from, counted_from)
        return (wire, counted) if sorted(wire) == sorted(counted) else None

    async def __call__(self, label: str, call: Callable[[], Awaitable[T]]) -> T:
        wire_from, counted_from = len(self._proxy.executed), len(self._counter.statements)
        reply = await call()
        if not self.checking:
            return reply
        # The wire may still be behind (background work); anything sent around the counter
        # keeps them apart for good.
        _, counted = await until(
            lambda: self._agreed(wire_from, counted_from),
            within=10,
            what=lambda: (label, *self._since(wire_from, counted_from)),
            every=0.01,
        )
        assert counted, f"{label} ran no statement"
        self.checked[label] = len(counted)
        return reply


async def scenario(connections: Connections, new_user: NewUser, tapped: Tapped) -> None:
    """Every ConnectionService unary RPC once, each through `tapped`."""
    me, other, third = await new_user(), await new_user(), await new_user()

    def rpc(name: str, request: object, caller: TestUser) -> Callable[[], Awaitable[Any]]:
        return lambda: getattr(connections, name)(request, metadata=caller.md)

    await tapped("Search", rpc("Search", pb.SearchRequest(umbral_name=other.handle), me))
    sent = await tapped(
        "SendRequest", rpc("SendRequest", pb.SendRequestRequest(umbral_name=other.handle), me)
    )
    await tapped(
        "ListIncomingRequests", rpc("ListIncomingRequests", pb.ListIncomingRequestsRequest(), other)
    )
    await tapped(
        "ListOutgoingRequests", rpc("ListOutgoingRequests", pb.ListOutgoingRequestsRequest(), me)
    )
    answered = await tapped(
        "Respond",
        rpc(
            "Respond",
            pb.RespondRequest(request_id=sent.request.id, action=pb.RespondRequest.ACTION_ACCEPT),
            other,
        ),
    )
    connection = answered.connection.id
    await tapped("ListConnections", rpc("ListConnections", pb.ListConnectionsRequest(), other))
    await tapped(
        "GetConnection",
        rpc("GetConnection", pb.GetConnectionRequest(connection_id=connection), other),
    )
    await tapped(
        "GetSharedProfile",
        rpc("GetSharedProfile", pb.GetSharedProfileRequest(connection_id=connection), other),
    )
    await tapped(
        "GetContact",
        rpc("GetContact", pb.GetContactRequest(person_id=answered.connection.person_id), other),
    )
    await tapped("ListNotifications", rpc("ListNotifications", pb.ListNotificationsRequest(), me))
    await tapped(
        "MarkNotificationsRead",
        rpc("MarkNotificationsRead", pb.MarkNotificationsReadRequest(notification_ids=[1]), me),
    )
    overrides = pb.UpdateSharingOverridesRequest(
        connection_id=connection,
        overrides=pb.SharingOverrides(phone=False),
        update_mask=field_mask_pb2.FieldMask(paths=["phone"]),
    )
    await tapped("UpdateSharingOverrides", rpc("UpdateSharingOverrides", overrides, other))
    await tapped(
        "RemoveConnection",
        rpc("RemoveConnection", pb.RemoveConnectionRequest(connection_id=connection), other),
    )
    pending = await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=third.handle), metadata=me.md
    )
    await tapped(
        "CancelRequest",
        rpc("CancelRequest", pb.CancelRequestRequest(request_id=pending.request.id), me),
    )
    await tapped(
        "GetRelationships",
        rpc("GetRelationships", pb.GetRelationshipsRequest(umbral_names=[other.handle]), me),
    )
    await tapped("BlockUser", rpc("BlockUser", pb.BlockUserRequest(umbral_name=third.handle), me))
    await tapped("ListBlockedUsers", rpc("ListBlockedUsers", pb.ListBlockedUsersRequest(), me))
    await tapped(
        "UnblockUser", rpc("UnblockUser", pb.UnblockUserRequest(umbral_name=third.handle), me)
    )


async def test_every_rpc_counts_exactly_the_statements_postgresql_runs(
    connections: Connections,
    new_user: NewUser,
    server: RunningServer,
    proxy: NotificationDroppingProxy,
) -> None:
    counter = StatementCounter(background=True)
    counter.attach(server.service.db)
    tapped = Tapped(proxy, counter)
    # Once to prepare every statement and let asyncpg look up every type (its own queries),
    # then the pass that counts.
    await scenario(connections, new_user, tapped)
    tapped.checking = True
    await scenario(connections, new_user, tapped)
    unary = {
        method.name
        for method in pb.DESCRIPTOR.services_by_name["ConnectionService"].methods
        if not method.server_streaming
    }
    assert set(tapped.checked) == unary, tapped.checked
