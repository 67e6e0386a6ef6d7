"""ConnectionService servicer: protobuf in, one domain call, protobuf out."""

from __future__ import annotations

from typing import Any

import grpc

from umbra_grpc.pb import connections_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class ConnectionServicer(connections_pb2_grpc.ConnectionServiceServicer):
    """Every RPC of the contract; the ones not built yet answer UNIMPLEMENTED."""
