"""Domain errors to gRPC statuses: the one table at the service edge.

Each branch of the domain error tree has one status code; the reason and the public message
come from the error itself. Anything else is not mapped here: the access-log interceptor
turns it into INTERNAL with a correlation id, and the details stay in the server's log.
"""

from __future__ import annotations

import grpc

from umbra_grpc.domain import errors
from umbra_grpc.rpc_errors import error_status
from umbra_grpc.storage.database import StorageUnavailable

STATUS_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def domain_status(error: errors.DomainError) -> grpc.Status:
    """The rich status for a domain error."""
    for kind in type(error).__mro__:
        code = STATUS_CODES.get(kind)
        if code is not None:
            return error_status(code, error.reason, error.message)
    return error_status(grpc.StatusCode.FAILED_PRECONDITION, error.reason, error.message)


def unavailable_status(error: StorageUnavailable) -> grpc.Status:
    """The database is not reachable: clients may retry."""
    return error_status(
        grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", "the database is unavailable; retry"
    )
