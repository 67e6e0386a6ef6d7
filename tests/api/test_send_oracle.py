"""SendRequest is no existence oracle (SPEC 10.2).

A caller who has not opted in learns nothing about any handle: every well-formed one gets the
same CONNECTIONS_DISABLED. And a NOT_FOUND never waits on the target's row lock, so how long
it takes says nothing about who else is writing to that user.
"""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from tests.locks import until_waiting
from tests.rich import expect_error, status_details
from tests.support import Connections, NewUser, Sql
from umbra_grpc.pb import connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
# Far beyond the server's lock_timeout (2 s): a call that waited on the lock would end in
# whatever the lock wait gives, never in time to pass for an answer that did not wait.
CALL_SECONDS = 30.0


async def written(sql: Sql) -> int:
    return int(
        await sql.value(
            "SELECT (SELECT count(*) FROM connection_requests) + (SELECT count(*) FROM outbox)"
            " + (SELECT count(*) FROM notifications) + (SELECT count(*) FROM audit_log)"
        )
    )


async def test_a_caller_not_opted_in_gets_one_answer_for_every_handle(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    me = await new_user(accept=False)
    reachable = await new_user()
    closed = await new_user(accept=False)
    inactive = await new_user(active=False)
    handles = (
        reachable.handle,
        reachable.handle.upper(),
        "nobody-by-that-name",
        closed.handle,
        inactive.handle,
        me.handle,
    )
    before = await written(sql)
    answers = set()
    for handle in handles:
        error = await expect_error(
            connections.SendRequest(pb.SendRequestRequest(umbral_name=handle), metadata=me.md),
            grpc.StatusCode.FAILED_PRECONDITION,
            "CONNECTIONS_DISABLED",
        )
        answers.add((error.details(), status_details(error).SerializeToString()))
    assert len(answers) == 1
    assert await written(sql) == before
    # A malformed handle is still a malformed request, whoever sends it.
    await expect_error(
        connections.SendRequest(pb.SendRequestRequest(umbral_name="x"), metadata=me.md),
        grpc.StatusCode.INVALID_ARGUMENT,
        "HANDLE_INVALID",
    )


async def test_not_found_never_waits_on_the_targets_row_lock(
    connections: Connections, new_user: NewUser, sql: Sql, database_url: str
) -> None:
    me = await new_user()
    closed = await new_user(accept=False)
    inactive = await new_user(active=False)
    reachable = await new_user()
    blocker = await asyncpg.connect(database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        # Another writer holds every target's users row, as a racing sender or an account
        # update would.
        await blocker.execute(
            "SELECT 1 FROM users WHERE id = ANY($1::bigint[]) FOR UPDATE",
            [closed.id, inactive.id, reachable.id],
        )
        for target in (closed, inactive):
            await expect_error(
                connections.SendRequest(
                    pb.SendRequestRequest(umbral_name=target.handle),
                    metadata=me.md,
                    timeout=CALL_SECONDS,
                ),
                grpc.StatusCode.NOT_FOUND,
                "USER_NOT_FOUND",
            )
        # The control: a send that may go through does queue on the lock (I3 needs it)...
        sent = connections.SendRequest(
            pb.SendRequestRequest(umbral_name=reachable.handle),
            metadata=me.md,
            timeout=CALL_SECONDS,
        )
        await until_waiting(sql)
        assert not sent.done()
        await transaction.rollback()
        # ...and goes through once the lock is gone.
        assert (await sent).request.receiver_umbral_name == reachable.handle
    finally:
        await blocker.close()
