"""Text hygiene for preferred_name (SPEC 10.11), through UpdateSettings on a real server.

A preferred name is shown to other people (requests, notifications, pushes, contact cards),
so it must not be able to reorder what is around it (bidi overrides and isolates), hide
characters (zero-width ones), or carry control characters; it is stored in NFC, and its
100-character limit counts the NFC form.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from tests.rich import expect_error
from tests.support import Accounts, Metadata, NewUser, Sql
from umbra_grpc.pb import accounts_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADVERSARIAL = {
    "right-to-left override": "Alice\u202egnp.exe",
    "left-to-right override": "\u202dAlice",
    "right-to-left embedding": "\u202bAlice",
    "pop directional formatting": "Alice\u202c",
    "left-to-right isolate": "\u2066Alice\u2069",
    "right-to-left isolate": "\u2067Alice\u2069",
    "first strong isolate": "\u2068Alice\u2069",
    "pop directional isolate alone": "Alice\u2069",
    "right-to-left mark": "Alice\u200f",
    "arabic letter mark": "\u061cAlice",
    "zero-width space": "Al\u200bice",
    "zero-width non-joiner": "Al\u200cice",
    "zero-width joiner": "Al\u200dice",
    "word joiner": "Al\u2060ice",
    "byte order mark": "\ufeffAlice",
    "NUL": "Alice\x00",
    "C0 escape": "Alice\x1b[31m",
    "tab": "Alice\tBob",
    "newline": "Alice\nAdmin",
    "DEL": "Alice\x7f",
    "C1 next line": "Alice\x85",
    "C1 CSI": "Alice\x9b31m",
    "line separator": "Alice\u2028Bob",
    "paragraph separator": "Alice\u2029Bob",
    "soft hyphen": "Al\xadice",
    "tag character": "Alice\U000e0041",
}

ACCEPTED = {
    "accented, NFC already": ("Zoë Ångström", "Zoë Ångström"),
    "combining sequence NFC composes": ("Zoe\u0308 A\u030angstro\u0308m", "Zoë Ångström"),
    "hangul jamo NFC composes": ("\u1100\u1161", "\uac00"),
    "right-to-left script without controls": ("שלום עליכם", "שלום עליכם"),
    "arabic": ("مرحبا", "مرحبا"),
    "emoji": ("Alice 🦊", "Alice 🦊"),
    "CJK": ("山田太郎", "山田太郎"),
}


async def update_name(
    accounts: Accounts, admin: Metadata, user_id: int, name: str
) -> accounts_pb2.UpdateSettingsResponse:
    return await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=user_id,
            settings=accounts_pb2.Settings(preferred_name=name),
            update_mask=field_mask_pb2.FieldMask(paths=["preferred_name"]),
        ),
        metadata=admin,
    )


@pytest.mark.parametrize("name", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
async def test_invisible_and_reordering_characters_are_refused(
    accounts: Accounts, admin: Metadata, new_user: NewUser, sql: Sql, name: str
) -> None:
    user = await new_user(preferred_name="Before")
    audits = await sql.value("SELECT count(*) FROM audit_log WHERE target_id = $1", user.id)
    error = await expect_error(
        update_name(accounts, admin, user.id, name),
        grpc.StatusCode.INVALID_ARGUMENT,
        "TEXT_INVALID",
    )
    # The message names the field, never the value.
    assert "preferred_name" in (error.details() or "")
    assert name not in (error.details() or "")
    assert (
        await sql.value("SELECT preferred_name FROM settings WHERE user_id = $1", user.id)
        == "Before"
    )
    assert await sql.value("SELECT count(*) FROM audit_log WHERE target_id = $1", user.id) == audits


@pytest.mark.parametrize(("name", "stored"), list(ACCEPTED.values()), ids=list(ACCEPTED))
async def test_names_are_stored_in_nfc(
    accounts: Accounts, admin: Metadata, new_user: NewUser, sql: Sql, name: str, stored: str
) -> None:
    user = await new_user()
    reply = await update_name(accounts, admin, user.id, name)
    assert reply.settings.preferred_name == stored
    assert (
        await sql.value("SELECT preferred_name FROM settings WHERE user_id = $1", user.id) == stored
    )


async def test_the_limit_counts_characters_after_nfc(
    accounts: Accounts, admin: Metadata, new_user: NewUser
) -> None:
    user = await new_user()
    # 100 "é" written as e + combining acute: 200 code points that NFC makes 100.
    decomposed = "e\u0301" * 100
    reply = await update_name(accounts, admin, user.id, decomposed)
    assert reply.settings.preferred_name == "\xe9" * 100
    await update_name(accounts, admin, user.id, "x" * 100)
    for too_long in ("x" * 101, "e\u0301" * 101, "🦊" * 101):
        await expect_error(
            update_name(accounts, admin, user.id, too_long),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TEXT_INVALID",
        )


async def test_an_empty_name_still_clears_it(
    accounts: Accounts, admin: Metadata, new_user: NewUser
) -> None:
    user = await new_user(preferred_name="Someone")
    reply = await update_name(accounts, admin, user.id, "")
    assert reply.settings.preferred_name == ""
