"""The `idempotency-key` request header of write RPCs (SPEC 11), at the service edge.

`@idempotent(ResponseType)` goes on every write RPC handler; the domain errors it raises are
mapped to statuses around it, by `umbra_grpc.api.status.map_errors`. Without the header the
handler runs as it always did. With it, the key (1-64 characters of A-Z a-z 0-9 _ -, sent
once) is bound to the caller (the token's `sub`), the RPC's name and a fingerprint of the
request (SHA-256 of its deterministic serialization), and the handler runs under
`umbra_grpc.domain.idempotency.IdempotentWrites`, which records its outcome in the write's
own transaction, or answers with the outcome recorded before. Outcomes are kept as bytes:
the serialized response, or the serialized `google.rpc.Status` of the error, so a replay is
byte for byte what the first call answered.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from umbra_grpc.api import caller
from umbra_grpc.api.status import domain_status_proto
from umbra_grpc.domain.errors import DomainError, IdempotencyKeyInvalid
from umbra_grpc.domain.idempotency import IdempotencyKey, IdempotentWrites
from umbra_grpc.rpc_errors import status_from_proto

HEADER = "idempotency-key"
_KEY = re.compile(r"[A-Za-z0-9_\-]{1,64}", re.ASCII)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class WritesIdempotently(Protocol):
    """A servicer whose write RPCs honour idempotency keys."""

    idempotent_writes: IdempotentWrites


S = TypeVar("S", bound=WritesIdempotently)
Handler = Callable[[S, Req, Context], Awaitable[Resp]]


def idempotent(
    response_type: type[Resp],
) -> Callable[[Handler[S, Req, Resp]], Handler[S, Req, Resp]]:
    """Makes a write RPC handler honour the `idempotency-key` header."""

    def decorate(handler: Handler[S, Req, Resp]) -> Handler[S, Req, Resp]:
        method = handler.__name__

        @functools.wraps(handler)
        async def wrapper(self: S, request: Req, context: Context) -> Resp:
            key = header_key(context)
            if key is None:
                return await handler(self, request, context)

            async def call() -> bytes:
                response = await handler(self, request, context)
                serialized: bytes = response.SerializeToString()
                return serialized

            outcome = await self.idempotent_writes.run(
                IdempotencyKey(
                    caller=caller.principal().subject,
                    method=method,
                    key=key,
                    fingerprint=fingerprint(method, request),
                ),
                call,
                _describe,
            )
            if outcome.ok:
                return response_type.FromString(outcome.payload)
            await context.abort_with_status(
                status_from_proto(status_pb2.Status.FromString(outcome.payload))
            )
            raise AssertionError("abort_with_status returned")  # pragma: no cover

        return wrapper

    return decorate


def header_key(context: Context) -> str | None:
    """The request's idempotency key; None without the header; IDEMPOTENCY_KEY_INVALID when
    it is malformed or sent more than once."""
    values = [value for name, value in context.invocation_metadata() or () if name == HEADER]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str) or not _KEY.fullmatch(values[0]):
        raise IdempotencyKeyInvalid
    return values[0]


def fingerprint(method: str, request: Message) -> bytes:
    """SHA-256 of the method and the request's deterministic serialization."""
    body = request.SerializeToString(deterministic=True)
    return hashlib.sha256(method.encode() + b"\0" + body).digest()


def _describe(error: DomainError) -> bytes:
    serialized: bytes = domain_status_proto(error).SerializeToString()
    return serialized
