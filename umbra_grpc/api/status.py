"""Domain errors to gRPC statuses: the one table at the service edge.

Each branch of the domain error tree has one status code; the reason and the public message
come from the error itself. Anything else is not mapped here: the access-log interceptor
turns it into INTERNAL with a correlation id, and the details stay in the server's log.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from umbra_grpc.domain import errors
from umbra_grpc.rpc_errors import error_status, error_status_proto
from umbra_grpc.storage.database import StorageBusy, StorageUnavailable

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[S, Req, Context], Awaitable[Resp]]

STATUS_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def domain_status_proto(error: errors.DomainError) -> status_pb2.Status:
    """The `google.rpc.Status` for a domain error."""
    code = next(
        (STATUS_CODES[kind] for kind in type(error).__mro__ if kind in STATUS_CODES),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    return error_status_proto(code, error.reason, error.message, retry_after=error.retry_after)


def domain_status(error: errors.DomainError) -> grpc.Status:
    """The rich status for a domain error."""
    return status_from_proto(domain_status_proto(error))


def status_from_proto(status: status_pb2.Status) -> grpc.Status:
    """The status to abort a call with, from its `google.rpc.Status`."""
    result: grpc.Status = rpc_status.to_status(status)
    return result


def unavailable_status(error: StorageUnavailable) -> grpc.Status:
    """The database is not reachable, or too busy to answer in time: clients may retry."""
    if isinstance(error, StorageBusy):
        return error_status(
            grpc.StatusCode.UNAVAILABLE, "STORAGE_BUSY", "the database is busy; retry"
        )
    return error_status(
        grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", "the database is unavailable; retry"
    )


def maps_errors(handler: Handler[S, Req, Resp]) -> Handler[S, Req, Resp]:
    """Wraps an RPC handler: domain errors and a lost database become rich statuses."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Req, context: Context) -> Resp:
        try:
            return await handler(self, request, context)
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

    return wrapper
