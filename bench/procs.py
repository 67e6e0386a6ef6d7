"""Processes of a bench run: the server, PostgreSQL's, the clients; CPU and RSS from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_SECONDS = 60.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields after the command: state is [0], so utime (14th) is [11] and stime [12].
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def total_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time of several processes; ones that have gone away count as nothing."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from VmRSS in /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    """Direct child processes of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry.name))
    return found


def postgres_pids(pgdata: Path) -> list[int]:
    """The postmaster of a cluster and its children (backends, walwriter, ...)."""
    postmaster = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    return [postmaster, *children(postmaster)]


class CpuMeter:
    """CPU seconds used by a set of processes between `start()` and `stop()`."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self._start = 0.0

    def start(self) -> None:
        self._start = total_cpu_seconds(self.pids)

    def stop(self) -> float:
        return total_cpu_seconds(self.pids) - self._start


async def wait_serving(target: str, within: float = START_SECONDS) -> None:
    """Returns once the server at `target` reports SERVING on the health service."""
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {target} never became SERVING")
            await asyncio.sleep(0.1)


class ServerProcess:
    """A server subprocess (`bench.server` or `umbra-grpc serve`), its log in a file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def serving_pids(self) -> list[int]:
        """The processes doing the serving: the workers of `--workers N`, else itself."""
        workers = children(self.pid)
        return workers or [self.pid]

    async def start(self, target: str) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            await wait_serving(target)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, within: float = 20.0) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), within)
        except TimeoutError:
            # The session holds the server and any workers it spawned.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


class ClientProcess:
    """A `bench.client` subprocess: a job in, "ready", "go", a JSON result out."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> dict[str, Any]:
        """Starts the client and waits until it has prepared (returns its ready message)."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.client",
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=256 * 1024 * 1024,
        )
        await self._send(json.dumps(self.job))
        return await self._receive()

    async def go(self) -> None:
        await self._send("go")

    async def command(self, line: str) -> None:
        await self._send(line)

    async def result(self, within: float = 300.0) -> dict[str, Any]:
        return await asyncio.wait_for(self._receive(), within)

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    async def _send(self, line: str) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def _receive(self) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"bench client exited ({code}) before answering")
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"bench client failed: {message['error']}")
        return message
