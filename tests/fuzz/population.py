"""The users the fuzzer calls as, brought into realistic states through the real RPCs.

Some opted in and some not, some deactivated after they sent requests, a few popular users
many people write to (so the pending cap is reached), pending, accepted, rejected and
cancelled requests, connections with sharing overrides, removed connections, read and
unread notifications. `Population.caller` picks who makes a call: mostly a member's valid
token (or the admin's, for AccountService), and a share of no token, garbage and wrong kinds.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from tests.fuzz.calls import Caller, Client
from tests.fuzz.generator import Method
from tests.support import TEST_SECRET, bearer
from umbra_grpc.pb import accounts_pb2, connections_pb2
from umbra_grpc.tokens import mint_token

pb = connections_pb2
FIRST_ID = 7_000_000
ADMIN = Caller(
    "admin",
    bearer(mint_token(TEST_SECRET, subject="fuzzer", scopes=["umbra.admin"])),
    owner="admin",
    valid_token=True,
)
NAMES = ("Ana María", "Zoë", "李小龙", "محمد", "O'Brien", "Bjørn", "")
SEED_CONCURRENCY = 32


@dataclass(frozen=True)
class Member:
    """A user the fuzzer holds a token for."""

    id: int
    handle: str
    caller: Caller


def user_caller(user_id: int) -> Caller:
    """A valid end-user token for this id."""
    token = mint_token(TEST_SECRET, subject=str(user_id))
    return Caller(f"user {user_id}", bearer(token), owner=str(user_id), valid_token=True)


def garbage_callers() -> list[Caller]:
    """Credentials that must get UNAUTHENTICATED or PERMISSION_DENIED, never worse."""
    good = mint_token(TEST_SECRET, subject=str(FIRST_ID))
    flipped = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
    now = time.time()
    expired = mint_token(TEST_SECRET, subject=str(FIRST_ID), now=now - 7200, ttl_seconds=60)
    other_key = mint_token("another-secret-0123456789-abcdefghijklmnop", subject=str(FIRST_ID))
    unsigned = jwt.encode({"sub": str(FIRST_ID), "exp": int(now) + 600}, "", algorithm="none")
    odd_subjects = [
        mint_token(TEST_SECRET, subject=subject)
        for subject in ("0", "-1", "9" * 40, "1e3", " 7000000", "\ufb01", "7000000\x00")
    ]
    shapes: list[tuple[str, tuple[tuple[str, str], ...]]] = [
        ("no token", ()),
        ("empty bearer", (("authorization", "Bearer "),)),
        ("basic auth", (("authorization", "Basic dXNlcjpwYXNz"),)),
        ("not a jwt", (("authorization", "Bearer not.a.jwt"),)),
        ("bad signature", bearer(flipped)),
        ("expired", bearer(expired)),
        ("other key", bearer(other_key)),
        ("alg none", bearer(unsigned)),
        ("two headers", (("authorization", "Bearer x"), *bearer(good))),
        *((f"subject {i}", bearer(token)) for i, token in enumerate(odd_subjects)),
    ]
    return [Caller(f"garbage: {label}", metadata) for label, metadata in shapes]


@dataclass
class Population:
    """Members and the admin, and who to call as for each kind of service."""

    members: list[Member]
    popular: list[Member]
    garbage: list[Caller]

    def caller(self, audience: str, rng: random.Random) -> Caller:
        """Mostly the right credential for `audience` ("user", "admin", "anonymous")."""
        roll = rng.random()
        if audience == "anonymous":
            if roll < 0.8:
                return Caller("anonymous", ())
            return rng.choice(self.garbage) if roll < 0.9 else rng.choice(self.members).caller
        if roll < 0.06:
            return rng.choice(self.garbage)
        if roll < 0.09:  # the other kind of valid token
            return rng.choice(self.members).caller if audience == "admin" else _wrong(ADMIN)
        if roll < 0.11:  # a valid token of a user who does not exist
            stranger = user_caller(rng.randint(1, 2**62))
            return Caller(stranger.label, stranger.metadata)
        return ADMIN if audience == "admin" else rng.choice(self.members).caller


def _wrong(caller: Caller) -> Caller:
    return Caller(f"{caller.label} (wrong kind)", caller.metadata)


class Seeder:
    """Brings a population into being through the RPCs, concurrently."""

    def __init__(self, client: Client, methods: Iterable[Method], rng: random.Random) -> None:
        self._client = client
        self._methods = {method.name: method for method in methods}
        self._rng = rng
        self._limit = asyncio.Semaphore(SEED_CONCURRENCY)
        self._index = 0

    async def _call(self, name: str, request: Message, caller: Caller) -> Message | None:
        self._index -= 1  # seeding calls are numbered below zero
        async with self._limit:
            return await self._client.call(self._methods[name], request, caller, index=self._index)

    async def _all(self, calls: Iterable[Awaitable[object]]) -> list[object]:
        return list(await asyncio.gather(*calls))

    async def population(self, size: int) -> Population:
        """`size` members in every state; returns who they are."""
        rng = self._rng
        members = [self._member(n) for n in range(size)]
        accepting = {m.id for m in members if rng.random() < 0.85}
        await self._all(self._upsert(m, active=True) for m in members)
        await self._all(self._settings(m, accept=m.id in accepting) for m in members)
        senders = [m for m in members if m.id in accepting]
        popular = senders[:6]
        await self._all(
            self._send(sender, receiver)
            for sender in senders
            for receiver in {*rng.sample(popular, 2), *rng.sample(members, 3)}
            if receiver is not sender
        )
        await self._all(self._answer(m) for m in members)
        await self._all(self._cancel_some(m) for m in members)
        await self._all(self._tend_connections(m) for m in members)
        await self._all(self._read_notifications(m) for m in members)
        # Deactivated last, with their requests and connections in place.
        await self._all(self._upsert(m, active=False) for m in members if rng.random() < 0.08)
        return Population(members, popular, garbage_callers())

    def _member(self, n: int) -> Member:
        user_id = FIRST_ID + 7 * n
        handle = self._rng.choice(
            (f"fz{n}", f"fz.{n}-x_y", f"f{n:02d}"[:3] if n < 100 else f"fz{n}", f"fz{n}" + "q" * 40)
        )
        return Member(user_id, handle, user_caller(user_id))

    async def _upsert(self, member: Member, *, active: bool) -> None:
        rng = self._rng
        profile = accounts_pb2.Profile(
            email=f"{member.handle}@example.org" if rng.random() < 0.8 else "",
            phone=rng.choice(("+34 600 000 000", "", "030 1234")),
            mobile=rng.choice(("+44 7700 900000", "")),
            address=rng.choice(("Straße 5, Köln 🏠", "1 Main St", "")),
            company=rng.choice(("Ümlaut GmbH", "ACME", "")),
            job_title=rng.choice(("Ingeniera", "CTO", "")),
            birthday=rng.choice(("1990-05-17", "2000-02-29", "")),
        )
        handle = member.handle.upper() if rng.random() < 0.2 else member.handle
        user = accounts_pb2.User(
            id=member.id, umbral_name=handle, is_active=active, profile=profile
        )
        await self._call("UpsertUser", accounts_pb2.UpsertUserRequest(user=user), ADMIN)

    async def _settings(self, member: Member, *, accept: bool) -> None:
        rng = self._rng
        shares = {
            field: rng.random() < 0.5
            for field in accounts_pb2.SharingDefaults.DESCRIPTOR.fields_by_name
        }
        settings = accounts_pb2.Settings(
            accept_connections=accept,
            preferred_name=rng.choice(NAMES),
            sharing_defaults=accounts_pb2.SharingDefaults(**shares),
        )
        request = accounts_pb2.UpdateSettingsRequest(
            user_id=member.id,
            settings=settings,
            update_mask=field_mask_pb2.FieldMask(
                paths=["accept_connections", "preferred_name", "sharing_defaults"]
            ),
        )
        await self._call("UpdateSettings", request, ADMIN)

    async def _send(self, sender: Member, receiver: Member) -> None:
        handle = receiver.handle.upper() if self._rng.random() < 0.2 else receiver.handle
        await self._call("SendRequest", pb.SendRequestRequest(umbral_name=handle), sender.caller)

    async def _first_page(self, name: str, member: Member, items: str) -> list[Any]:
        """Up to 100 items of one of the member's lists; none when the call failed."""
        page = await self._call(name, self._methods[name].input(page_size=100), member.caller)
        return list(getattr(page, items)) if page is not None else []

    async def _answer(self, member: Member) -> None:
        for request in await self._first_page("ListIncomingRequests", member, "requests"):
            roll = self._rng.random()
            if roll < 0.7:
                action = (
                    pb.RespondRequest.ACTION_ACCEPT
                    if roll < 0.5
                    else pb.RespondRequest.ACTION_REJECT
                )
                await self._call(
                    "Respond",
                    pb.RespondRequest(request_id=request.id, action=action),
                    member.caller,
                )

    async def _cancel_some(self, member: Member) -> None:
        for request in await self._first_page("ListOutgoingRequests", member, "requests"):
            if self._rng.random() < 0.15:
                await self._call(
                    "CancelRequest", pb.CancelRequestRequest(request_id=request.id), member.caller
                )

    async def _tend_connections(self, member: Member) -> None:
        rng = self._rng
        for connection in await self._first_page("ListConnections", member, "connections"):
            roll = rng.random()
            if roll < 0.3:
                field = rng.choice(list(pb.SharingOverrides.DESCRIPTOR.fields_by_name))
                overrides = pb.SharingOverrides(**{field: rng.random() < 0.5})
                request = pb.UpdateSharingOverridesRequest(
                    connection_id=connection.id,
                    overrides=overrides,
                    update_mask=field_mask_pb2.FieldMask(paths=[field]),
                )
                await self._call("UpdateSharingOverrides", request, member.caller)
            elif roll < 0.45:
                await self._call(
                    "RemoveConnection",
                    pb.RemoveConnectionRequest(connection_id=connection.id),
                    member.caller,
                )

    async def _read_notifications(self, member: Member) -> None:
        notifications = await self._first_page("ListNotifications", member, "notifications")
        ids = [n.id for n in notifications if self._rng.random() < 0.5]
        if ids:
            await self._call(
                "MarkNotificationsRead",
                pb.MarkNotificationsReadRequest(notification_ids=ids),
                member.caller,
            )
