"""Domain errors and a lost database to gRPC statuses, at the service edge.

The reason and the public message come from the error itself; the status code from the
reason (`umbra_grpc.rpc_errors.STATUS_CODES`). Anything else is not mapped here: the
access-log interceptor turns it into INTERNAL with a correlation id, and the details stay in
the server's log.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import status_pb2

from umbra_grpc.domain import errors
from umbra_grpc.rpc_errors import (
    STORAGE_BUSY_MESSAGE,
    STORAGE_UNAVAILABLE_MESSAGE,
    error_status,
    error_status_proto,
    status_from_proto,
)
from umbra_grpc.storage.database import StorageBusy, StorageUnavailable

Context = grpc.aio.ServicerContext[Any, Any]
RpcHandler = Callable[[Any, Context], Awaitable[Any]]
Servicer = TypeVar("Servicer")


def domain_status_proto(error: errors.DomainError) -> status_pb2.Status:
    """The `google.rpc.Status` for a domain error."""
    return error_status_proto(error.reason, error.message, retry_after=error.retry_after)


def domain_status(error: errors.DomainError) -> grpc.Status:
    """The rich status for a domain error."""
    return status_from_proto(domain_status_proto(error))


def unavailable_status(error: StorageUnavailable) -> grpc.Status:
    """The database is not reachable, or too busy to answer in time: clients may retry."""
    if isinstance(error, StorageBusy):
        return error_status("STORAGE_BUSY", STORAGE_BUSY_MESSAGE)
    return error_status("STORAGE_UNAVAILABLE", STORAGE_UNAVAILABLE_MESSAGE)


def map_errors(servicer: Servicer) -> Servicer:
    """`servicer`, with every RPC handler wrapped so that the domain errors and the lost
    database it raises end the call with their rich status. Applied once to each service as
    it is registered (`umbra_grpc.server`), not handler by handler."""
    # The generated base class (`*Servicer`, in a `_pb2_grpc` module) declares the RPCs.
    base = next(kind for kind in type(servicer).__mro__ if kind.__module__.endswith("_pb2_grpc"))
    for name, declared in vars(base).items():
        if callable(declared) and not name.startswith("_"):
            setattr(servicer, name, _mapped(getattr(servicer, name)))
    return servicer


def _mapped(handler: RpcHandler) -> RpcHandler:
    if inspect.isasyncgenfunction(handler):
        # A stream is served by `context.write` from a coroutine, so that a mid-stream error
        # ends it here like any other call.
        raise TypeError(f"{handler.__qualname__}: an RPC handler is a coroutine function")

    @functools.wraps(handler)
    async def mapped(request: Any, context: Context) -> Any:
        try:
            return await handler(request, context)
        except (errors.DomainError, StorageUnavailable) as error:
            if context.cancelled():
                # The client is gone (a stream ended by it and by us at once): no one to tell.
                raise asyncio.CancelledError from error
            status = (
                domain_status(error)
                if isinstance(error, errors.DomainError)
                else unavailable_status(error)
            )
            await context.abort_with_status(status)
        raise AssertionError("abort_with_status returned")  # pragma: no cover

    return mapped
