"""UmbraClient's idempotency keys against the real service (SPEC 11 + 13): a write retried
under the same key, as after a lost response, is answered with the first outcome, writes
nothing, and the four relationship RPCs are there as typed calls."""

from __future__ import annotations

from tests.client.test_real_server import client_of
from tests.support import NewUser, RunningServer, Sql
from umbra_grpc.pb import connections_pb2

pb = connections_pb2


async def test_a_write_retried_under_its_key_is_answered_once(
    server: RunningServer, new_user: NewUser, sql: Sql
) -> None:
    alice, bob = await new_user(), await new_user()
    async with client_of(server, alice) as client:
        keyed = client.with_options(idempotency_key="after-a-crash-1")
        first = await keyed.send_request(umbral_name=bob.handle, message="hello")
        again = await keyed.send_request(umbral_name=bob.handle, message="hello")
        assert again == first
        assert (await client.block_user(umbral_name=bob.handle)) == pb.BlockUserResponse()
        blocked = await client.list_blocked_users()
        assert [user.umbral_name for user in blocked.blocked_users] == [bob.handle]
        states = await client.get_relationships(umbral_names=[bob.handle])
        assert states.relationships[0].state == pb.RELATIONSHIP_STATE_BLOCKED
        await client.unblock_user(umbral_name=bob.handle)
    rows = await sql.value(
        "SELECT count(*) FROM connection_requests WHERE sender_id = $1", alice.id
    )
    assert rows == 1
