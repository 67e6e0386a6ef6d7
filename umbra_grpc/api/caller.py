"""Who is calling and from where, as the servicers need it for rules and audit rows."""

from __future__ import annotations

from typing import Any

import grpc

from umbra_grpc.call_record import current_call
from umbra_grpc.principal import Principal, current_principal

Context = grpc.aio.ServicerContext[Any, Any]


def principal() -> Principal:
    """The verified caller; the auth interceptor always runs before any servicer."""
    found = current_principal.get()
    if found is None:
        raise RuntimeError("no principal: the auth interceptor is not installed")
    return found


def user_id() -> int:
    """The calling end user's id."""
    found = principal().user_id
    if found is None:
        raise RuntimeError("a service token reached a user RPC")
    return found


def client_ip() -> str | None:
    """The client's address for audit rows: the call record's peer, which the access log
    computed once for the call (x-forwarded-for believed only from trusted proxies)."""
    record = current_call.get()
    if record is None:
        raise RuntimeError("no call record: the access log interceptor is not installed")
    return record.peer
