"""Reading rich error details (google.rpc.Status) off a failed call."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carried in its trailers."""
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no {DETAILS_KEY} on {error.code()}: {error.details()}")


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call."""
    for detail in status_details(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "connections.umbra"
            reason: str = info.reason
            return reason
    raise AssertionError("no ErrorInfo in the status details")


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay (seconds) a failed call carried."""
    for detail in status_details(error).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            seconds: float = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            return seconds
    raise AssertionError("no RetryInfo in the status details")


async def expect_error(
    call: Awaitable[object], code: grpc.StatusCode, reason: str
) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail with `code` and ErrorInfo `reason`; returns the error."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, (caught.value.code(), caught.value.details())
    assert error_reason(caught.value) == reason, caught.value.details()
    return caught.value


async def outcome(call: Awaitable[object]) -> str:
    """ "OK", or the ErrorInfo reason the call failed with."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error_reason(error)
    return "OK"
