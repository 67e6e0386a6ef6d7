"""The connection half of ConnectionService through the real stubs, checked in the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from tests.api.statements import rpc_statements
from tests.rich import error_reason, status_details
from tests.support import (
    Accounts,
    Connections,
    Metadata,
    NewUser,
    RunningServer,
    Sql,
    TestUser,
    separate_channel,
)
from umbra_grpc.pb import accounts_pb2, connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
ACCEPT = pb.RespondRequest.ACTION_ACCEPT
Racers = list[Connections]
ROUNDS = 8


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def racers(
    server: RunningServer,
) -> AsyncIterator[Racers]:
    """Two clients on connections of their own, so that their calls really meet."""
    channels = [separate_channel(server.target) for _ in range(2)]
    try:
        yield [connections_pb2_grpc.ConnectionServiceStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()


async def expect_error(
    call: Awaitable[object], code: grpc.StatusCode, reason: str
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert error_reason(caught.value) == reason
    return caught.value


async def outcome(call: Awaitable[object]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error_reason(error)
    return "OK"


async def connect(
    connections: Connections, a: TestUser, b: TestUser
) -> tuple[pb.Connection, pb.Connection]:
    """a sends, b accepts; returns (a's side, b's side)."""
    sent = await connections.SendRequest(pb.SendRequestRequest(umbral_name=b.handle), metadata=a.md)
    accepted = await connections.Respond(
        pb.RespondRequest(request_id=sent.request.id, action=ACCEPT), metadata=b.md
    )
    listed = await connections.ListConnections(pb.ListConnectionsRequest(), metadata=a.md)
    mine = next(c for c in listed.connections if c.connected_user_id == b.id)
    return mine, accepted.connection


async def snapshot(sql: Sql) -> dict[str, list[tuple[object, ...]]]:
    """Every row the connection RPCs may touch, to prove a refusal changed nothing."""
    tables = {
        "user_connections": "SELECT id, user_id, connected_user_id, person_id, "
        "sharing_overrides::text FROM user_connections ORDER BY id",
        "persons": "SELECT id, linked_user_id, is_umbral_contact, email FROM persons ORDER BY id",
        "connection_requests": "SELECT id, status FROM connection_requests ORDER BY id",
        "notifications": "SELECT id, read FROM notifications ORDER BY id",
        "audit_log": "SELECT count(*) FROM audit_log",
    }
    return {name: [tuple(row) for row in await sql.rows(query)] for name, query in tables.items()}


async def set_defaults(accounts: Accounts, admin: Metadata, user: TestUser, **shares: bool) -> None:
    await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=user.id,
            settings=accounts_pb2.Settings(sharing_defaults=accounts_pb2.SharingDefaults(**shares)),
            update_mask=field_mask_pb2.FieldMask(paths=["sharing_defaults"]),
        ),
        metadata=admin,
    )


async def test_list_and_get(connections: Connections, new_user: NewUser) -> None:
    me = await new_user()
    others = [await new_user(preferred_name=f"Friend {n}") for n in range(3)]
    mine = [(await connect(connections, me, other))[0] for other in others]
    listed = await connections.ListConnections(pb.ListConnectionsRequest(), metadata=me.md)
    assert [c.id for c in listed.connections] == [c.id for c in reversed(mine)]
    assert listed.connections[0].connected_preferred_name == "Friend 2"
    assert not listed.next_page_token

    first = await connections.ListConnections(
        pb.ListConnectionsRequest(page_size=2), metadata=me.md
    )
    second = await connections.ListConnections(
        pb.ListConnectionsRequest(page_size=2, page_token=first.next_page_token), metadata=me.md
    )
    assert [c.id for c in (*first.connections, *second.connections)] == [
        c.id for c in reversed(mine)
    ]
    assert not second.next_page_token
    clamped = await connections.ListConnections(
        pb.ListConnectionsRequest(page_size=5000), metadata=me.md
    )
    assert len(clamped.connections) == 3

    got = await connections.GetConnection(
        pb.GetConnectionRequest(connection_id=mine[0].id), metadata=me.md
    )
    assert got.connection == mine[0]
    assert got.connection.connected_umbral_name == others[0].handle


async def test_shared_profile_defaults_overrides_and_empty_values(
    connections: Connections, accounts: Accounts, admin: Metadata, new_user: NewUser
) -> None:
    owner = await new_user(
        preferred_name="Olivia",
        profile=accounts_pb2.Profile(
            email="o@example.org", phone="555", company="ACME", birthday="1970-05-06"
        ),
    )
    viewer = await new_user()
    await set_defaults(accounts, admin, owner, email=True, phone=True, mobile=True)
    viewer_side, owner_side = await connect(connections, viewer, owner)

    async def profile() -> pb.SharedProfile:
        reply = await connections.GetSharedProfile(
            pb.GetSharedProfileRequest(connection_id=viewer_side.id), metadata=viewer.md
        )
        return reply.profile

    shown = await profile()
    assert shown.umbral_name == owner.handle
    assert shown.preferred_name == "Olivia"
    assert shown.email == "o@example.org"
    assert shown.phone == "555"
    assert not shown.HasField("mobile")  # shared by default, but empty
    assert not shown.HasField("company")  # set, not shared
    assert not shown.HasField("birthday")

    # The owner overrides for this connection: hide the phone, show company and birthday.
    reply = await connections.UpdateSharingOverrides(
        pb.UpdateSharingOverridesRequest(
            connection_id=owner_side.id,
            overrides=pb.SharingOverrides(phone=False, company=True, birthday=True),
            update_mask=field_mask_pb2.FieldMask(paths=["phone", "company", "birthday"]),
        ),
        metadata=owner.md,
    )
    assert reply.overrides == pb.SharingOverrides(phone=False, company=True, birthday=True)
    shown = await profile()
    assert not shown.HasField("phone")
    assert shown.company == "ACME"
    assert shown.birthday == "1970-05-06"
    assert shown.email == "o@example.org"

    # In the mask without a value: back to the default.
    reply = await connections.UpdateSharingOverrides(
        pb.UpdateSharingOverridesRequest(
            connection_id=owner_side.id,
            overrides=pb.SharingOverrides(),
            update_mask=field_mask_pb2.FieldMask(paths=["phone"]),
        ),
        metadata=owner.md,
    )
    assert reply.overrides == pb.SharingOverrides(company=True, birthday=True)
    assert (await profile()).phone == "555"

    # An empty mask means every field: only the ones given stay.
    reply = await connections.UpdateSharingOverrides(
        pb.UpdateSharingOverridesRequest(
            connection_id=owner_side.id, overrides=pb.SharingOverrides(email=False)
        ),
        metadata=owner.md,
    )
    assert reply.overrides == pb.SharingOverrides(email=False)
    shown = await profile()
    assert not shown.HasField("email")
    assert not shown.HasField("company")

    # The owner's own view of the viewer is untouched.
    mine = await connections.GetSharedProfile(
        pb.GetSharedProfileRequest(connection_id=owner_side.id), metadata=owner.md
    )
    assert mine.profile.umbral_name == viewer.handle
    assert not mine.profile.HasField("email")


async def test_override_updates_are_stored_on_the_other_row_and_audited(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    a, b = await new_user(), await new_user()
    a_side, b_side = await connect(connections, a, b)
    await connections.UpdateSharingOverrides(
        pb.UpdateSharingOverridesRequest(
            connection_id=a_side.id,
            overrides=pb.SharingOverrides(email=True),
            update_mask=field_mask_pb2.FieldMask(paths=["email"]),
        ),
        metadata=a.md,
    )
    stored = await sql.rows(
        "SELECT id, sharing_overrides::text AS o FROM user_connections WHERE id IN ($1, $2)",
        a_side.id,
        b_side.id,
    )
    assert {row["id"]: row["o"] for row in stored} == {
        a_side.id: None,
        b_side.id: '{"email": true}',
    }
    audit = await sql.rows(
        "SELECT target_id, detail FROM audit_log WHERE action = 'connection.sharing_updated' "
        "AND actor_id = $1",
        a.id,
    )
    assert len(audit) == 1
    assert audit[0]["target_id"] == b.id


@pytest.mark.parametrize("path", ["nickname", "umbral_name", "email.value", ""])
async def test_override_paths_must_be_shareable_fields(
    connections: Connections, new_user: NewUser, sql: Sql, path: str
) -> None:
    a, b = await new_user(), await new_user()
    a_side, _ = await connect(connections, a, b)
    before = await snapshot(sql)
    await expect_error(
        connections.UpdateSharingOverrides(
            pb.UpdateSharingOverridesRequest(
                connection_id=a_side.id,
                overrides=pb.SharingOverrides(email=True),
                update_mask=field_mask_pb2.FieldMask(paths=["email", path]),
            ),
            metadata=a.md,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_INVALID",
    )
    assert await snapshot(sql) == before


async def test_concurrent_override_updates_of_different_fields_both_survive(
    connections: Connections, new_user: NewUser, racers: Racers
) -> None:
    for _ in range(ROUNDS):
        a, b = await new_user(), await new_user()
        a_side, _ = await connect(connections, a, b)
        fields = ["email", "phone", "mobile", "address", "company", "job_title"]
        await asyncio.gather(
            *(
                racers[n % 2].UpdateSharingOverrides(
                    pb.UpdateSharingOverridesRequest(
                        connection_id=a_side.id,
                        overrides=pb.SharingOverrides(**{field: True}),
                        update_mask=field_mask_pb2.FieldMask(paths=[field]),
                    ),
                    metadata=a.md,
                )
                for n, field in enumerate(fields)
            )
        )
        shown = await connections.UpdateSharingOverrides(
            pb.UpdateSharingOverridesRequest(
                connection_id=a_side.id,
                overrides=pb.SharingOverrides(birthday=False),
                update_mask=field_mask_pb2.FieldMask(paths=["birthday"]),
            ),
            metadata=a.md,
        )
        assert shown.overrides == pb.SharingOverrides(**dict.fromkeys(fields, True), birthday=False)


async def test_remove_connection(connections: Connections, new_user: NewUser, sql: Sql) -> None:
    a = await new_user(profile=accounts_pb2.Profile(email="a@example.org"))
    b = await new_user()
    a_side, b_side = await connect(connections, a, b)
    notes_before = await sql.value("SELECT count(*) FROM notifications")
    await connections.RemoveConnection(
        pb.RemoveConnectionRequest(connection_id=a_side.id), metadata=a.md
    )
    assert (
        await sql.value(
            "SELECT count(*) FROM user_connections WHERE id IN ($1, $2)", a_side.id, b_side.id
        )
        == 0
    )
    cards = await sql.rows(
        "SELECT id, linked_user_id, is_umbral_contact, display_name FROM persons "
        "WHERE id IN ($1, $2)",
        a_side.person_id,
        b_side.person_id,
    )
    assert len(cards) == 2
    assert all(c["linked_user_id"] is None and not c["is_umbral_contact"] for c in cards)
    assert {c["display_name"] for c in cards} == {a.handle, b.handle}
    contact = await connections.GetContact(
        pb.GetContactRequest(person_id=a_side.person_id), metadata=a.md
    )
    assert contact.contact.linked_user_id == 0
    assert not contact.contact.is_umbral_contact
    assert await sql.value("SELECT count(*) FROM notifications") == notes_before
    assert (
        await sql.value(
            "SELECT count(*) FROM audit_log WHERE action = 'connection.removed' AND actor_id = $1",
            a.id,
        )
        == 1
    )
    for who, connection_id in ((a, a_side.id), (b, b_side.id)):
        await expect_error(
            connections.GetConnection(
                pb.GetConnectionRequest(connection_id=connection_id), metadata=who.md
            ),
            grpc.StatusCode.NOT_FOUND,
            "CONNECTION_NOT_FOUND",
        )
    # They may connect again, with fresh rows and cards.
    again, _ = await connect(connections, b, a)
    assert again.id not in (a_side.id, b_side.id)


async def test_both_sides_removing_at_once(
    connections: Connections,
    new_user: NewUser,
    sql: Sql,
    racers: Racers,
) -> None:
    for _ in range(ROUNDS):
        a, b = await new_user(), await new_user()
        a_side, b_side = await connect(connections, a, b)
        results = await asyncio.gather(
            outcome(
                racers[0].RemoveConnection(
                    pb.RemoveConnectionRequest(connection_id=a_side.id), metadata=a.md
                )
            ),
            outcome(
                racers[1].RemoveConnection(
                    pb.RemoveConnectionRequest(connection_id=b_side.id), metadata=b.md
                )
            ),
        )
        assert sorted(results) == ["CONNECTION_NOT_FOUND", "OK"]
        assert (
            await sql.value(
                "SELECT count(*) FROM user_connections WHERE $1 IN (user_id, connected_user_id)",
                a.id,
            )
            == 0
        )
        assert (
            await sql.value(
                "SELECT count(*) FROM audit_log WHERE action = 'connection.removed' "
                "AND actor_id IN ($1, $2)",
                a.id,
                b.id,
            )
            == 1
        )


async def assert_symmetric(sql: Sql) -> None:
    """I2 and no orphans: every row has its mirror, every linked card has its row."""
    assert (
        await sql.value(
            "SELECT count(*) FROM user_connections c WHERE NOT EXISTS (SELECT 1 FROM "
            "user_connections r WHERE r.user_id = c.connected_user_id "
            "AND r.connected_user_id = c.user_id)"
        )
        == 0
    )
    assert (
        await sql.value(
            "SELECT count(*) FROM persons p WHERE p.linked_user_id IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM user_connections c WHERE c.person_id = p.id)"
        )
        == 0
    )
    assert (
        await sql.value(
            "SELECT count(*) FROM user_connections c JOIN persons p ON p.id = c.person_id "
            "WHERE p.linked_user_id IS DISTINCT FROM c.connected_user_id "
            "OR p.owner_user_id <> c.user_id"
        )
        == 0
    )


async def test_remove_racing_override_update(
    connections: Connections,
    new_user: NewUser,
    sql: Sql,
    racers: Racers,
) -> None:
    for _ in range(ROUNDS):
        a, b = await new_user(), await new_user()
        a_side, b_side = await connect(connections, a, b)
        removed, updated = await asyncio.gather(
            outcome(
                racers[0].RemoveConnection(
                    pb.RemoveConnectionRequest(connection_id=a_side.id), metadata=a.md
                )
            ),
            outcome(
                racers[1].UpdateSharingOverrides(
                    pb.UpdateSharingOverridesRequest(
                        connection_id=b_side.id,
                        overrides=pb.SharingOverrides(email=True),
                        update_mask=field_mask_pb2.FieldMask(paths=["email"]),
                    ),
                    metadata=b.md,
                )
            ),
        )
        assert removed == "OK"
        assert updated in ("OK", "CONNECTION_NOT_FOUND")
        await assert_symmetric(sql)


async def test_remove_racing_new_request(
    connections: Connections,
    new_user: NewUser,
    sql: Sql,
    racers: Racers,
) -> None:
    for _ in range(ROUNDS):
        a, b = await new_user(), await new_user()
        a_side, _ = await connect(connections, a, b)
        removed, sent = await asyncio.gather(
            outcome(
                racers[0].RemoveConnection(
                    pb.RemoveConnectionRequest(connection_id=a_side.id), metadata=a.md
                )
            ),
            outcome(
                racers[1].SendRequest(pb.SendRequestRequest(umbral_name=a.handle), metadata=b.md)
            ),
        )
        assert removed == "OK"
        assert sent in ("OK", "ALREADY_CONNECTED")
        await assert_symmetric(sql)
        pending = await sql.value(
            "SELECT count(*) FROM connection_requests WHERE status = 'pending' "
            "AND $1 IN (sender_id, receiver_id)",
            a.id,
        )
        assert pending == (1 if sent == "OK" else 0)


async def test_object_level_authorization_matrix(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    """Every RPC taking an id, called by the owner, the counterparty and a stranger."""
    owner, counterparty, stranger = await new_user(), await new_user(), await new_user()
    owner_side, counterparty_side = await connect(connections, owner, counterparty)
    pending = (
        await connections.SendRequest(
            pb.SendRequestRequest(umbral_name=owner.handle), metadata=(await new_user()).md
        )
    ).request
    notification = (
        await connections.ListNotifications(pb.ListNotificationsRequest(), metadata=owner.md)
    ).notifications[0]
    missing = 987_654_321

    def calls(target_id: int) -> dict[str, tuple[str, object]]:
        return {
            "GetConnection": ("GetConnection", pb.GetConnectionRequest(connection_id=target_id)),
            "GetSharedProfile": (
                "GetSharedProfile",
                pb.GetSharedProfileRequest(connection_id=target_id),
            ),
            "UpdateSharingOverrides": (
                "UpdateSharingOverrides",
                pb.UpdateSharingOverridesRequest(
                    connection_id=target_id,
                    overrides=pb.SharingOverrides(email=True),
                    update_mask=field_mask_pb2.FieldMask(paths=["email"]),
                ),
            ),
            "RemoveConnection": (
                "RemoveConnection",
                pb.RemoveConnectionRequest(connection_id=target_id),
            ),
        }

    async def answer(who: TestUser, method: str, request: object) -> tuple[object, ...]:
        try:
            await getattr(connections, method)(request, metadata=who.md)
        except grpc.aio.AioRpcError as error:
            return (error.code(), error.details(), status_details(error).SerializeToString())
        return ("OK",)

    before = await snapshot(sql)
    # Connection ids: the counterparty and the stranger get the random-id answer.
    for name, (method, request) in calls(owner_side.id).items():
        random_answer = await answer(stranger, *calls(missing)[name])
        assert random_answer[0] == grpc.StatusCode.NOT_FOUND
        assert await answer(stranger, method, request) == random_answer
        assert await answer(counterparty, method, request) == random_answer
    # Contact cards: only the owner's.
    contact = pb.GetContactRequest(person_id=owner_side.person_id)
    random_contact = await answer(stranger, "GetContact", pb.GetContactRequest(person_id=missing))
    assert await answer(stranger, "GetContact", contact) == random_contact
    assert await answer(counterparty, "GetContact", contact) == random_contact
    # Requests: only the receiver answers, only the sender cancels.
    for who in (stranger, counterparty):
        respond = pb.RespondRequest(request_id=pending.id, action=ACCEPT)
        assert await answer(who, "Respond", respond) == await answer(
            who, "Respond", pb.RespondRequest(request_id=missing, action=ACCEPT)
        )
        assert await answer(
            who, "CancelRequest", pb.CancelRequestRequest(request_id=pending.id)
        ) == await answer(who, "CancelRequest", pb.CancelRequestRequest(request_id=missing))
    # Notifications: marking someone else's changes nothing.
    marked = await connections.MarkNotificationsRead(
        pb.MarkNotificationsReadRequest(notification_ids=[notification.id]), metadata=stranger.md
    )
    assert marked.updated_count == 0
    assert await snapshot(sql) == before

    # The owner and the counterparty do reach their own rows.
    for who, side in ((owner, owner_side), (counterparty, counterparty_side)):
        got = await connections.GetConnection(
            pb.GetConnectionRequest(connection_id=side.id), metadata=who.md
        )
        assert got.connection.id == side.id


async def test_statement_budget(
    connections: Connections, new_user: NewUser, server: RunningServer
) -> None:
    a, b = await new_user(), await new_user()
    a_side, _ = await connect(connections, a, b)

    async def count(call: Awaitable[object]) -> int:
        server.statements.reset()
        await call
        return rpc_statements(server)

    assert await count(connections.ListConnections(pb.ListConnectionsRequest(), metadata=a.md)) == 1
    assert (
        await count(
            connections.GetConnection(
                pb.GetConnectionRequest(connection_id=a_side.id), metadata=a.md
            )
        )
        == 1
    )
    assert (
        await count(
            connections.GetSharedProfile(
                pb.GetSharedProfileRequest(connection_id=a_side.id), metadata=a.md
            )
        )
        == 1
    )
    assert (
        await count(
            connections.GetContact(pb.GetContactRequest(person_id=a_side.person_id), metadata=a.md)
        )
        == 1
    )
    assert (
        await count(
            connections.UpdateSharingOverrides(
                pb.UpdateSharingOverridesRequest(
                    connection_id=a_side.id,
                    overrides=pb.SharingOverrides(email=True),
                    update_mask=field_mask_pb2.FieldMask(paths=["email"]),
                ),
                metadata=a.md,
            )
        )
        == 3  # BEGIN, the statement, COMMIT
    )
    assert (
        await count(
            connections.RemoveConnection(
                pb.RemoveConnectionRequest(connection_id=a_side.id), metadata=a.md
            )
        )
        == 3
    )
