"""Rich gRPC errors: a `google.rpc.Status` carrying an `ErrorInfo` (and `RetryInfo`).

Every error this service sends is built here, so clients can always read a machine-readable
reason from the `grpc-status-details-bin` trailer, whichever layer refused the call. Callers
name the reason; its status code comes from `STATUS_CODES`, the one table of every reason
the service sends: the domain's refusals (`umbra_grpc.domain.errors`, one code for every
reason of a branch of its tree) and those of the service edge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "connections.umbra"

_REASONS: Final[Mapping[grpc.StatusCode, tuple[str, ...]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (
        "INVALID_ARGUMENT",
        "HANDLE_INVALID",
        "FIELD_INVALID",
        "NTFY_URL_FORBIDDEN",
        "TEXT_INVALID",
        "SELF_REQUEST",
        "SELF_BLOCK",
        "IDEMPOTENCY_KEY_INVALID",
        "IDEMPOTENCY_KEY_REUSED",
        "MALFORMED_REQUEST",  # request bytes that do not decode (access log)
    ),
    grpc.StatusCode.NOT_FOUND: (
        "NOT_FOUND",
        "USER_NOT_FOUND",
        "CONNECTION_NOT_FOUND",
        "CONTACT_NOT_FOUND",
    ),
    grpc.StatusCode.ALREADY_EXISTS: (
        "ALREADY_EXISTS",
        "HANDLE_TAKEN",
        "ALREADY_CONNECTED",
        "REQUEST_PENDING",
    ),
    grpc.StatusCode.FAILED_PRECONDITION: (
        "DOMAIN_ERROR",  # the domain error tree's root, should a rule raise it bare
        "FAILED_PRECONDITION",
        "CONNECTIONS_DISABLED",
        "REQUEST_NOT_PENDING",
        "SENDER_INACTIVE",
        "USER_BLOCKED",
    ),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (
        "RESOURCE_EXHAUSTED",
        "TOO_MANY_PENDING",
        "RESEND_TOO_SOON",
        "TOO_MANY_STREAMS",
        "STREAM_TOO_SLOW",
        "RATE_LIMITED",  # with a RetryInfo (rate limit)
        "TOO_MANY_CALLS",  # unary calls in progress (concurrency)
        "TOO_MANY_ANONYMOUS_STREAMS",  # health and reflection streams (anonymous streams)
    ),
    grpc.StatusCode.PERMISSION_DENIED: (
        "PERMISSION_DENIED",  # also the auth interceptor's answer for an inactive caller
        "ADMIN_SCOPE_REQUIRED",
        "USER_TOKEN_REQUIRED",
    ),
    grpc.StatusCode.UNAVAILABLE: (
        "UNAVAILABLE",
        "FEED_UNAVAILABLE",
        "SHUTTING_DOWN",
        "STORAGE_UNAVAILABLE",  # the database cannot be reached
        "STORAGE_BUSY",  # a lock or statement timeout, or retries that did not help
    ),
    grpc.StatusCode.UNAUTHENTICATED: (
        "UNAUTHENTICATED",  # also the auth interceptor's one answer for a refused token
        "TOKEN_EXPIRED",
    ),
    grpc.StatusCode.UNIMPLEMENTED: ("UNIMPLEMENTED",),
    grpc.StatusCode.INTERNAL: ("INTERNAL",),  # anything unexpected, with a correlation id
}

STATUS_CODES: Final[Mapping[str, grpc.StatusCode]] = {
    reason: code for code, reasons in _REASONS.items() for reason in reasons
}
"""The status code of every reason this service sends."""

# What a caller is told when the database cannot answer (the servicers and the auth check).
STORAGE_BUSY_MESSAGE: Final = "the database is busy; retry"
STORAGE_UNAVAILABLE_MESSAGE: Final = "the database is unavailable; retry"


def error_status(
    reason: str,
    message: str,
    *,
    retry_after: float | None = None,
) -> grpc.Status:
    """A status with an `ErrorInfo(reason, domain)` and, when given, a `RetryInfo`."""
    return status_from_proto(error_status_proto(reason, message, retry_after=retry_after))


def error_status_proto(
    reason: str,
    message: str,
    *,
    retry_after: float | None = None,
) -> status_pb2.Status:
    """The `google.rpc.Status` of `error_status` (what an idempotency key keeps)."""
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))]
    if retry_after is not None:
        seconds = math.floor(retry_after)
        nanos = min(int((retry_after - seconds) * 1e9), 999_999_999)
        delay = duration_pb2.Duration(seconds=seconds, nanos=nanos)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    code = _CODE_NUMBERS[STATUS_CODES[reason]]
    return status_pb2.Status(code=code, message=message, details=details)


def status_from_proto(status: status_pb2.Status) -> grpc.Status:
    """The status to abort a call with, from its `google.rpc.Status`."""
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort(
    context: grpc.aio.ServicerContext[object, object],
    reason: str,
    message: str,
    *,
    retry_after: float | None = None,
) -> NoReturn:
    """Ends the call with a rich error status (raises `grpc.aio.AbortError`)."""
    status = error_status(reason, message, retry_after=retry_after)
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    code: getattr(code_pb2, code.name) for code in grpc.StatusCode
}
