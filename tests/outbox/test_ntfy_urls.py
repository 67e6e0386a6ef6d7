"""SPEC 10.4 through a real server and PostgreSQL: ntfy server URLs judged when saved (and
again when used), and a stored token never following its URL to another host.

The server has no UMBRA_NTFY_ALLOWED_NETWORKS. Made-up names are answered by `Names`;
literal addresses in every spelling go through the system resolver (no DNS either way).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from tests.outbox.names import Names
from tests.outbox.recorder import NtfyRecorder
from tests.rich import error_reason
from tests.support import (
    Connections,
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    start_server,
    stop_server,
    test_config,
    until,
)
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2

if TYPE_CHECKING:
    Accounts = accounts_pb2_grpc.AccountServiceAsyncStub

pytestmark = pytest.mark.asyncio(loop_scope="session")
PUBLIC = "93.184.216.34"
NAMES = Names(
    {
        "ntfy.public.test": [[PUBLIC]],
        "internal.test": [["10.1.2.3"]],
        "metadata.test": [[PUBLIC, "169.254.169.254"]],
        # Public when saved, loopback when used (DNS rebinding).
        "rebind.test": [[PUBLIC], ["127.0.0.1"]],
    }
)
FORBIDDEN = [
    "http://127.0.0.1:9090/metrics",
    "http://[::ffff:127.0.0.1]/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://017700000001/",
    "http://[::1]:8080/",
    "http://localhost/",
    "http://localhost./",
    "http://169.254.169.254/latest",
    "http://10.0.0.8/",
    "http://192.168.0.1/",
    "http://100.64.1.1/",
    "http://[fc00::5]/",
    "http://[fe80::1]/",
    "http://224.0.0.251/",
    "http://0.0.0.0/",
    "http://240.0.0.1/",
    "http://internal.test/",
    "http://internal.test./",
    "https://metadata.test/",
    "https://user:secret@ntfy.public.test/",
    "https://ntfy.public.test/#fragment",
    "ftp://ntfy.public.test/",
]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    config = test_config(database_url, outbox_max_attempts=1, outbox_poll_seconds=30.0)
    running = await start_server(config, resolver=NAMES)
    try:
        yield running
    finally:
        await stop_server(running)


def ntfy_update(user: TestUser, **ntfy: Any) -> accounts_pb2.UpdateSettingsRequest:
    """Sets the ntfy fields given (and only those)."""
    return accounts_pb2.UpdateSettingsRequest(
        user_id=user.id,
        settings=accounts_pb2.Settings(ntfy=accounts_pb2.NtfySettings(**ntfy)),
        update_mask=field_mask_pb2.FieldMask(paths=[f"ntfy.{name}" for name in ntfy]),
    )


async def test_forbidden_server_urls_are_refused_when_saved_and_change_nothing(
    accounts: Accounts, admin: Metadata, new_user: NewUser, sql: Sql
) -> None:
    user = await new_user()
    await accounts.UpdateSettings(
        ntfy_update(user, server_url=f"https://{PUBLIC}", auth_token="tk-kept"), metadata=admin
    )
    before = await sql.rows("SELECT * FROM settings WHERE user_id = $1", user.id)
    for url in FORBIDDEN:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await accounts.UpdateSettings(ntfy_update(user, server_url=url), metadata=admin)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        assert error_reason(refused.value) == "NTFY_URL_FORBIDDEN", url
        assert "secret" not in (refused.value.details() or "")
    assert await sql.rows("SELECT * FROM settings WHERE user_id = $1", user.id) == before


async def test_public_and_unresolvable_server_urls_are_saved(
    accounts: Accounts, admin: Metadata, new_user: NewUser
) -> None:
    user = await new_user()
    for url in (f"http://{PUBLIC}:8080", "https://ntfy.public.test/base", "https://later.invalid"):
        reply = await accounts.UpdateSettings(ntfy_update(user, server_url=url), metadata=admin)
        assert reply.settings.ntfy.server_url == url


async def test_a_name_that_turns_private_after_saving_is_refused_at_send_time(
    server: RunningServer,
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
    sql: Sql,
) -> None:
    receiver = await new_user()
    await accounts.UpdateSettings(
        ntfy_update(
            receiver,
            enabled=True,
            connections_enabled=True,
            server_url=f"http://rebind.test:{recorder.port}",
            topic="rebound",
        ),
        metadata=admin,
    )
    await connections.SendRequest(
        connections_pb2.SendRequestRequest(umbral_name=receiver.handle),
        metadata=(await new_user()).md,
    )
    query = "SELECT status, last_error FROM outbox WHERE user_id = $1"

    async def done() -> asyncpg.Record | None:
        row = (await sql.rows(query, receiver.id))[0]
        return None if row["status"] == "pending" else row

    row = await until(done, within=10, what="the row no longer pending")
    assert tuple(row) == (
        "failed",
        "destination refused: ntfy server URL reaches a loopback address (127.0.0.1)",
    )
    assert recorder.for_topic("rebound") == []


async def test_a_new_server_url_without_a_token_drops_the_token(
    accounts: Accounts, admin: Metadata, new_user: NewUser, sql: Sql
) -> None:
    user = await new_user()

    async def stored() -> object:
        return await sql.value("SELECT ntfy_auth_token FROM settings WHERE user_id = $1", user.id)

    first, second = f"https://{PUBLIC}", "https://ntfy.public.test"
    await accounts.UpdateSettings(
        ntfy_update(user, server_url=first, auth_token="tk-first"), metadata=admin
    )
    # The same URL again (a read-modify-write of the whole ntfy message) keeps it.
    fetched = await accounts.GetUser(accounts_pb2.GetUserRequest(user_id=user.id), metadata=admin)
    await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=user.id,
            settings=fetched.user.settings,
            update_mask=field_mask_pb2.FieldMask(paths=["ntfy"]),
        ),
        metadata=admin,
    )
    assert await stored() == "tk-first"
    # A new URL alone: the token stays behind (it was meant for the old host).
    reply = await accounts.UpdateSettings(ntfy_update(user, server_url=second), metadata=admin)
    assert not reply.settings.ntfy.has_auth_token
    assert await stored() is None
    # A new URL with a new token: that token.
    await accounts.UpdateSettings(
        ntfy_update(user, server_url=first, auth_token="tk-second"), metadata=admin
    )
    assert await stored() == "tk-second"
