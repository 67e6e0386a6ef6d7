"""A real `umbra-grpc serve` subprocess for tests that need a second process or a crashable one.

The process runs on the test's database with the suite's JWT secret; its output goes to files
(no pipe can fill up). Rate limits and timing floors are off unless the caller sets
`UMBRA_RATE_LIMITS` / `UMBRA_TIMING_FLOORS` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import TEST_SECRET, app_environment, until
from umbra_grpc.embedded import free_port

UMBRA_GRPC = Path(sys.executable).parent / "umbra-grpc"
SERVING = health_pb2.HealthCheckResponse.SERVING
STARTUP_SECONDS = 60.0
EXIT_SECONDS = 30.0


@dataclass
class Serve:
    """A `umbra-grpc serve` subprocess whose output goes to files (no pipe can fill up)."""

    process: asyncio.subprocess.Process
    target: str
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def wait_serving(self) -> None:
        """Polls grpc health until SERVING; fails early when the process dies."""
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                if self.process.returncode is not None:
                    pytest.fail(f"serve exited {self.process.returncode}: {self.stderr[-3000:]}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    return bool(reply.status == SERVING)  # grpc_health ships no stubs
                return False

            await until(
                serving,
                within=STARTUP_SECONDS,
                what=lambda: f"serve SERVING: {self.stderr[-3000:]}",
                every=0.2,
            )

    async def end(self) -> None:
        """SIGTERM, then SIGKILL if it will not go (idempotent)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), EXIT_SECONDS)
            except TimeoutError:
                self.process.kill()
        await self.process.wait()


async def start_serve(database_url: str, logs: Path, **variables: str) -> Serve:
    """A `umbra-grpc serve` on `database_url` just started (not yet SERVING); its output and
    data directory in `logs`. `variables` add to or override its environment."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("UMBRA_")}
    target = f"127.0.0.1:{free_port()}"
    env.update(
        **app_environment(database_url),
        UMBRA_JWT_SECRET=TEST_SECRET,
        UMBRA_LISTEN=target,
        UMBRA_RATE_LIMITS="off",
        UMBRA_TIMING_FLOORS="off",
        UMBRA_LOG_FORMAT="text",
        UMBRA_DATA_DIR=str(logs),
    )
    env.update(variables)
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    stdout_path, stderr_path = logs / "serve.stdout", logs / "serve.stderr"
    with stdout_path.open("w") as out, stderr_path.open("w") as err:
        process = await asyncio.create_subprocess_exec(
            str(UMBRA_GRPC), "serve", env=env, stdout=out, stderr=err
        )
    return Serve(process, target, stderr_path)


@contextlib.asynccontextmanager
async def serving(database_url: str, logs: Path, **variables: str) -> AsyncIterator[Serve]:
    """A SERVING `umbra-grpc serve` on `database_url`, ended however the test goes."""
    server = await start_serve(database_url, logs, **variables)
    try:
        await server.wait_serving()
        yield server
    finally:
        await server.end()
