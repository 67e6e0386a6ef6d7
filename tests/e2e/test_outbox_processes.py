"""Real `umbra-grpc serve` processes: kill -9 between commit and delivery, and two replicas."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from tests.outbox.recorder import HOLD, RECORDER_NETWORKS, NtfyRecorder
from tests.serve import Serve, start_serve
from tests.support import Sql, until, user_metadata
from umbra_grpc.embedded import free_port
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
NTFY_TIMEOUT = 1.0
LEASE = 2 * NTFY_TIMEOUT + 5.0  # the worker's default lease for this timeout


@dataclass
class ServerProcess:
    """A `umbra-grpc serve` child process and a channel to it."""

    serve: Serve
    channel: grpc.aio.Channel

    @property
    def process(self) -> asyncio.subprocess.Process:
        return self.serve.process

    @property
    def connections(self) -> connections_pb2_grpc.ConnectionServiceAsyncStub:
        return connections_pb2_grpc.ConnectionServiceStub(self.channel)


Spawn = Callable[..., Awaitable[ServerProcess]]


@pytest_asyncio.fixture(loop_scope="session")
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Starts SERVING server processes on a database; kills whatever is left at the end."""
    started: list[ServerProcess] = []

    async def start(database_url: str, **env: str) -> ServerProcess:
        serve = await start_serve(
            database_url,
            tmp_path / f"server-{len(started)}",
            UMBRA_NTFY_TIMEOUT_SECONDS=str(NTFY_TIMEOUT),
            UMBRA_OUTBOX_RETRY_BASE_SECONDS="0.05",
            UMBRA_OUTBOX_RETRY_CAP_SECONDS="0.2",
            UMBRA_NTFY_ALLOWED_NETWORKS=",".join(RECORDER_NETWORKS),
            **env,
        )
        server = ServerProcess(serve, grpc.aio.insecure_channel(serve.target))
        started.append(server)
        await serve.wait_serving()
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.channel.close()
            if server.process.returncode is None:
                server.process.kill()
                await server.process.wait()


async def add_users(sql: Sql, ids: range, *, ntfy_url: str | None = None) -> None:
    """Opted-in users `user<id>`; with `ntfy_url`, pushes go to topic `t<id>` there."""
    await sql.rows(
        "INSERT INTO users (id, umbral_name) SELECT n, 'user' || n FROM unnest($1::bigint[]) n",
        list(ids),
    )
    await sql.rows(
        "INSERT INTO settings (user_id, accept_connections, preferred_name, ntfy_enabled, "
        "ntfy_server_url, ntfy_topic) "
        "SELECT n, true, 'Sender ' || n, $2::text IS NOT NULL, $2::text, 't' || n "
        "FROM unnest($1::bigint[]) n",
        list(ids),
        ntfy_url,
    )


async def send(server: ServerProcess, sender: int, receiver: int) -> None:
    await server.connections.SendRequest(
        connections_pb2.SendRequestRequest(umbral_name=f"user{receiver}"),
        metadata=user_metadata(sender),
    )


async def test_kill_9_between_commit_and_delivery_then_delivered_after_restart(
    spawn: Spawn, fresh_database: str, recorder: NtfyRecorder
) -> None:
    sql = Sql(fresh_database)
    await add_users(sql, range(1, 2))
    await add_users(sql, range(2, 3), ntfy_url=recorder.url)
    recorder.script("t2", HOLD)  # the first POST never gets an answer
    first = await spawn(fresh_database)

    await send(first, 1, 2)
    [held] = await recorder.wait_for("t2", 1)
    # Committed, claimed, POST in flight, no outcome written: now the process dies.
    first.process.kill()
    await first.process.wait()
    [row] = await sql.rows("SELECT *, next_attempt_at > now() AS leased FROM outbox")
    assert (row["status"], row["attempts"], row["leased"]) == ("pending", 1, True)

    await spawn(fresh_database)
    _, delivered = await recorder.wait_for("t2", 2, within=LEASE + 20)
    assert delivered.body == "Sender 1 wants to connect with you"
    assert delivered.at - held.at >= LEASE - 1.0  # only once the dead process's lease ran out

    async def settled() -> str | None:
        status: str = await sql.value("SELECT status FROM outbox")
        return None if status == "pending" else status

    assert await until(settled, within=10, what="the row no longer pending", every=0.05) == "sent"
    assert await sql.value("SELECT attempts FROM outbox") == 2


def pushes_sent(metrics: str) -> float:
    """What one process's metrics say it delivered."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("umbra_outbox_sent_total "):
                return float(line.split()[1])
    raise AssertionError("umbra_outbox_sent_total not in the scrape")


async def test_two_processes_deliver_200_pushes_exactly_once(
    spawn: Spawn, fresh_database: str, recorder: NtfyRecorder
) -> None:
    sql = Sql(fresh_database)
    receiver = 10_000
    senders = range(1, 201)
    await add_users(sql, senders)
    await add_users(sql, range(receiver, receiver + 1), ntfy_url=recorder.url)
    metrics = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    replicas = [
        await spawn(
            fresh_database,
            UMBRA_PENDING_CAP="1000",
            UMBRA_OUTBOX_BATCH_SIZE="10",
            UMBRA_METRICS_LISTEN=address,
        )
        for address in metrics
    ]

    limit = asyncio.Semaphore(20)

    async def one(sender: int) -> None:
        async with limit:
            await send(replicas[sender % 2], sender, receiver)

    await asyncio.gather(*(one(sender) for sender in senders))
    await recorder.wait_for(f"t{receiver}", 200, within=30)

    async def all_sent() -> bool:
        return not await sql.value("SELECT count(*) FROM outbox WHERE status <> 'sent'")

    await until(all_sent, within=10, what="every row sent", every=0.05)
    # Both took part, and between them delivered each push once.
    sent = [await asyncio.to_thread(pushes_sent, address) for address in metrics]
    assert sum(sent) == 200
    assert min(sent) > 0, sent
    # Stopped (a stop lets sends in flight finish): a duplicate on its way has arrived.
    for replica in replicas:
        replica.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(replica.process.wait(), 30) == 0

    bodies = Counter(request.body for request in recorder.for_topic(f"t{receiver}"))
    assert len(bodies) == 200
    assert [body for body, count in bodies.items() if count > 1] == []
    assert await sql.value("SELECT count(*) FROM outbox WHERE attempts = 1") == 200
