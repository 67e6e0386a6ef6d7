"""Rich gRPC errors: a `google.rpc.Status` carrying an `ErrorInfo` (and `RetryInfo`).

Every error this service sends is built here, so clients can always read a machine-readable
reason from the `grpc-status-details-bin` trailer, whichever layer refused the call.
"""

from __future__ import annotations

import math
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "connections.umbra"


def error_status(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    *,
    metadata: dict[str, str] | None = None,
    retry_after: float | None = None,
) -> grpc.Status:
    """A status with an `ErrorInfo(reason, domain)` and, when given, a `RetryInfo`."""
    status = error_status_proto(code, reason, message, metadata=metadata, retry_after=retry_after)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def error_status_proto(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    *,
    metadata: dict[str, str] | None = None,
    retry_after: float | None = None,
) -> status_pb2.Status:
    """The `google.rpc.Status` of `error_status` (what an idempotency key keeps)."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {})
        )
    ]
    if retry_after is not None:
        seconds = math.floor(retry_after)
        nanos = min(int((retry_after - seconds) * 1e9), 999_999_999)
        delay = duration_pb2.Duration(seconds=seconds, nanos=nanos)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=_CODE_NUMBERS[code], message=message, details=details)


async def abort(
    context: grpc.aio.ServicerContext[object, object],
    code: grpc.StatusCode,
    reason: str,
    message: str,
    *,
    metadata: dict[str, str] | None = None,
    retry_after: float | None = None,
) -> NoReturn:
    """Ends the call with a rich error status (raises `grpc.aio.AbortError`)."""
    status = error_status(code, reason, message, metadata=metadata, retry_after=retry_after)
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    code: getattr(code_pb2, code.name) for code in grpc.StatusCode
}
