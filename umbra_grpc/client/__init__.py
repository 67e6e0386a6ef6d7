"""Typed async Python client of the connections service (SPEC 13).

    from umbra_grpc.client import UmbraClient

    async with UmbraClient("127.0.0.1:50051", token_provider) as client:
        if (await client.search(umbral_name="bob")).found:
            sent = await client.send_request(umbral_name="bob")
        async with client.watch_incoming() as watch:
            async for event in watch:
                ...

`UmbraClient` (deadlines, retries, token provider) is in `connections`, the reconnecting
watch in `watch`, the RPC table and service config in `rpc`. It needs only the generated
code and grpcio (and uses opentelemetry-api when installed, to pass the caller's trace on),
none of the server's dependencies.
"""

from umbra_grpc.client.connections import IDEMPOTENCY_KEY_HEADER, Token, UmbraClient
from umbra_grpc.client.errors import error_reason
from umbra_grpc.client.watch import IncomingWatch

__all__ = ["IDEMPOTENCY_KEY_HEADER", "IncomingWatch", "Token", "UmbraClient", "error_reason"]
