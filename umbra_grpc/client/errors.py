"""Reading the service's machine-readable error reason off a failed call."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The `google.rpc.ErrorInfo` reason a failed call carried (`STREAM_TOO_SLOW`, ...), or
    None when it carried none (e.g. UNAVAILABLE from the channel: no server answered)."""
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason: str = info.reason
                    return reason
    return None
