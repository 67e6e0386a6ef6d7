"""A real grpc.aio server whose ConnectionService answers from a script, for client tests.

The real service cannot be made to fail UNAVAILABLE twice and then answer, or to end a
stream STREAM_TOO_SLOW on cue; this one can. It records the metadata of every attempt it
sees, so tests read what the client really sent over the wire (retries included).
"""

# ruff: noqa: N802 - servicer methods are named as the RPCs.

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from umbra_grpc.pb import connections_pb2, connections_pb2_grpc
from umbra_grpc.rpc_errors import abort

pb = connections_pb2
# How long ListConnections takes: far beyond the deadlines the tests set.
SLOW_SECONDS = 5.0
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class Stream:
    """One WatchIncomingRequests call's script: events, then the reason of the error it ends
    with (None: stay open)."""

    events: list[pb.WatchIncomingRequestsResponse]
    error: str | None = None


@dataclass
class Script:
    """What the server does; what it saw."""

    unavailable_first: int = 0
    streams: list[Stream] = field(default_factory=list)
    attempts: dict[str, list[dict[str, str | bytes]]] = field(default_factory=dict)

    def seen(self, method: str) -> list[dict[str, str | bytes]]:
        """The metadata of every attempt of `method`, in order."""
        return self.attempts.get(method, [])


def request(request_id: int) -> pb.ConnectionRequest:
    return pb.ConnectionRequest(
        id=request_id,
        sender_umbral_name=f"sender{request_id}",
        status=pb.ConnectionRequest.STATUS_PENDING,
    )


def received(request_id: int) -> pb.WatchIncomingRequestsResponse:
    return pb.WatchIncomingRequestsResponse(received=request(request_id))


def cancelled(request_id: int) -> pb.WatchIncomingRequestsResponse:
    return pb.WatchIncomingRequestsResponse(cancelled=request(request_id))


SYNCED = pb.WatchIncomingRequestsResponse(synced=pb.WatchIncomingRequestsResponse.Synced())


class ScriptedConnections(connections_pb2_grpc.ConnectionServiceServicer):
    """Search and SendRequest fail UNAVAILABLE `unavailable_first` times (counted over
    both), then answer; ListConnections answers after SLOW_SECONDS; watches follow `streams`."""

    def __init__(self, script: Script) -> None:
        self.script = script

    def _record(self, method: str, context: Context) -> None:
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        self.script.attempts.setdefault(method, []).append(metadata)

    async def _flaky(self, method: str, context: Context) -> None:
        self._record(method, context)
        if self.script.unavailable_first > 0:
            self.script.unavailable_first -= 1
            await abort(context, "STORAGE_BUSY", "try again")

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        await self._flaky("Search", context)
        return pb.SearchResponse(found=request.umbral_name == "bob")

    async def SendRequest(
        self, request: pb.SendRequestRequest, context: Context
    ) -> pb.SendRequestResponse:
        await self._flaky("SendRequest", context)
        sent = pb.ConnectionRequest(
            id=1,
            receiver_umbral_name=request.umbral_name,
            status=pb.ConnectionRequest.STATUS_PENDING,
        )
        return pb.SendRequestResponse(request=sent)

    async def ListConnections(
        self, request: pb.ListConnectionsRequest, context: Context
    ) -> pb.ListConnectionsResponse:
        self._record("ListConnections", context)
        await asyncio.sleep(SLOW_SECONDS)
        return pb.ListConnectionsResponse()

    async def WatchIncomingRequests(
        self, request: pb.WatchIncomingRequestsRequest, context: Context
    ) -> AsyncIterator[pb.WatchIncomingRequestsResponse]:
        self._record("WatchIncomingRequests", context)
        if not self.script.streams:
            await abort(context, "PERMISSION_DENIED", "no")
        stream = self.script.streams.pop(0)
        for event in stream.events:
            yield event
        if stream.error is None:
            await asyncio.Event().wait()
        else:
            await abort(context, stream.error, "scripted end")


@dataclass
class ScriptedServer:
    """A started scripted server."""

    server: grpc.aio.Server
    script: Script
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_scripted(script: Script) -> ScriptedServer:
    server = grpc.aio.server()
    connections_pb2_grpc.add_ConnectionServiceServicer_to_server(
        # The generated .pyi marks every RPC abstract; the runtime base answers UNIMPLEMENTED
        # to those a script does not play, which is what a scripted server is for.
        ScriptedConnections(script),  # type: ignore[abstract]
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return ScriptedServer(server, script, port)
