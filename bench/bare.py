"""`python -m bench.bare`: grpc.aio with nothing but the echo handler, for reference.

No interceptors, no database: what the gRPC stack alone costs per call on this machine, so
that the product's echo can be read against it. Listens on UMBRA_LISTEN.
"""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from bench.echo import add_generic_handler, echo_handler


async def serve(listen: str) -> None:
    """Serves echo and a health service until SIGTERM."""
    server = grpc.aio.server()
    add_generic_handler(echo_handler(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


if __name__ == "__main__":
    asyncio.run(serve(os.environ["UMBRA_LISTEN"]))
