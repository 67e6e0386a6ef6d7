"""`Query`: SQL with :named parameters in asyncpg's numbered form."""

from __future__ import annotations

import pytest

from umbra_grpc.storage.database import Query


def test_named_parameters_become_numbered_ones() -> None:
    query = Query(
        "SELECT :a, CAST(:b AS bigint), :a, '{}'::jsonb, x::text, :b_c FROM t WHERE y = :a"
    )
    assert query.sql == (
        "SELECT $1, CAST($2 AS bigint), $1, '{}'::jsonb, x::text, $3 FROM t WHERE y = $1"
    )
    assert query.args({"b": 2, "a": 1, "b_c": 3, "unused": 4}) == [1, 2, 3]
    with pytest.raises(KeyError):
        query.args({"a": 1})
