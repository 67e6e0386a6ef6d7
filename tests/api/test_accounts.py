"""AccountService through the real stubs: create, update, deactivate, settings with masks."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from tests.rich import error_reason
from tests.support import Accounts, Metadata, NewUser, Sql, user_metadata
from umbra_grpc.pb import accounts_pb2, connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def upsert(accounts: Accounts, admin: Metadata, **fields: Any) -> accounts_pb2.User:
    reply = await accounts.UpsertUser(
        accounts_pb2.UpsertUserRequest(user=accounts_pb2.User(**fields)), metadata=admin
    )
    return reply.user


async def expect_error(call: Awaitable[object], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert error_reason(caught.value) == reason


async def test_upsert_creates_then_updates(accounts: Accounts, admin: Metadata, sql: Sql) -> None:
    created = await upsert(
        accounts,
        admin,
        id=1,
        umbral_name="Alice.Smith",
        is_active=True,
        profile=accounts_pb2.Profile(email="a@example.org", birthday="1990-02-03"),
    )
    assert created.umbral_name == "alice.smith"
    assert created.profile.email == "a@example.org"
    assert created.profile.birthday == "1990-02-03"
    assert not created.settings.accept_connections
    assert created.settings.ntfy.connections_enabled

    updated = await upsert(
        accounts, admin, id=1, umbral_name="alice", is_active=True, profile=accounts_pb2.Profile()
    )
    assert updated.umbral_name == "alice"
    assert updated.profile.email == ""
    assert await sql.value("SELECT count(*) FROM users WHERE id = 1") == 1
    assert await sql.value("SELECT count(*) FROM settings WHERE user_id = 1") == 1
    audits = await sql.rows(
        "SELECT action, detail->>'service' AS service FROM audit_log WHERE target_id = 1"
    )
    assert [(row["action"], row["service"]) for row in audits] == [
        ("account.user_upserted", "backend-tests")
    ] * 2


async def test_get_user_and_not_found(accounts: Accounts, admin: Metadata) -> None:
    await upsert(accounts, admin, id=2, umbral_name="getme", is_active=True)
    reply = await accounts.GetUser(accounts_pb2.GetUserRequest(user_id=2), metadata=admin)
    assert reply.user.umbral_name == "getme"
    await expect_error(
        accounts.GetUser(accounts_pb2.GetUserRequest(user_id=999_999), metadata=admin),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )


async def test_handle_taken_case_insensitively(
    accounts: Accounts, admin: Metadata, sql: Sql
) -> None:
    await upsert(accounts, admin, id=3, umbral_name="taken", is_active=True)
    await expect_error(
        upsert(accounts, admin, id=4, umbral_name="TAKEN", is_active=True),
        grpc.StatusCode.ALREADY_EXISTS,
        "HANDLE_TAKEN",
    )
    assert await sql.value("SELECT count(*) FROM users WHERE id = 4") == 0


@pytest.mark.parametrize(
    "handle", ["ab", "x" * 51, "has space", "emoji😀", "semi;colon", "", "tab\tname"]
)
async def test_malformed_handle_is_invalid_argument(
    accounts: Accounts, admin: Metadata, sql: Sql, handle: str
) -> None:
    await expect_error(
        upsert(accounts, admin, id=5, umbral_name=handle, is_active=True),
        grpc.StatusCode.INVALID_ARGUMENT,
        "HANDLE_INVALID",
    )
    assert await sql.value("SELECT count(*) FROM users WHERE id = 5") == 0


@pytest.mark.parametrize(
    ("user", "reason"),
    [
        (accounts_pb2.User(id=0, umbral_name="zero"), "FIELD_INVALID"),
        (accounts_pb2.User(id=-7, umbral_name="negative"), "FIELD_INVALID"),
        (
            accounts_pb2.User(
                id=6, umbral_name="bday", profile=accounts_pb2.Profile(birthday="1990-13-01")
            ),
            "FIELD_INVALID",
        ),
        (
            accounts_pb2.User(
                id=6, umbral_name="long", profile=accounts_pb2.Profile(company="c" * 501)
            ),
            "FIELD_INVALID",
        ),
    ],
)
async def test_bad_user_fields(
    accounts: Accounts, admin: Metadata, sql: Sql, user: accounts_pb2.User, reason: str
) -> None:
    await expect_error(
        accounts.UpsertUser(accounts_pb2.UpsertUserRequest(user=user), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
    )
    assert await sql.value("SELECT count(*) FROM users WHERE id IN (0, -7, 6)") == 0


async def test_missing_user_message_is_invalid(accounts: Accounts, admin: Metadata) -> None:
    await expect_error(
        accounts.UpsertUser(accounts_pb2.UpsertUserRequest(), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_INVALID",
    )


async def test_update_settings_masks(accounts: Accounts, admin: Metadata, sql: Sql) -> None:
    await upsert(accounts, admin, id=10, umbral_name="masks", is_active=True)
    settings = accounts_pb2.Settings(
        accept_connections=True,
        preferred_name="Masked",
        sharing_defaults=accounts_pb2.SharingDefaults(email=True, phone=True),
        ntfy=accounts_pb2.NtfySettings(
            enabled=True, server_url="https://ntfy.example.org/", topic="masks-topic"
        ),
    )
    only_accept = await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=10,
            settings=settings,
            update_mask=field_mask_pb2.FieldMask(
                paths=["accept_connections", "sharing_defaults.email"]
            ),
        ),
        metadata=admin,
    )
    assert only_accept.settings.accept_connections
    assert only_accept.settings.preferred_name == ""
    assert only_accept.settings.sharing_defaults.email
    assert not only_accept.settings.sharing_defaults.phone
    assert not only_accept.settings.ntfy.enabled

    everything = await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(user_id=10, settings=settings), metadata=admin
    )
    assert everything.settings.preferred_name == "Masked"
    assert everything.settings.sharing_defaults.phone
    assert everything.settings.ntfy.server_url == "https://ntfy.example.org"
    assert everything.settings.ntfy.topic == "masks-topic"

    cleared = await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=10,
            settings=accounts_pb2.Settings(),
            update_mask=field_mask_pb2.FieldMask(paths=["preferred_name", "sharing_defaults"]),
        ),
        metadata=admin,
    )
    assert cleared.settings.preferred_name == ""
    assert not cleared.settings.sharing_defaults.email
    assert cleared.settings.accept_connections
    row = await sql.rows("SELECT preferred_name, share_email FROM settings WHERE user_id = 10")
    assert (row[0]["preferred_name"], row[0]["share_email"]) == (None, False)


@pytest.mark.parametrize(
    "path", ["unknown", "ntfy.has_auth_token", "sharing_defaults.nickname", "settings"]
)
async def test_update_settings_unknown_path(
    accounts: Accounts, admin: Metadata, sql: Sql, path: str
) -> None:
    await upsert(accounts, admin, id=11, umbral_name="badmask", is_active=True)
    before = await sql.rows("SELECT * FROM settings WHERE user_id = 11")
    await expect_error(
        accounts.UpdateSettings(
            accounts_pb2.UpdateSettingsRequest(
                user_id=11,
                settings=accounts_pb2.Settings(accept_connections=True),
                update_mask=field_mask_pb2.FieldMask(paths=["accept_connections", path]),
            ),
            metadata=admin,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_INVALID",
    )
    assert await sql.rows("SELECT * FROM settings WHERE user_id = 11") == before


@pytest.mark.parametrize(
    ("ntfy", "path", "reason"),
    [
        (
            accounts_pb2.NtfySettings(server_url="ftp://example.org"),
            "ntfy.server_url",
            "NTFY_URL_FORBIDDEN",
        ),
        (accounts_pb2.NtfySettings(topic="has space"), "ntfy.topic", "FIELD_INVALID"),
    ],
)
async def test_bad_ntfy_values(
    accounts: Accounts, admin: Metadata, ntfy: accounts_pb2.NtfySettings, path: str, reason: str
) -> None:
    await upsert(accounts, admin, id=12, umbral_name="badntfy", is_active=True)
    await expect_error(
        accounts.UpdateSettings(
            accounts_pb2.UpdateSettingsRequest(
                user_id=12,
                settings=accounts_pb2.Settings(ntfy=ntfy),
                update_mask=field_mask_pb2.FieldMask(paths=[path]),
            ),
            metadata=admin,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
    )


async def test_update_settings_unknown_user(accounts: Accounts, admin: Metadata) -> None:
    await expect_error(
        accounts.UpdateSettings(
            accounts_pb2.UpdateSettingsRequest(
                user_id=424_242,
                settings=accounts_pb2.Settings(accept_connections=True),
                update_mask=field_mask_pb2.FieldMask(paths=["accept_connections"]),
            ),
            metadata=admin,
        ),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )


async def test_ntfy_token_is_write_only(
    accounts: Accounts, admin: Metadata, sql: Sql, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "tk_live_do-not-leak-0123456789"
    await upsert(accounts, admin, id=13, umbral_name="tokenholder", is_active=True)
    reply = await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=13,
            settings=accounts_pb2.Settings(ntfy=accounts_pb2.NtfySettings(auth_token=secret)),
            update_mask=field_mask_pb2.FieldMask(paths=["ntfy.auth_token"]),
        ),
        metadata=admin,
    )
    assert reply.settings.ntfy.auth_token == ""
    assert reply.settings.ntfy.has_auth_token
    fetched = await accounts.GetUser(accounts_pb2.GetUserRequest(user_id=13), metadata=admin)
    assert secret not in str(fetched)
    assert fetched.user.settings.ntfy.has_auth_token
    assert await sql.value("SELECT ntfy_auth_token FROM settings WHERE user_id = 13") == secret
    detail = await sql.value(
        "SELECT detail::text FROM audit_log WHERE target_id = 13 "
        "AND action = 'account.settings_updated'"
    )
    assert secret not in str(detail)
    assert secret not in caplog.text

    # A full write-back of what GetUser returned keeps the stored token.
    await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(user_id=13, settings=fetched.user.settings),
        metadata=admin,
    )
    assert await sql.value("SELECT ntfy_auth_token FROM settings WHERE user_id = 13") == secret

    # Named in the mask with no value, it is cleared.
    await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=13,
            settings=accounts_pb2.Settings(),
            update_mask=field_mask_pb2.FieldMask(paths=["ntfy.auth_token"]),
        ),
        metadata=admin,
    )
    assert await sql.value("SELECT ntfy_auth_token FROM settings WHERE user_id = 13") is None


async def test_deactivation_hides_user_at_once(
    accounts: Accounts,
    connections: connections_pb2_grpc.ConnectionServiceAsyncStub,
    admin: Metadata,
    new_user: NewUser,
) -> None:
    searcher = await new_user()
    target = await new_user()
    found = await connections.Search(
        connections_pb2.SearchRequest(umbral_name=target.handle), metadata=searcher.md
    )
    assert found.found
    await upsert(accounts, admin, id=target.id, umbral_name=target.handle, is_active=False)
    hidden = await connections.Search(
        connections_pb2.SearchRequest(umbral_name=target.handle), metadata=searcher.md
    )
    assert not hidden.found
    await expect_error(
        connections.SendRequest(
            connections_pb2.SendRequestRequest(umbral_name=target.handle), metadata=searcher.md
        ),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    # The deactivated user's own calls are refused as well (cached answers are dropped).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await connections.Search(
            connections_pb2.SearchRequest(umbral_name=searcher.handle),
            metadata=user_metadata(target.id),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_user_token_cannot_call_account_service(
    accounts: Accounts, new_user: NewUser
) -> None:
    user = await new_user()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await accounts.GetUser(accounts_pb2.GetUserRequest(user_id=user.id), metadata=user.md)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
