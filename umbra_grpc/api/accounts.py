"""AccountService servicer: protobuf in, one domain call, protobuf out."""

from __future__ import annotations

from typing import Any

import grpc

from umbra_grpc.api import caller, convert
from umbra_grpc.api.idempotency import idempotent
from umbra_grpc.domain.accounts import Accounts, Actor
from umbra_grpc.domain.errors import InvalidField
from umbra_grpc.domain.idempotency import IdempotentWrites
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class AccountServicer(accounts_pb2_grpc.AccountServiceServicer):
    """Backend services keep users and settings current (admin scope, checked by auth).
    UpsertUser and UpdateSettings honour an `idempotency-key` header."""

    def __init__(
        self,
        accounts: Accounts,
        idempotent_writes: IdempotentWrites,
    ) -> None:
        self._accounts = accounts
        self.idempotent_writes = idempotent_writes

    @idempotent(accounts_pb2.UpsertUserResponse)
    async def UpsertUser(
        self, request: accounts_pb2.UpsertUserRequest, context: Context
    ) -> accounts_pb2.UpsertUserResponse:
        """Creates or updates a user; a taken handle is ALREADY_EXISTS HANDLE_TAKEN."""
        if not request.HasField("user"):
            raise InvalidField("user is required")
        user = await self._accounts.upsert_user(
            user_id=request.user.id,
            umbral_name=request.user.umbral_name,
            is_active=request.user.is_active,
            profile=convert.profile_from_pb(request.user.profile),
            actor=self._actor(),
        )
        return accounts_pb2.UpsertUserResponse(user=convert.user_to_pb(user))

    async def GetUser(
        self, request: accounts_pb2.GetUserRequest, context: Context
    ) -> accounts_pb2.GetUserResponse:
        """Returns a user with settings (never the ntfy token)."""
        user = await self._accounts.get_user(request.user_id)
        return accounts_pb2.GetUserResponse(user=convert.user_to_pb(user))

    @idempotent(accounts_pb2.UpdateSettingsResponse)
    async def UpdateSettings(
        self, request: accounts_pb2.UpdateSettingsRequest, context: Context
    ) -> accounts_pb2.UpdateSettingsResponse:
        """Updates the masked settings fields; returns the settings now in force."""
        patch = convert.settings_patch(request.settings, request.update_mask)
        settings = await self._accounts.update_settings(request.user_id, patch, self._actor())
        return accounts_pb2.UpdateSettingsResponse(settings=convert.settings_to_pb(settings))

    def _actor(self) -> Actor:
        return Actor(name=caller.principal().subject, ip=caller.client_ip())
