"""The `idempotency-key` header of every write RPC (SPEC 11), through the real stubs.

Each write RPC (found by name from the descriptors, so a new one cannot be forgotten) gets a
scenario that makes one successful call of it; the tests call it with a key, retry, and read
every table to show the retry wrote nothing and answered byte for byte the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from tests.api.statements import rpc_statements
from tests.invariants import check_all
from tests.locks import until_none_waiting, until_waiting
from tests.rich import expect_error, status_details
from tests.support import (
    Accounts,
    Connections,
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    until,
)
from umbra_grpc.pb import accounts_pb2, connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
ACCEPT = pb.RespondRequest.ACTION_ACCEPT
TABLES = (
    "users",
    "settings",
    "connection_requests",
    "user_connections",
    "persons",
    "notifications",
    "audit_log",
    "outbox",
    "user_blocks",
    "idempotency_keys",
)
_keys = itertools.count(1)


def new_key() -> str:
    return f"key-{next(_keys)}_Ab9"


def keyed(md: Metadata, key: str) -> Metadata:
    return (*md, ("idempotency-key", key))


def write_methods() -> set[str]:
    """Every RPC of both services that writes: all but the reads, found by name."""
    services = (
        connections_pb2.DESCRIPTOR.services_by_name["ConnectionService"],
        accounts_pb2.DESCRIPTOR.services_by_name["AccountService"],
    )
    reads = ("Search", "List", "Get", "Watch")
    return {m.name for s in services for m in s.methods if not m.name.startswith(reads)}


@dataclasses.dataclass
class Env:
    connections: Connections
    accounts: Accounts
    admin: Metadata
    new_user: NewUser
    sql: Sql


@dataclasses.dataclass
class Call:
    """One call of a write RPC, ready to make (and make again)."""

    stub: Connections | Accounts
    method: str
    request: Message
    md: Metadata

    def __call__(
        self, md: Metadata | None = None, request: Message | None = None
    ) -> Awaitable[Any]:
        rpc: Callable[..., Awaitable[Any]] = getattr(self.stub, self.method)
        return rpc(request or self.request, metadata=md or self.md)


async def _send(env: Env, a: TestUser, b: TestUser) -> pb.ConnectionRequest:
    reply = await env.connections.SendRequest(
        pb.SendRequestRequest(umbral_name=b.handle), metadata=a.md
    )
    return reply.request


async def _connected(env: Env) -> tuple[TestUser, TestUser, int]:
    """Two connected users; the id is the second one's side of the connection."""
    a, b = await env.new_user(), await env.new_user()
    request = await _send(env, a, b)
    reply = await env.connections.Respond(
        pb.RespondRequest(request_id=request.id, action=ACCEPT), metadata=b.md
    )
    return a, b, reply.connection.id


async def send_request(env: Env) -> Call:
    a, b = await env.new_user(), await env.new_user()
    return Call(env.connections, "SendRequest", pb.SendRequestRequest(umbral_name=b.handle), a.md)


async def respond(env: Env) -> Call:
    a, b = await env.new_user(), await env.new_user()
    request = await _send(env, a, b)
    return Call(
        env.connections, "Respond", pb.RespondRequest(request_id=request.id, action=ACCEPT), b.md
    )


async def cancel_request(env: Env) -> Call:
    a, b = await env.new_user(), await env.new_user()
    request = await _send(env, a, b)
    return Call(
        env.connections, "CancelRequest", pb.CancelRequestRequest(request_id=request.id), a.md
    )


async def update_sharing_overrides(env: Env) -> Call:
    _, b, connection_id = await _connected(env)
    return Call(
        env.connections,
        "UpdateSharingOverrides",
        pb.UpdateSharingOverridesRequest(
            connection_id=connection_id,
            overrides=pb.SharingOverrides(email=True),
            update_mask=field_mask_pb2.FieldMask(paths=["email"]),
        ),
        b.md,
    )


async def remove_connection(env: Env) -> Call:
    _, b, connection_id = await _connected(env)
    return Call(
        env.connections,
        "RemoveConnection",
        pb.RemoveConnectionRequest(connection_id=connection_id),
        b.md,
    )


async def mark_notifications_read(env: Env) -> Call:
    a, b = await env.new_user(), await env.new_user()
    request = await _send(env, a, b)
    note = await env.sql.value("SELECT id FROM notifications WHERE source_id = $1", request.id)
    return Call(
        env.connections,
        "MarkNotificationsRead",
        pb.MarkNotificationsReadRequest(notification_ids=[note]),
        b.md,
    )


async def block_user(env: Env) -> Call:
    a, _, _ = await _connected(env)
    b = await env.new_user()
    await _send(env, b, a)
    return Call(env.connections, "BlockUser", pb.BlockUserRequest(umbral_name=b.handle), a.md)


async def unblock_user(env: Env) -> Call:
    a, b = await env.new_user(), await env.new_user()
    await env.connections.BlockUser(pb.BlockUserRequest(umbral_name=b.handle), metadata=a.md)
    return Call(env.connections, "UnblockUser", pb.UnblockUserRequest(umbral_name=b.handle), a.md)


_accounts = itertools.count(700_000)


async def upsert_user(env: Env) -> Call:
    user_id = next(_accounts)
    user = accounts_pb2.User(id=user_id, umbral_name=f"upserted{user_id}", is_active=True)
    return Call(env.accounts, "UpsertUser", accounts_pb2.UpsertUserRequest(user=user), env.admin)


async def update_settings(env: Env) -> Call:
    user = await env.new_user()
    return Call(
        env.accounts,
        "UpdateSettings",
        accounts_pb2.UpdateSettingsRequest(
            user_id=user.id,
            settings=accounts_pb2.Settings(preferred_name="Renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["preferred_name"]),
        ),
        env.admin,
    )


SCENARIOS: dict[str, Callable[[Env], Awaitable[Call]]] = {
    "SendRequest": send_request,
    "Respond": respond,
    "CancelRequest": cancel_request,
    "UpdateSharingOverrides": update_sharing_overrides,
    "RemoveConnection": remove_connection,
    "MarkNotificationsRead": mark_notifications_read,
    "BlockUser": block_user,
    "UnblockUser": unblock_user,
    "UpsertUser": upsert_user,
    "UpdateSettings": update_settings,
}


@pytest.fixture
def env(
    connections: Connections, accounts: Accounts, admin: Metadata, new_user: NewUser, sql: Sql
) -> Env:
    return Env(connections, accounts, admin, new_user, sql)


async def database_state(sql: Sql) -> dict[str, str]:
    """A digest of every row of every table the service writes."""
    return {
        table: str(
            await sql.value(
                f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
                f" FROM {table} t"
            )
        )
        for table in TABLES
    }


async def test_every_write_rpc_has_a_scenario() -> None:
    assert set(SCENARIOS) == write_methods()


@pytest.mark.parametrize("method", sorted(SCENARIOS))
async def test_a_retry_answers_the_same_and_writes_nothing(env: Env, method: str) -> None:
    call = await SCENARIOS[method](env)
    key = new_key()
    first = await call(keyed(call.md, key))
    before = await database_state(env.sql)
    again = await call(keyed(call.md, key))
    assert again.SerializeToString() == first.SerializeToString()
    assert await database_state(env.sql) == before


@pytest.mark.parametrize("method", sorted(SCENARIOS))
async def test_a_different_request_under_the_same_key_is_refused(env: Env, method: str) -> None:
    call = await SCENARIOS[method](env)
    key = new_key()
    await call(keyed(call.md, key))
    other = await SCENARIOS[method](env)
    before = await database_state(env.sql)
    await expect_error(
        other(keyed(call.md, key), other.request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert await database_state(env.sql) == before


@pytest.mark.parametrize("method", sorted(SCENARIOS))
async def test_a_key_costs_one_statement_on_the_success_path(
    server: RunningServer, env: Env, method: str
) -> None:
    async def counted(call: Call, md: Metadata) -> int:
        server.statements.reset()
        await call(md)
        return rpc_statements(server)

    plain = await SCENARIOS[method](env)
    with_key = await SCENARIOS[method](env)
    without = await counted(plain, plain.md)
    assert await counted(with_key, keyed(with_key.md, new_key())) == without + 1


async def test_the_key_commits_with_the_write(env: Env) -> None:
    call = await send_request(env)
    key = new_key()
    reply = await call(keyed(call.md, key))
    # Written by the same transaction: the same xmin.
    write = await env.sql.value(
        "SELECT xmin::text FROM connection_requests WHERE id = $1", reply.request.id
    )
    recorded = await env.sql.value("SELECT xmin::text FROM idempotency_keys WHERE key = $1", key)
    assert write == recorded


async def test_an_error_outcome_is_kept_too(env: Env) -> None:
    me = await env.new_user()
    key = new_key()
    request = pb.SendRequestRequest(umbral_name="someone-later")
    first = await expect_error(
        env.connections.SendRequest(request, metadata=keyed(me.md, key)),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    await env.new_user(handle="someone-later")  # now the same call would succeed...
    again = await expect_error(
        env.connections.SendRequest(request, metadata=keyed(me.md, key)),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    # ...but the retry gets the first outcome, byte for byte.
    assert status_details(again).SerializeToString() == status_details(first).SerializeToString()
    # A new key is a new call.
    await env.connections.SendRequest(request, metadata=keyed(me.md, new_key()))


async def test_an_error_that_committed_a_write_is_replayed_without_writing(env: Env) -> None:
    a, b = await env.new_user(), await env.new_user()
    request = await _send(env, a, b)
    await env.sql.rows("UPDATE users SET is_active = false WHERE id = $1", a.id)
    key = new_key()
    respond = pb.RespondRequest(request_id=request.id, action=ACCEPT)
    await expect_error(
        env.connections.Respond(respond, metadata=keyed(b.md, key)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SENDER_INACTIVE",
    )
    # The rejection committed with the key.
    assert (
        await env.sql.value("SELECT status FROM connection_requests WHERE id = $1", request.id)
        == "rejected"
    )
    before = await database_state(env.sql)
    await expect_error(
        env.connections.Respond(respond, metadata=keyed(b.md, key)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SENDER_INACTIVE",
    )
    assert await database_state(env.sql) == before


async def test_an_error_that_rolled_back_is_kept_by_itself(env: Env, sql: Sql) -> None:
    taken = await env.new_user(handle="wanted-handle")
    user_id = next(_accounts)
    upsert = accounts_pb2.UpsertUserRequest(
        user=accounts_pb2.User(id=user_id, umbral_name="wanted-handle", is_active=True)
    )
    key = new_key()
    await expect_error(
        env.accounts.UpsertUser(upsert, metadata=keyed(env.admin, key)),
        grpc.StatusCode.ALREADY_EXISTS,
        "HANDLE_TAKEN",
    )
    await sql.rows("UPDATE users SET umbral_name = 'freed-handle' WHERE id = $1", taken.id)
    await expect_error(
        env.accounts.UpsertUser(upsert, metadata=keyed(env.admin, key)),
        grpc.StatusCode.ALREADY_EXISTS,
        "HANDLE_TAKEN",
    )
    assert not await sql.value("SELECT count(*) FROM users WHERE id = $1", user_id)


async def test_keys_are_per_caller_and_per_method(env: Env) -> None:
    key = new_key()
    first, second = await send_request(env), await send_request(env)
    one = await first(keyed(first.md, key))
    two = await second(keyed(second.md, key))  # another caller, the same key
    assert one.request.id != two.request.id
    # The same caller and key on another method: another call.
    target = await env.new_user()
    await env.connections.BlockUser(
        pb.BlockUserRequest(umbral_name=target.handle), metadata=keyed(first.md, key)
    )
    assert await env.sql.value("SELECT count(*) FROM user_blocks WHERE blocked_id = $1", target.id)


@pytest.mark.parametrize(
    "header",
    ["", "x" * 65, "has space", "semi;colon", "dot.ted", "slash/ed"],
)
async def test_a_malformed_key_is_refused(env: Env, header: str) -> None:
    call = await send_request(env)
    before = await database_state(env.sql)
    await expect_error(
        call(keyed(call.md, header)), grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_INVALID"
    )
    await expect_error(
        call((*call.md, ("idempotency-key", "a"), ("idempotency-key", "a"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "IDEMPOTENCY_KEY_INVALID",
    )
    assert await database_state(env.sql) == before
    # The longest key allowed, of every character allowed.
    await call(keyed(call.md, ("AZaz09_-" * 8)[:64]))


@contextlib.asynccontextmanager
async def receiver_held(env: Env, call: Call, database_url: str) -> AsyncIterator[int]:
    """Another writer holds the row of a SendRequest's receiver until the block ends: the
    call queues behind it (after its caller and target checks)."""
    assert isinstance(call.request, pb.SendRequestRequest)
    receiver = await env.sql.value(
        "SELECT id FROM users WHERE umbral_name = $1", call.request.umbral_name
    )
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", receiver)
            yield int(receiver)
    finally:
        await holder.close()


async def requests_to(env: Env, receiver: int) -> int:
    return int(
        await env.sql.value(
            "SELECT count(*) FROM connection_requests WHERE receiver_id = $1", receiver
        )
    )


async def test_a_concurrent_duplicate_gets_the_first_outcome(env: Env, database_url: str) -> None:
    call = await send_request(env)
    key = new_key()
    async with receiver_held(env, call, database_url) as receiver:
        # Both copies of the call queue behind the other writer.
        copies = [asyncio.ensure_future(call(keyed(call.md, key))) for _ in range(2)]
        await until_waiting(env.sql, 2)
        assert not any(copy.done() for copy in copies)
    one, two = await asyncio.gather(*copies)
    assert one.SerializeToString() == two.SerializeToString()
    assert await requests_to(env, receiver) == 1


async def test_a_call_that_never_committed_leaves_no_key(env: Env, database_url: str) -> None:
    call = await send_request(env)
    key = new_key()
    async with receiver_held(env, call, database_url) as receiver:
        lost = getattr(call.stub, call.method)(
            call.request, metadata=keyed(call.md, key), timeout=1.0
        )
        await until_waiting(env.sql, 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await lost  # the client gave up: the call is cancelled and rolls back
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server gave the call up (its statement no longer waits) before the row is let
        # go: let go first, a server slow to see the deadline would take the lock and commit.
        await until_none_waiting(env.sql)

    async def rolled_back() -> bool:  # the server notices the cancel and rolls back
        return not await env.sql.value(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'umbra-grpc'"
            " AND state <> 'idle'"
        )

    await until(rolled_back, within=10, what="no busy server connection", every=0.01)
    assert not await env.sql.value("SELECT count(*) FROM idempotency_keys WHERE key = $1", key)
    # The retry does the write, once.
    await call(keyed(call.md, key))
    await call(keyed(call.md, key))
    assert await requests_to(env, receiver) == 1


async def test_a_key_is_honoured_for_24_hours_then_pruned(server: RunningServer, env: Env) -> None:
    call = await update_settings(env)
    key = new_key()
    await call(keyed(call.md, key))
    assert isinstance(call.request, accounts_pb2.UpdateSettingsRequest)
    renamed = accounts_pb2.UpdateSettingsRequest()
    renamed.CopyFrom(call.request)
    renamed.settings.preferred_name = "Renamed Again"
    await env.sql.rows(
        "UPDATE idempotency_keys SET created_at = now() - interval '24 hours' WHERE key = $1",
        key,
    )
    # 24 hours on, the key is free again: a different request under it is a new call.
    reply = await call(keyed(call.md, key), renamed)
    assert reply.settings.preferred_name == "Renamed Again"
    await env.sql.rows(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = $1",
        key,
    )
    report = await server.service.retention.prune()
    assert report is not None and report["idempotency_keys"] >= 1
    assert not await env.sql.value("SELECT count(*) FROM idempotency_keys WHERE key = $1", key)


async def test_the_invariants_hold_after_this_module(database_url: str) -> None:
    """I1-I5 and the block rule, over every row the tests above left behind."""
    conn = await asyncpg.connect(database_url)
    try:
        assert await check_all(conn) == []
    finally:
        await conn.close()
