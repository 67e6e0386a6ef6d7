"""The cluster scenario: load through the balancer while the database fails over (SPEC 12).

Clients send, accept, reject, cancel and remove through HAProxy; watchers hold
WatchIncomingRequests streams; every user's pushes go to an ntfy recorder. Meanwhile: a
Patroni switchover, a SIGKILL of the new primary's postmaster, a SIGKILL and restart of one
service replica. Then it checks, and prints as figures: no call ended INTERNAL or UNKNOWN;
no acknowledged write was lost; I1-I5 hold; every watcher knows every request sent to it;
every push was delivered at least once; health went NOT_SERVING and back; how long each
fault took to recover from.

Clients retry UNAVAILABLE / ABORTED / DEADLINE_EXCEEDED. A retry may find that the first
attempt landed (SendRequest answers REQUEST_PENDING, Respond and CancelRequest
REQUEST_NOT_PENDING, RemoveConnection CONNECTION_NOT_FOUND): the driver checks that it
really did (through the API at once, or in the database at the end) and counts it so. The
driver never lets two of its own actions touch one request or one pair at once, so any
other answer is a bug and fails the run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.topology import JWT_SECRET, REPLICAS, Topology
from tests.outbox.recorder import NtfyRecorder
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2, connections_pb2_grpc
from umbra_grpc.tokens import mint_token

pb = connections_pb2
Code = grpc.StatusCode
RETRYABLE = frozenset({Code.UNAVAILABLE, Code.ABORTED, Code.DEADLINE_EXCEEDED})
FORBIDDEN = frozenset({Code.INTERNAL, Code.UNKNOWN})
USERS = 24
WATCHERS = range(1, 7)  # users 1-6 hold watch streams
ACTORS = 6
CALL_TIMEOUT = 5.0
RETRY_FOR = 45.0  # a write still failing after this is recorded as ambiguous
SERVING = health_pb2.HealthCheckResponse.SERVING
# Streams through HAProxy that end UNKNOWN this soon after their replica was SIGKILLed are
# the balancer's doing (see `watcher`), counted apart; any other UNKNOWN fails the run.
KILL_CUT_SECONDS = 3.0


def handle(user: int) -> str:
    return f"user{user:03d}"


def metadata(user: int | None) -> tuple[tuple[str, str], ...]:
    if user is None:
        token = mint_token(JWT_SECRET, subject="cluster", scopes=["umbra.admin"], ttl_seconds=3600)
    else:
        token = mint_token(JWT_SECRET, subject=str(user), ttl_seconds=3600)
    return (("authorization", f"Bearer {token}"),)


def reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of an error; "" for errors without details (a balancer's 503, a
    transport failure)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


@dataclasses.dataclass
class Req:
    id: int
    sender: int
    receiver: int


@dataclasses.dataclass
class Ledger:
    """What the service acknowledged (directly, or on a retry that found it landed)."""

    sent: dict[int, Req] = dataclasses.field(default_factory=dict)
    accepted: set[int] = dataclasses.field(default_factory=set)
    rejected: set[int] = dataclasses.field(default_factory=set)
    cancelled: set[int] = dataclasses.field(default_factory=set)
    removed: set[int] = dataclasses.field(default_factory=set)  # connection ids
    ambiguous_pairs: set[frozenset[int]] = dataclasses.field(default_factory=set)
    landed_on_retry: Counter[str] = dataclasses.field(default_factory=Counter)


class Scenario:
    """Drives the load, the faults and the checks against a running `Topology`."""

    def __init__(self, topology: Topology, recorder: NtfyRecorder, seed: int = 11) -> None:
        self.topology = topology
        self.recorder = recorder
        self.rng = random.Random(seed)
        self.md = {user: metadata(user) for user in range(1, USERS + 1)}
        self.channels = [
            grpc.aio.insecure_channel(
                topology.lb_target, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(3)
        ]
        self.calls: Counter[tuple[str, str]] = Counter()
        self.forbidden: list[str] = []
        self.anomalies: list[str] = []
        self.writes: list[tuple[float, bool]] = []
        self.ledger = Ledger()
        self.pending: dict[int, Req] = {}
        self.connected: dict[frozenset[int], tuple[int, int]] = {}  # pair -> (owner, conn id)
        self.busy: set[frozenset[int]] = set()
        self.seen: dict[int, set[int]] = {w: set() for w in WATCHERS}
        self.view: dict[int, set[int]] = {w: set() for w in WATCHERS}
        self.stream_ends: Counter[str] = Counter()
        self.health: list[tuple[float, int, str]] = []
        self.acting = True
        self.watching = True
        self.replica_kills: list[float] = []

    def stub(self) -> connections_pb2_grpc.ConnectionServiceStub:
        return connections_pb2_grpc.ConnectionServiceStub(self.rng.choice(self.channels))

    # --- one call ------------------------------------------------------------------------

    async def call(self, name: str, rpc: Callable[..., Awaitable[Any]], request: Any, user: int):
        """One attempt; returns the reply or the error, counted by method and code."""
        try:
            reply = await rpc(request, metadata=self.md[user], timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            self.calls[(name, error.code().name)] += 1
            if error.code() in FORBIDDEN:
                self.forbidden.append(f"{name}: {error.code().name} {error.details()}")
            return error
        self.calls[(name, "OK")] += 1
        return reply

    async def write(
        self, name: str, attempt: Callable[[], Awaitable[Any]]
    ) -> tuple[Any, bool] | None:
        """Retries retryable failures; returns (final answer, whether it was a retry), or
        None when it kept failing for RETRY_FOR seconds (the outcome is then unknown)."""
        started = time.monotonic()
        retry = False
        delay = 0.1
        while True:
            answer = await attempt()
            failed = isinstance(answer, grpc.aio.AioRpcError) and answer.code() in RETRYABLE
            self.writes.append((time.monotonic(), not failed))
            if not failed:
                return answer, retry
            if time.monotonic() - started > RETRY_FOR:
                self.anomalies.append(f"{name}: still {answer.code().name} after {RETRY_FOR}s")
                return None
            retry = True
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(1.0, delay * 2)

    def unexpected(self, what: str, answer: Any) -> None:
        if isinstance(answer, grpc.aio.AioRpcError):
            answer = f"{answer.code().name} {reason(answer)}"
        self.anomalies.append(f"{what}: {answer}")

    # --- set-up --------------------------------------------------------------------------

    async def create_users(self) -> None:
        accounts = accounts_pb2_grpc.AccountServiceStub(self.channels[0])
        admin = metadata(None)
        for user in range(1, USERS + 1):
            await accounts.UpsertUser(
                accounts_pb2.UpsertUserRequest(
                    user=accounts_pb2.User(id=user, umbral_name=handle(user), is_active=True)
                ),
                metadata=admin,
                timeout=10,
            )
            settings = accounts_pb2.Settings(accept_connections=True, preferred_name=f"U{user}")
            settings.ntfy.enabled = True
            settings.ntfy.server_url = self.recorder.url
            settings.ntfy.topic = f"topic{user}"
            settings.ntfy.connections_enabled = True
            await accounts.UpdateSettings(
                accounts_pb2.UpdateSettingsRequest(
                    user_id=user,
                    settings=settings,
                    update_mask={"paths": ["accept_connections", "preferred_name", "ntfy"]},
                ),
                metadata=admin,
                timeout=10,
            )

    # --- throughput ----------------------------------------------------------------------

    async def throughput(self, target: str, seconds: float = 4.0, in_flight: int = 32) -> float:
        """Search calls per second through `target`, `in_flight` at a time."""
        async with grpc.aio.insecure_channel(target) as channel:
            stub = connections_pb2_grpc.ConnectionServiceStub(channel)
            request = pb.SearchRequest(umbral_name=handle(2))
            done = 0
            deadline = time.monotonic() + seconds

            async def loop() -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    await stub.Search(request, metadata=self.md[1], timeout=CALL_TIMEOUT)
                    done += 1

            started = time.monotonic()
            await asyncio.gather(*(loop() for _ in range(in_flight)))
            return done / (time.monotonic() - started)

    # --- actors --------------------------------------------------------------------------

    async def actor(self, rng: random.Random) -> None:
        actions = (self.send, self.respond, self.cancel, self.remove)
        while self.acting:
            action = rng.choices(actions, weights=(5, 4, 1, 1))[0]
            try:
                await action(rng)
            except Exception as error:  # a bug in the driver or the service: fail the run
                self.anomalies.append(f"{action.__name__} raised {error!r}")
            await asyncio.sleep(rng.uniform(0.005, 0.03))  # load shaping, not a wait

    async def send(self, rng: random.Random) -> None:
        sender, receiver = rng.sample(range(1, USERS + 1), 2)
        pair = frozenset((sender, receiver))
        if pair in self.busy:
            return
        self.busy.add(pair)
        stub = self.stub()
        request = pb.SendRequestRequest(umbral_name=handle(receiver))
        result = await self.write(
            "SendRequest", lambda: self.call("SendRequest", stub.SendRequest, request, sender)
        )
        if result is None:
            self.ledger.ambiguous_pairs.add(pair)  # the pair stays busy: never touched again
            return
        answer, retry = result
        if not isinstance(answer, grpc.aio.AioRpcError):
            self._pending(Req(answer.request.id, sender, receiver))
        elif reason(answer) == "TOO_MANY_PENDING":
            self.busy.discard(pair)  # I3 at work: nothing was written
        elif retry and reason(answer) == "REQUEST_PENDING":
            found = await self._outgoing_to(sender, receiver)
            if found is None:
                self.unexpected(f"SendRequest {sender}->{receiver} retry", answer)
            else:
                self.ledger.landed_on_retry["SendRequest"] += 1
                self._pending(Req(found, sender, receiver))
        else:
            self.unexpected(f"SendRequest {sender}->{receiver}", answer)

    def _pending(self, req: Req) -> None:
        self.ledger.sent[req.id] = req
        self.pending[req.id] = req

    async def _outgoing_to(self, sender: int, receiver: int) -> int | None:
        stub = self.stub()
        listing = await self.write(
            "ListOutgoingRequests",
            lambda: self.call(
                "ListOutgoingRequests",
                stub.ListOutgoingRequests,
                pb.ListOutgoingRequestsRequest(page_size=100),
                sender,
            ),
        )
        if listing is None or isinstance(listing[0], grpc.aio.AioRpcError):
            return None
        for request in listing[0].requests:
            if request.receiver_umbral_name == handle(receiver):
                return int(request.id)
        return None

    def _claim(self, rng: random.Random, by_sender: bool) -> Req | None:
        """A pending request to act on: one a watching receiver has already seen."""
        ready = [
            req
            for req in self.pending.values()
            if req.receiver not in self.seen or req.id in self.seen[req.receiver]
        ]
        if not ready:
            return None
        req = rng.choice(ready)
        del self.pending[req.id]
        return req

    async def respond(self, rng: random.Random) -> None:
        req = self._claim(rng, by_sender=False)
        if req is None:
            return
        accept = rng.random() < 0.7
        action = pb.RespondRequest.ACTION_ACCEPT if accept else pb.RespondRequest.ACTION_REJECT
        stub = self.stub()
        request = pb.RespondRequest(request_id=req.id, action=action)
        result = await self.write(
            "Respond", lambda: self.call("Respond", stub.Respond, request, req.receiver)
        )
        pair = frozenset((req.sender, req.receiver))
        if result is None:
            self.ledger.ambiguous_pairs.add(pair)
            return
        answer, retry = result
        if not isinstance(answer, grpc.aio.AioRpcError):
            self._resolved(req, accept, answer.connection.id if accept else None)
        elif retry and reason(answer) == "REQUEST_NOT_PENDING":
            self.ledger.landed_on_retry["Respond"] += 1
            connection = await self._connection_with(req.receiver, req.sender) if accept else None
            if accept and connection is None:
                self.unexpected(f"Respond {req.id} retry: no connection", answer)
            self._resolved(req, accept, connection)
        else:
            self.unexpected(f"Respond {req.id}", answer)

    def _resolved(self, req: Req, accepted: bool, connection: int | None) -> None:
        pair = frozenset((req.sender, req.receiver))
        if accepted:
            self.ledger.accepted.add(req.id)
            if connection is not None:
                self.connected[pair] = (req.receiver, connection)
        else:
            self.ledger.rejected.add(req.id)
            self.busy.discard(pair)

    async def _connection_with(self, owner: int, other: int) -> int | None:
        stub = self.stub()
        listing = await self.write(
            "ListConnections",
            lambda: self.call(
                "ListConnections",
                stub.ListConnections,
                pb.ListConnectionsRequest(page_size=100),
                owner,
            ),
        )
        if listing is None or isinstance(listing[0], grpc.aio.AioRpcError):
            return None
        for connection in listing[0].connections:
            if connection.connected_user_id == other:
                return int(connection.id)
        return None

    async def cancel(self, rng: random.Random) -> None:
        req = self._claim(rng, by_sender=True)
        if req is None:
            return
        stub = self.stub()
        request = pb.CancelRequestRequest(request_id=req.id)
        result = await self.write(
            "CancelRequest",
            lambda: self.call("CancelRequest", stub.CancelRequest, request, req.sender),
        )
        pair = frozenset((req.sender, req.receiver))
        if result is None:
            self.ledger.ambiguous_pairs.add(pair)
            return
        answer, retry = result
        landed = retry and isinstance(answer, grpc.aio.AioRpcError)
        if landed and reason(answer) == "REQUEST_NOT_PENDING":
            self.ledger.landed_on_retry["CancelRequest"] += 1
        elif isinstance(answer, grpc.aio.AioRpcError):
            self.unexpected(f"CancelRequest {req.id}", answer)
            return
        self.ledger.cancelled.add(req.id)
        self.busy.discard(pair)

    async def remove(self, rng: random.Random) -> None:
        if not self.connected:
            return
        pair = rng.choice(list(self.connected))
        owner, connection = self.connected.pop(pair)
        stub = self.stub()
        request = pb.RemoveConnectionRequest(connection_id=connection)
        result = await self.write(
            "RemoveConnection",
            lambda: self.call("RemoveConnection", stub.RemoveConnection, request, owner),
        )
        if result is None:
            self.ledger.ambiguous_pairs.add(pair)
            return
        answer, retry = result
        landed = retry and isinstance(answer, grpc.aio.AioRpcError)
        if landed and reason(answer) == "CONNECTION_NOT_FOUND":
            self.ledger.landed_on_retry["RemoveConnection"] += 1
        elif isinstance(answer, grpc.aio.AioRpcError):
            self.unexpected(f"RemoveConnection {connection}", answer)
            return
        self.ledger.removed.add(connection)
        self.busy.discard(pair)

    # --- watchers and health -------------------------------------------------------------

    async def watcher(self, user: int) -> None:
        while self.watching:
            call = self.stub().WatchIncomingRequests(
                pb.WatchIncomingRequestsRequest(), metadata=self.md[user], timeout=600
            )
            snapshot: set[int] | None = set()
            try:
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "synced" and snapshot is not None:
                        self.view[user], snapshot = snapshot, None
                    elif kind == "received":
                        self.seen[user].add(event.received.id)
                        (self.view[user] if snapshot is None else snapshot).add(event.received.id)
                    elif kind in ("cancelled", "resolved"):
                        request_id = getattr(event, kind).id
                        self.seen[user].add(request_id)
                        (self.view[user] if snapshot is None else snapshot).discard(request_id)
                self.stream_ends["OK"] += 1
            except grpc.aio.AioRpcError as error:
                if error.code() == Code.UNKNOWN and self._replica_just_killed():
                    # HAProxy 2.6 ends a stream whose replica died under it with a bare
                    # END_STREAM (no grpc-status), which the client reads as UNKNOWN.
                    self.stream_ends["cut by the balancer: its replica was killed"] += 1
                    continue
                self.stream_ends[f"{error.code().name} {reason(error)}"] += 1
                if error.code() in FORBIDDEN:
                    self.forbidden.append(f"Watch: {error.code().name} {error.details()}")
            if self.watching:
                await asyncio.sleep(0.2)  # reconnect pacing

    def _replica_just_killed(self) -> bool:
        now = time.monotonic()
        return any(0 <= now - at < KILL_CUT_SECONDS for at in self.replica_kills)

    async def health_monitor(self, index: int) -> None:
        async with grpc.aio.insecure_channel(self.topology.replica_target(index)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            last = None
            while self.watching:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.aio.AioRpcError as error:
                    status = f"no answer ({error.code().name})"
                if status != last:
                    self.health.append((time.monotonic(), index, status))
                    last = status
                await asyncio.sleep(0.1)

    # --- faults and recovery -------------------------------------------------------------

    def recovery(self, fault_at: float, until: float) -> dict[str, float | int | None]:
        """From the fault to the first successful write after the last failed one."""
        phase = [(t, ok) for t, ok in self.writes if fault_at <= t < until]
        failures = [t for t, ok in phase if not ok]
        if not failures:
            return {"failed_writes": 0, "recovered_after_s": 0.0}
        # The first success may land after `until` (a call failing just before the next fault).
        after = [t for t, ok in self.writes if ok and t > failures[-1]]
        return {
            "failed_writes": len(failures),
            "first_failure_after_s": round(failures[0] - fault_at, 2),
            "recovered_after_s": round(after[0] - fault_at, 2) if after else None,
        }

    async def settled(self, since: float, within: float = 90) -> None:
        """Until both replicas are SERVING and writes succeed again after `since`."""
        deadline = time.monotonic() + within
        while True:
            serving = all(
                status == "SERVING" for index in REPLICAS for status in [self.health_now(index)]
            )
            wrote = any(ok and t > since for t, ok in self.writes[-200:])
            recent_fail = any(not ok and t > time.monotonic() - 1 for t, ok in self.writes[-200:])
            if serving and wrote and not recent_fail:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not settled within {within}s")
            await asyncio.sleep(0.2)

    def health_now(self, index: int) -> str | None:
        for _, replica, status in reversed(self.health):
            if replica == index:
                return status
        return None

    def not_serving_spells(self, since: float, until: float) -> dict[int, float]:
        """Per replica: how long health said something other than SERVING in the window."""
        spells: dict[int, float] = {}
        for index in REPLICAS:
            marks = [(t, s) for t, i, s in self.health if i == index]
            total, down_since = 0.0, None
            for t, status in marks:
                if status != "SERVING" and down_since is None and t >= since:
                    down_since = t
                elif status == "SERVING" and down_since is not None and t < until:
                    total += t - down_since
                    down_since = None
            spells[index] = round(total, 2)
        return spells
