"""The bench-only RPCs, served behind the product's interceptor chain (auth included).

- `/umbra.bench.v1.Echo/Echo` returns its request bytes: the baseline every SPEC 8 ratio is
  taken against. It has no proto: raw bytes in, raw bytes out, so it costs nothing beyond the
  server stack itself (HTTP/2, the four interceptors, the access-log line).
- `/umbra.bench.v1.Bench/TakeStatements` returns (as JSON) the statements the process sent
  since the last call, counted by `StatementCounter` (every statement a unit of work
  sends), and starts counting again.

Registered only by `bench.server`, through `Service(..., extra_servicers=...)`.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from umbra_grpc.storage.database import StatementCounter

ECHO_SERVICE = "umbra.bench.v1.Echo"
BENCH_SERVICE = "umbra.bench.v1.Bench"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
TAKE_STATEMENTS_METHOD = f"/{BENCH_SERVICE}/TakeStatements"
MAX_TEXTS = 20


async def echo(request: bytes, context: Any) -> bytes:
    """The empty RPC: the request bytes back."""
    return request


def statements_handler(counter: StatementCounter) -> grpc.GenericRpcHandler:
    """`TakeStatements`: the count and texts since the previous take, then zero."""

    async def take(request: bytes, context: Any) -> bytes:
        # The texts of the first few only: a load phase sends thousands.
        taken = {"count": counter.count, "statements": counter.statements[:MAX_TEXTS]}
        counter.reset()
        return json.dumps(taken).encode()

    return grpc.method_handlers_generic_handler(
        BENCH_SERVICE, {"TakeStatements": grpc.unary_unary_rpc_method_handler(take)}
    )


def echo_handler() -> grpc.GenericRpcHandler:
    """The echo service as a generic handler (bytes in, bytes out)."""
    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )


def add_generic_handler(handler: grpc.GenericRpcHandler, server: grpc.aio.Server) -> None:
    """The `add_XServicer_to_server` shape `Service(extra_servicers=...)` calls."""
    server.add_generic_rpc_handlers((handler,))
