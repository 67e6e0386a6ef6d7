"""Who is calling and from where, as the servicers need it for rules and audit rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from umbra_grpc.peer import Network, client_address
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


def client_ip(context: Context, trusted_proxies: Sequence[Network]) -> str | None:
    """The client's address for audit rows (x-forwarded-for only from trusted proxies)."""
    forwarded = None
    for key, value in context.invocation_metadata() or ():
        if key == "x-forwarded-for" and isinstance(value, str):
            forwarded = value
    return client_address(context.peer(), forwarded, trusted_proxies)
