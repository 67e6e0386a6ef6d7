"""The one module that imports generated protobuf and gRPC code."""

from umbra.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from umbra.connections.v1 import connections_pb2, connections_pb2_grpc

__all__ = ["accounts_pb2", "accounts_pb2_grpc", "connections_pb2", "connections_pb2_grpc"]
