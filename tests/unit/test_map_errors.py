"""`api.status.map_errors`: which handlers it wraps as a service is registered.

What a wrapped handler answers (statuses, ErrorInfo, a cancelled call let go) is tested through
real servers in tests/api.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from umbra_grpc.api.accounts import AccountServicer
from umbra_grpc.api.connections import ConnectionServicer
from umbra_grpc.api.status import map_errors
from umbra_grpc.pb import accounts_pb2, connections_pb2, connections_pb2_grpc

# The servicers' collaborators: never called here (only which methods get wrapped is looked at).
UNUSED: Any = None


def rpc_names(module: Any, service: str) -> set[str]:
    return {method.name for method in module.DESCRIPTOR.services_by_name[service].methods}


@pytest.mark.parametrize(
    ("servicer", "rpcs"),
    [
        (
            ConnectionServicer(UNUSED, UNUSED, UNUSED, UNUSED, UNUSED, UNUSED),
            rpc_names(connections_pb2, "ConnectionService"),
        ),
        (AccountServicer(UNUSED, UNUSED), rpc_names(accounts_pb2, "AccountService")),
    ],
)
def test_every_rpc_handler_and_nothing_else_is_wrapped(servicer: Any, rpcs: set[str]) -> None:
    methods = {name: getattr(servicer, name) for name in rpcs}
    assert map_errors(servicer) is servicer
    wrapped = {name for name, value in vars(servicer).items() if hasattr(value, "__wrapped__")}
    assert wrapped == rpcs
    assert all(getattr(servicer, name).__wrapped__ == methods[name] for name in rpcs)


def test_an_async_generator_handler_is_refused_at_registration() -> None:
    class Streaming(connections_pb2_grpc.ConnectionServiceServicer):
        async def WatchIncomingRequests(  # noqa: N802 - named as the RPC
            self, request: Any, context: Any
        ) -> AsyncIterator[Any]:
            yield connections_pb2.WatchIncomingRequestsResponse()

    with pytest.raises(TypeError, match="coroutine function"):
        # The generated base declares every RPC abstract; this test needs the one stream only.
        map_errors(Streaming())  # type: ignore[abstract]
