"""Ids in requests (request, connection, person, notification ids): checked before any
statement runs, the same way for every RPC."""

from __future__ import annotations

from umbra_grpc.domain.errors import InvalidField


def check_id(value: int, field: str) -> None:
    """Ids are positive: anything below 1 is INVALID_ARGUMENT."""
    if value < 1:
        raise InvalidField(f"{field} must be at least 1")
