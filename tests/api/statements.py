"""Counting an RPC's own statements (SPEC 8 budgets) on a test server."""

from __future__ import annotations

from tests.support import RunningServer
from umbra_grpc.storage import users

CALLER_CHECK = users._IS_ACTIVE.sql


def rpc_statements(server: RunningServer) -> int:
    """Statements counted since the last reset, but for the cached caller check.

    A user's own UpsertUser / UpdateSettings NOTIFY may reach the listener after the user's
    first call and drop the cached "is active" answer, so whether the check shows up in a
    count is up to timing, not to the RPC being counted.
    """
    return sum(1 for sql in server.statements.statements if sql != CALLER_CHECK)
