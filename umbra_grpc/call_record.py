"""What the access log learns about one RPC while it runs, shared with the layers inside it.

The access-log interceptor is outermost, so the facts it writes down (who the caller turned
out to be) are only known further in. It puts a mutable `CallRecord` in `current_call`
before calling inward; the auth interceptor fills `caller`, the tracing one `trace_id`, and
handlers may read `peer` (the client address, for audit rows) and `correlation_id` (to quote
in their own logs).
This module is neutral ground: auth must not import the access log, nor the reverse.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar


@dataclasses.dataclass(slots=True)
class CallRecord:
    """One RPC as the access log will write it; inner layers fill in what they learn."""

    method: str
    correlation_id: str
    peer: str | None
    started: float
    caller: str | None = None
    events_sent: int = 0
    trace_id: str | None = None  # set by the tracing interceptor when tracing is on

    def count_sent(self) -> None:
        """One more message of the stream has gone out."""
        self.events_sent += 1


current_call: ContextVar[CallRecord | None] = ContextVar("umbra_call", default=None)
"""The record of the RPC being served (None outside the access log, e.g. in unit tests)."""
