"""The client's table of unary RPCs, and the gRPC service config built from it.

Each unary RPC of ConnectionService is one `Rpc` descriptor on `UmbraClient`, made by
`read(...)` or `write(...)` from the generated request and response classes. Through
`ParamSpec` the bound method takes exactly the request's fields as keyword arguments, with
their types, and returns the response type, so mypy checks every call. The RPC's name is the
request class's name less `Request` (AIP naming, enforced by buf lint).

Calls are retried on UNAVAILABLE by the channel itself (the service config below); writes
unless the client is told that write retries are unsafe (`write_retries=False`): every write
carries an `idempotency-key` header, the same on each of gRPC's own retries of that call,
which the server (SPEC 11) uses to answer a retry with the first outcome.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, ParamSpec, Protocol, Self, TypeVar, overload

from google.protobuf.message import Message

from umbra_grpc.pb import connections_pb2

P = ParamSpec("P")
R = TypeVar("R", bound=Message)

SERVICE = connections_pb2.DESCRIPTOR.services_by_name["ConnectionService"].full_name
# gRPC caps maxAttempts at 5; 1 means "no retries".
MAX_ATTEMPTS = 5


class Caller(Protocol):
    """What an `Rpc` needs from the client it is bound to."""

    async def _unary(self, rpc: Rpc[Any, R], request: Message) -> R: ...


class Rpc(Generic[P, R]):
    """One unary RPC: bound to a client it is `async (**request fields) -> response`."""

    def __init__(self, request: Callable[P, Message], response: type[R], *, write: bool) -> None:
        self.request = request
        self.response = response
        self.write = write
        self.name = getattr(request, "__name__", "").removesuffix("Request")

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Self: ...

    @overload
    def __get__(self, client: Caller, owner: type[Any]) -> Callable[P, Awaitable[R]]: ...

    def __get__(self, client: Caller | None, owner: type[Any]) -> Self | Callable[P, Awaitable[R]]:
        if client is None:
            return self

        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            return await client._unary(self, self.request(*args, **kwargs))

        call.__name__ = call.__qualname__ = self.name
        call.__doc__ = f"Calls {SERVICE}/{self.name}."
        return call


def read(request: Callable[P, Message], response: type[R]) -> Rpc[P, R]:
    """An RPC that changes nothing: retried on UNAVAILABLE."""
    return Rpc(request, response, write=False)


def write(request: Callable[P, Message], response: type[R]) -> Rpc[P, R]:
    """An RPC that changes something: sent with an idempotency key, retried under it."""
    return Rpc(request, response, write=True)


def rpcs_of(cls: type) -> list[Rpc[Any, Any]]:
    """The `Rpc` descriptors of a client class, in definition order."""
    return [value for value in vars(cls).values() if isinstance(value, Rpc)]


def service_config(
    rpcs: Iterable[Rpc[Any, Any]],
    *,
    write_retries: bool,
    attempts: int,
    initial_backoff: float,
    max_backoff: float,
) -> dict[str, Any]:
    """The `grpc.service_config` of the client's channel (as a dict; JSON on the channel).

    Retries happen on UNAVAILABLE only, `attempts` in all (the first included), with gRPC's
    jittered exponential backoff; retry throttling stops retries while more than half the
    recent calls fail, so a fleet of clients does not multiply an outage's load.
    """
    if not 1 <= attempts <= MAX_ATTEMPTS:
        raise ValueError(f"attempts must be 1-{MAX_ATTEMPTS}, got {attempts}")
    retried = [rpc for rpc in rpcs if write_retries or not rpc.write]
    config: dict[str, Any] = {"methodConfig": []}
    if attempts > 1 and retried:
        config["methodConfig"].append(
            {
                "name": [{"service": SERVICE, "method": rpc.name} for rpc in retried],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": f"{initial_backoff}s",
                    "maxBackoff": f"{max_backoff}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
        config["retryThrottling"] = {"maxTokens": 10, "tokenRatio": 0.1}
    return config
