"""Bounded growth on the request path (SPEC 10.9): every write RPC has a default per-caller
rate limit, and an UpdateSharingOverrides that changes nothing writes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from tests.rich import expect_error, outcome, retry_delay
from tests.support import (
    Connections,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    start_server,
    stop_server,
    test_config,
)
from umbra_grpc.interceptors.rate_limit import (
    DEFAULT_RATE_LIMITS,
    RateLimitInterceptor,
    parse_rate_limits,
)
from umbra_grpc.pb import accounts_pb2, connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
ACCEPT = pb.RespondRequest.ACTION_ACCEPT
USER_WRITES = (
    "SendRequest",
    "Respond",
    "CancelRequest",
    "UpdateSharingOverrides",
    "RemoveConnection",
    "MarkNotificationsRead",
)
BACKEND_WRITES = ("UpsertUser", "UpdateSettings")


def _write_methods() -> set[str]:
    """Every RPC of both services that writes: all but the reads, found by name."""
    services = (
        connections_pb2.DESCRIPTOR.services_by_name["ConnectionService"],
        accounts_pb2.DESCRIPTOR.services_by_name["AccountService"],
    )
    reads = ("Search", "List", "Get", "Watch")
    return {
        method.name
        for service in services
        for method in service.methods
        if not method.name.startswith(reads)
    }


async def test_every_write_rpc_has_a_default_limit() -> None:
    assert _write_methods() >= {*USER_WRITES, *BACKEND_WRITES}
    limits = parse_rate_limits("default")
    assert set(limits) >= _write_methods()
    # Backend services speak for many users under one subject: their limits are generous.
    for method in BACKEND_WRITES:
        assert limits[method].burst >= 1000 and limits[method].interval <= 0.001
    assert limits == dict(DEFAULT_RATE_LIMITS)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    """The default rate limits, as in production."""
    running = await start_server(test_config(database_url, rate_limits="default"))
    try:
        yield running
    finally:
        await stop_server(running)


# A well-formed call of each user write RPC that is cheap to repeat: the limit is taken
# before the call runs, whatever its answer.
USER_CALLS = {
    "SendRequest": pb.SendRequestRequest(umbral_name="nobody-by-that-name"),
    "Respond": pb.RespondRequest(request_id=987_654_321, action=ACCEPT),
    "CancelRequest": pb.CancelRequestRequest(request_id=987_654_321),
    "UpdateSharingOverrides": pb.UpdateSharingOverridesRequest(
        connection_id=987_654_321,
        overrides=pb.SharingOverrides(email=True),
        update_mask=field_mask_pb2.FieldMask(paths=["email"]),
    ),
    "RemoveConnection": pb.RemoveConnectionRequest(connection_id=987_654_321),
    "MarkNotificationsRead": pb.MarkNotificationsReadRequest(notification_ids=[987_654_321]),
}


async def exhaust(call: Callable[[], Awaitable[object]], burst: int) -> grpc.aio.AioRpcError:
    """Makes `burst` calls (none refused by the limit), then the one that is."""
    for _ in range(burst):
        assert await outcome(call()) != "RATE_LIMITED"
    return await expect_error(call(), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")


@pytest.mark.parametrize("method", USER_WRITES)
async def test_user_write_rpcs_are_limited_per_caller(
    connections: Connections, new_user: NewUser, method: str
) -> None:
    me, someone_else = await new_user(), await new_user()
    burst = DEFAULT_RATE_LIMITS[method].burst

    def call(user: TestUser = me) -> Awaitable[object]:
        rpc: Callable[..., Awaitable[object]] = getattr(connections, method)
        return rpc(USER_CALLS[method], metadata=user.md)

    refused = await exhaust(call, burst)
    assert 0 < retry_delay(refused) <= DEFAULT_RATE_LIMITS[method].interval
    # Another caller has a bucket of their own.
    assert await outcome(call(someone_else)) != "RATE_LIMITED"


@pytest.mark.parametrize("method", BACKEND_WRITES)
async def test_backend_write_limits_stop_a_runaway_loop_only(method: str) -> None:
    """A backend may write 1,000 at once and 1,000 a second; a loop going faster is stopped.

    On a fake clock: a real client cannot outrun a 1 ms refill one call at a time.
    """
    now = 0.0
    limiter = RateLimitInterceptor(clock=lambda: now)
    spec = DEFAULT_RATE_LIMITS[method]
    for _ in range(1000):
        assert limiter.take(method, "bulk-importer", spec) is None
    wait = limiter.take(method, "bulk-importer", spec)
    assert wait is not None and wait <= 0.001
    assert limiter.take(method, "another-backend", spec) is None
    now += 1.0
    for _ in range(1000):
        assert limiter.take(method, "bulk-importer", spec) is None


async def _connect(connections: Connections, a: TestUser, b: TestUser) -> int:
    sent = await connections.SendRequest(pb.SendRequestRequest(umbral_name=b.handle), metadata=a.md)
    await connections.Respond(
        pb.RespondRequest(request_id=sent.request.id, action=ACCEPT), metadata=b.md
    )
    listed = await connections.ListConnections(pb.ListConnectionsRequest(), metadata=a.md)
    return next(c.id for c in listed.connections if c.connected_user_id == b.id)


async def test_an_override_update_that_changes_nothing_writes_nothing(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    a, b = await new_user(), await new_user()
    connection_id = await _connect(connections, a, b)

    async def update(paths: list[str], **values: bool) -> dict[str, bool]:
        reply = await connections.UpdateSharingOverrides(
            pb.UpdateSharingOverridesRequest(
                connection_id=connection_id,
                overrides=pb.SharingOverrides(**values),
                update_mask=field_mask_pb2.FieldMask(paths=paths),
            ),
            metadata=a.md,
        )
        return {field.name: value for field, value in reply.overrides.ListFields()}

    async def state() -> tuple[object, object]:
        version = await sql.value(
            "SELECT xmin::text FROM user_connections WHERE user_id = $1 AND connected_user_id = $2",
            b.id,
            a.id,
        )
        audits = await sql.value(
            "SELECT count(*) FROM audit_log WHERE action = 'connection.sharing_updated'"
            " AND actor_id = $1",
            a.id,
        )
        return version, audits

    # Clearing what was never set, on a row without overrides: nothing to do.
    untouched = await state()
    assert await update(["phone"]) == {}
    assert await state() == untouched

    assert await update(["email", "company"], email=True, company=False) == {
        "email": True,
        "company": False,
    }
    changed = await state()
    assert changed != untouched and changed[1] == 1
    # The same values again, and a clear of a field that is not set: no UPDATE, no audit row.
    assert await update(["email", "company"], email=True, company=False) == {
        "email": True,
        "company": False,
    }
    assert await update(["email", "phone"], email=True) == {"email": True, "company": False}
    assert await state() == changed
    # A real change still writes.
    assert await update(["email"], email=False) == {"email": False, "company": False}
    assert (await state())[1] == 2
