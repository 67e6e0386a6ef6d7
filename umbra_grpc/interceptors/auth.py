"""Auth: who is calling, from the `authorization: Bearer <JWT>` metadata.

Tokens are checked by `umbra_grpc.tokens.TokenVerifier` (algorithms, keys, claims, cache).

Calls (`AuthInterceptor`): health and reflection need no token. Otherwise a missing, malformed
or refused token is UNAUTHENTICATED with one generic message; why it was refused goes to the
server log only, never the token. A token with the `umbra.admin` scope stands for a backend
service: its `sub` is any name, it is not looked up as a user, and it may call AccountService
only. Any other token's `sub` must be a user id, and that user must exist and be active
(PERMISSION_DENIED otherwise, one answer for "unknown" and "inactive"). The verified caller is
in `current_principal` while the call runs (for a stream, around its iteration).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final

import grpc

from umbra_grpc.call_record import current_call
from umbra_grpc.domain.errors import CallerInactive
from umbra_grpc.interceptors.handlers import (
    Context,
    Continuation,
    Handler,
    Inside,
    reset,
    wrap_around,
)
from umbra_grpc.principal import ADMIN_SCOPE, Principal, current_principal
from umbra_grpc.rpc_errors import STORAGE_UNAVAILABLE_MESSAGE, abort
from umbra_grpc.tokens import InvalidToken, TokenVerifier

logger = logging.getLogger(__name__)

PUBLIC_METHOD_PREFIXES: Final = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Methods anyone may call without a token."""

SERVICE_METHOD_PREFIX: Final = "/umbra.accounts.v1.AccountService/"
"""Methods for backend services (scope `umbra.admin`); the only ones such a token may call."""

UNAUTHENTICATED_MESSAGE: Final = "missing or invalid bearer token"
# Open watch streams of a user deactivated later end with this same answer (domain.feed).
NOT_ACTIVE_REASON: Final = CallerInactive.reason
NOT_ACTIVE_MESSAGE: Final = CallerInactive.default_message
ADMIN_SCOPE_MESSAGE: Final = "this method needs a token with the umbra.admin scope"
USER_TOKEN_MESSAGE: Final = "a service token may call AccountService only"  # noqa: S105

MAX_USER_ID: Final = 2**63 - 1

IsActive = Callable[[int], Awaitable[bool]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Verifies the bearer token of every call but health and reflection (see module doc).

    `is_active(user_id)` says whether a user exists and is active (the caller caches it).
    Exceptions listed in `unavailable` (the store is down) are answered UNAVAILABLE with
    reason STORAGE_UNAVAILABLE; any other exception from it propagates.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        is_active: IsActive,
        *,
        unavailable: tuple[type[Exception], ...] = (),
    ) -> None:
        self._verifier = verifier
        self._is_active = is_active
        self._unavailable = unavailable

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        authorization = _authorization(handler_call_details.invocation_metadata)

        @contextlib.asynccontextmanager
        async def authenticated(
            request: Any, context: Context, stream: bool
        ) -> AsyncIterator[Inside]:
            principal = await self._authenticate(method, authorization, context)
            token = current_principal.set(principal)
            try:
                yield Inside(request, context)
            finally:
                reset(current_principal, token, stream=stream)

        return wrap_around(handler, authenticated)

    async def _authenticate(
        self, method: str, authorization: str | None, context: Context
    ) -> Principal:
        """The verified caller, or the call ends here with the matching error."""
        try:
            verified = self._verifier.verify(_bearer_token(authorization))
        except InvalidToken as error:
            record = current_call.get()
            logger.info(
                "bearer token refused: %s",
                error,
                extra={
                    "method": method,
                    "correlation_id": record.correlation_id if record is not None else None,
                },
            )
            await abort(context, "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
        is_service = ADMIN_SCOPE in verified.scopes
        user_id = None if is_service else _user_id(verified.subject)
        principal = Principal(verified.subject, user_id, verified.scopes, verified.expires_at)
        record = current_call.get()
        if record is not None:
            record.caller = verified.subject
        for_services = method.startswith(SERVICE_METHOD_PREFIX)
        if is_service:
            if not for_services:
                await abort(context, "USER_TOKEN_REQUIRED", USER_TOKEN_MESSAGE)
            return principal
        if user_id is None:
            logger.info("bearer token refused: subject is not a user id", extra={"method": method})
            await abort(context, "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
        if for_services:
            await abort(context, "ADMIN_SCOPE_REQUIRED", ADMIN_SCOPE_MESSAGE)
        try:
            active = await self._is_active(user_id)
        except self._unavailable:
            await abort(context, "STORAGE_UNAVAILABLE", STORAGE_UNAVAILABLE_MESSAGE)
        if not active:
            await abort(context, NOT_ACTIVE_REASON, NOT_ACTIVE_MESSAGE)
        return principal


def _user_id(subject: str) -> int | None:
    """A positive int64 written canonically ("42", not "042" or "+42"), else None."""
    if not (subject.isascii() and subject.isdigit()) or subject[0] == "0" or len(subject) > 19:
        return None
    user_id = int(subject)
    return user_id if user_id <= MAX_USER_ID else None


def _authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def _bearer_token(authorization: str | None) -> str:
    if authorization is None:
        raise InvalidToken("no authorization metadata")
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise InvalidToken("authorization metadata is not 'Bearer <token>'")
    return parts[1]
