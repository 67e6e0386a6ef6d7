"""`grpcurl describe` resolves methods and other member symbols (grpc/grpc#34743).

Plain grpcio-reflection answers NOT_FOUND for `Service.Method`; `umbra_grpc.reflection`
finds the file through the member's parent.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_grpcurl import CONNECTION_SERVICE, grpcurl
from tests.support import RunningServer

pytestmark = pytest.mark.asyncio(loop_scope="session")

PACKAGE = "umbra.connections.v1"


async def describe(server: RunningServer, symbol: str) -> str:
    result = await grpcurl("-plaintext", server.target, "describe", symbol)
    assert result.code == 0, result.stderr
    return result.stdout


async def test_describe_a_method(server: RunningServer) -> None:
    output = await describe(server, f"{CONNECTION_SERVICE}.Search")
    assert f"{CONNECTION_SERVICE}.Search is a method:" in output
    assert f"rpc Search ( .{PACKAGE}.SearchRequest ) returns ( .{PACKAGE}.SearchResponse );" in (
        output
    )


async def test_describe_a_streaming_method(server: RunningServer) -> None:
    output = await describe(server, f"{CONNECTION_SERVICE}.WatchIncomingRequests")
    assert f"returns ( stream .{PACKAGE}.WatchIncomingRequestsResponse )" in output


@pytest.mark.parametrize(
    ("symbol", "kind"),
    [
        (f"{PACKAGE}.ConnectionRequest.create_time", "is a field"),
        (f"{PACKAGE}.WatchIncomingRequestsResponse.Synced", "is a message"),
        (f"{PACKAGE}.ConnectionRequest.Status", "is an enum"),
        (f"{PACKAGE}.ConnectionRequest.Status.STATUS_PENDING", "is an enum value"),
    ],
)
async def test_describe_nested_symbols(server: RunningServer, symbol: str, kind: str) -> None:
    output = await describe(server, symbol)
    assert f"{symbol} {kind}" in output


@pytest.mark.parametrize(
    "symbol",
    [f"{CONNECTION_SERVICE}.NoSuchMethod", f"{PACKAGE}.ConnectionRequest.no_such_field"],
)
async def test_unknown_members_are_still_not_found(server: RunningServer, symbol: str) -> None:
    result = await grpcurl("-plaintext", server.target, "describe", symbol)
    assert result.code != 0
    assert "Symbol not found" in result.stderr, result.stderr
