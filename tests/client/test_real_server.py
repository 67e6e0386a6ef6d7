"""UmbraClient against the real service: typed calls, token rotation, and a watch that
outlives a server stopped and restarted on the same port.

Two servers share this module's database: `server` (the conftest fixture) stays up and takes
the writes; the watched one is stopped mid-watch and started again on its port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from tests.client.test_watch_scripted import described
from tests.support import (
    TEST_SECRET,
    NewUser,
    RunningServer,
    TestUser,
    start_server,
    stop_server,
    test_config,
    until,
)
from umbra_grpc.client import IncomingWatch, UmbraClient, error_reason
from umbra_grpc.pb import connections_pb2
from umbra_grpc.tokens import mint_token

pb = connections_pb2
WAIT_SECONDS = 30.0


def token_of(user: TestUser) -> str:
    return mint_token(TEST_SECRET, subject=str(user.id))


@contextlib.asynccontextmanager
async def client_of(server: RunningServer, user: TestUser) -> AsyncIterator[UmbraClient]:
    async with UmbraClient(server.target, token_of(user), max_backoff=1.0) as client:
        yield client


async def test_typed_calls_on_the_real_service(server: RunningServer, new_user: NewUser) -> None:
    alice, bob = await new_user(), await new_user(preferred_name="Bob")
    async with client_of(server, alice) as as_alice, client_of(server, bob) as as_bob:
        assert (await as_alice.search(umbral_name=bob.handle.upper())).found is True
        sent = await as_alice.send_request(umbral_name=bob.handle)
        assert sent.request.receiver_preferred_name == "Bob"
        incoming = await as_bob.list_incoming_requests(page_size=10)
        assert [request.id for request in incoming.requests] == [sent.request.id]
        answer = await as_bob.respond(
            request_id=sent.request.id, action=pb.RespondRequest.ACTION_ACCEPT
        )
        assert answer.request.status == pb.ConnectionRequest.STATUS_ACCEPTED
        connections = await as_alice.list_connections()
        assert [c.connected_umbral_name for c in connections.connections] == [bob.handle]
        profile = await as_alice.get_shared_profile(connection_id=connections.connections[0].id)
        assert profile.profile.preferred_name == "Bob"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await as_alice.send_request(umbral_name=alice.handle)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(refused.value) == "SELF_REQUEST"


async def test_a_token_provider_can_change_the_caller(
    server: RunningServer, new_user: NewUser
) -> None:
    alice, carol, dave = await new_user(), await new_user(), await new_user()
    current = [token_of(alice)]
    async with UmbraClient(server.target, lambda: current[0]) as client:
        await client.send_request(umbral_name=dave.handle)
        assert len((await client.list_outgoing_requests()).requests) == 1
        current[0] = token_of(carol)
        assert len((await client.list_outgoing_requests()).requests) == 0


class Collector:
    """Reads a watch in the background, as a consumer would, describing each event."""

    def __init__(self, watch: IncomingWatch) -> None:
        self.watch = watch
        self.events: list[str] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.watch:
            if event.WhichOneof("event") != "heartbeat":
                self.events.append(described(event))

    async def until(self, condition: Callable[[list[str]], bool]) -> None:
        """Polls until `condition(events)` holds (the reader failing ends the wait)."""

        def holds() -> bool:
            if condition(self.events):
                return True
            if self._task.done():
                self._task.result()
                raise AssertionError(f"the watch ended: {self.events}")
            return False

        await until(holds, within=WAIT_SECONDS, what=lambda: f"events so far: {self.events}")

    async def close(self) -> None:
        await self.watch.aclose()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_a_watch_outlives_a_server_restart(
    server: RunningServer, database_url: str, new_user: NewUser
) -> None:
    me = await new_user()
    senders = [await new_user() for _ in range(5)]
    clients = [UmbraClient(server.target, token_of(sender)) for sender in senders]
    first = await start_server(test_config(database_url))
    watched: RunningServer | None = first
    port = first.service.port

    async def send(index: int) -> int:
        return (await clients[index].send_request(umbral_name=me.handle)).request.id

    before = await send(0)
    client = UmbraClient(f"127.0.0.1:{port}", token_of(me), max_backoff=1.0)
    collector = Collector(client.watch_incoming())
    try:
        await collector.until(lambda events: "synced" in events)
        live = await send(1)
        await collector.until(lambda events: f"received {live}" in events)
        assert collector.events == [f"received {before}", "synced", f"received {live}"]

        watched = None
        await stop_server(first)
        await collector.until(lambda _: not collector.watch.in_sync)
        # While it is down: one new request, one withdrawn, one sent and withdrawn.
        while_down = await send(2)
        await clients[0].cancel_request(request_id=before)
        unseen = await send(3)
        await clients[3].cancel_request(request_id=unseen)

        watched = await start_server(test_config(database_url, listen=f"127.0.0.1:{port}"))
        await collector.until(lambda events: events.count("synced") == 2)
        after = await send(4)
        await collector.until(lambda events: f"received {after}" in events)
    finally:
        await collector.close()
        await client.close()
        for sender in clients:
            await sender.close()
        if watched is not None:
            await stop_server(watched)

    assert collector.events[3:] == [
        f"received {while_down}",
        f"resolved {before}?",
        "synced",
        f"received {after}",
    ]
    once = Counter(collector.events) - Counter({"synced": 2})
    assert set(once.values()) == {1}, collector.events
    assert not any(str(unseen) in event for event in collector.events)
    assert sorted(collector.watch.pending) == sorted([live, while_down, after])
    assert collector.watch.reconnects >= 1
