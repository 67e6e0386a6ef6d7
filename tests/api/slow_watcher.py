"""A watch client in its own process that stops reading: the slow consumer of test_watch.

Usage, from the repository root: python -m tests.api.slow_watcher TARGET TOKEN. Prints
"synced" once the snapshot is in, then reads nothing until a line arrives on stdin; then
drains the stream and prints how it ended
("<code name> <reason>"). A client in its own process, because a client sharing the server's
process and event loop drains its socket whether or not the test reads.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from tests.rich import error_reason
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc


async def main(target: str, token: str) -> None:
    # No BDP probing: the receive window stays small, as for a slow mobile client.
    async with grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        stub = connections_pb2_grpc.ConnectionServiceStub(channel)
        call = stub.WatchIncomingRequests(
            connections_pb2.WatchIncomingRequestsRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=120,
        )
        while True:
            event = await call.read()
            assert isinstance(event, connections_pb2.WatchIncomingRequestsResponse)  # not EOF
            if event.WhichOneof("event") == "synced":
                break
        print("synced", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
            print("OK -", flush=True)
        except grpc.aio.AioRpcError as error:
            print(error.code().name, error_reason(error), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
