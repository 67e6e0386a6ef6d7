"""Server reflection that also finds the file of a method, a field or an enum value.

grpcio-reflection asks the protobuf descriptor pool for the file containing a symbol, and
Python's pool knows only top-level names and nested types: `Service.Method` is "not found"
(grpc/grpc#34743), so `grpcurl describe umbra.connections.v1.ConnectionService.Search`, the
thing people type most, failed. When the pool does not know a symbol, this servicer looks
its parent up (a service, message or enum, which the pool does know) and answers with the
parent's file if the parent has a member of that name: a method, field, oneof, nested type,
nested enum or enum value. Anything else is still NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

# The library's own builder of an answer (the file and everything it imports), private but
# reused so that our answers are the same as its own for the symbols it does resolve.
from grpc_reflection.v1alpha._base import _file_descriptor_response

SERVICE_NAME: str = reflection.SERVICE_NAME


def member_file(pool: descriptor_pool.DescriptorPool, symbol: str) -> Any | None:
    """The file descriptor declaring `symbol` when it is a member of a known service,
    message or enum (None otherwise)."""
    parent, _, member = symbol.rpartition(".")
    lookups = (
        (pool.FindServiceByName, ("methods_by_name",)),
        (
            pool.FindMessageTypeByName,
            ("fields_by_name", "oneofs_by_name", "nested_types_by_name", "enum_types_by_name"),
        ),
        (pool.FindEnumTypeByName, ("values_by_name",)),
    )
    for find, members in lookups:
        try:
            descriptor = find(parent)
        except KeyError:
            continue
        if any(member in getattr(descriptor, table) for table in members):
            return descriptor.file
    return None


class ReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """grpcio-reflection's aio servicer, resolving member symbols as well."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        answer = super()._file_containing_symbol(request, fully_qualified_name)
        if not answer.HasField("error_response"):
            return answer
        descriptor = member_file(self._pool, fully_qualified_name)
        if descriptor is None:
            return answer
        return _file_descriptor_response(descriptor, request)


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection (v1alpha, what grpcurl speaks) for `service_names` on `server`."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer(tuple(service_names)), server
    )
