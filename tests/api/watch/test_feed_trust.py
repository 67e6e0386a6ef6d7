"""SPEC 10.10: the watch feed trusts no NOTIFY payload (any database role may send one)."""

from __future__ import annotations

import json

import pytest

from tests.api.streams import next_event, send, until_synced, watch
from tests.support import Connections, NewUser, Sql

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def notify(sql: Sql, **payload: object) -> None:
    """A NOTIFY umbra_requests from plain SQL, as any connected role could send it."""
    await sql.rows("SELECT pg_notify('umbra_requests', $1)", json.dumps(payload))


async def test_a_forged_notify_never_hands_another_users_request_to_a_watcher(
    connections: Connections, new_user: NewUser, sql: Sql
) -> None:
    me, victim, sender, friend = [await new_user() for _ in range(4)]
    secret = await send(connections, sender, victim)
    pending = await send(connections, friend, me)
    call = watch(connections, me)
    try:
        assert [e.received.id for e in await until_synced(call)] == [pending.id]
        # Someone else's request, "for" me; and a cancel of my request that never happened.
        await notify(sql, kind="received", request_id=secret.id, receiver_id=me.id)
        await notify(sql, kind="cancelled", request_id=pending.id, receiver_id=me.id)
        # NOTIFYs reach the listener in order: the next event is this true one, so the
        # forged ones before it were dropped.
        live = await send(connections, await new_user(), me)
        event = await next_event(call)
        assert (event.WhichOneof("event"), event.received.id) == ("received", live.id)
    finally:
        call.cancel()
