"""The `umbra-grpc` command as a newcomer runs it: serve, token, demo, migrate, bad config.

Every command is a real subprocess of the installed console script. Processes left running by
a failed test are killed in `finally` blocks, and so is an embedded PostgreSQL they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import admin_sql, with_database
from umbra_grpc.embedded import EmbeddedPostgres, free_port
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2, connections_pb2_grpc

UMBRA_GRPC = Path(sys.executable).parent / "umbra-grpc"
CLI_SECRET = "cli-test-secret-abcdefghijklmnopqrstuvwxyz-0123456789"
STARTUP_SECONDS = 60.0
# The server's grace period (UMBRA_GRACE_SECONDS, 10 s by default) plus room to exit.
EXIT_SECONDS = 30.0
COMMAND_SECONDS = 60.0
TABLES = {
    "alembic_version",
    "audit_log",
    "users",
    "settings",
    "connection_requests",
    "user_connections",
    "persons",
    "notifications",
    "outbox",
}


def private_folder() -> Path:
    """A fresh folder under /tmp that PostgreSQL's own user may pass through.

    Not pytest's tmp_path: when the tests run as root that is private to root, and the
    embedded PostgreSQL runs as another user.
    """
    folder = Path(tempfile.mkdtemp(prefix="umbra-cli-"))
    folder.chmod(0o711)  # others may traverse it, not list it
    return folder


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without any UMBRA_* variable, plus `variables`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("UMBRA_")}
    env.update(UMBRA_LOG_FORMAT="text", **variables)
    return env


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs one short-lived command to its end."""
    return subprocess.run(
        [str(UMBRA_GRPC), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        check=False,
    )


class Serving:
    """A `umbra-grpc serve` subprocess whose output goes to files (no pipe can fill up)."""

    def __init__(
        self,
        env: dict[str, str],
        logs: Path,
        *serve_args: str,
        command: tuple[str, ...] = (str(UMBRA_GRPC),),
        cwd: Path | None = None,
    ) -> None:
        self.target = env["UMBRA_LISTEN"]
        self.stdout_path = logs / "serve.stdout"
        self.stderr_path = logs / "serve.stderr"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.process = subprocess.Popen(
                [*command, "serve", *serve_args], env=env, stdout=out, stderr=err, cwd=cwd
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_serving(self, *, new_connection: bool = False) -> None:
        """Polls grpc health until SERVING; fails early when the process dies.

        `new_connection`: on a TCP connection of its own (grpc otherwise shares one among
        channels to a target), so that with `--workers` it may reach another worker.
        """
        deadline = time.monotonic() + STARTUP_SECONDS
        options = [("grpc.use_local_subchannel_pool", 1)] if new_connection else []
        with grpc.insecure_channel(self.target, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"serve exited {self.process.returncode}: {self.stderr[-3000:]}")
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.2)
        pytest.fail(f"serve never became SERVING: {self.stderr[-3000:]}")

    def stop(self, sig: signal.Signals) -> int:
        """Sends `sig` and returns the exit code, waiting at most EXIT_SECONDS."""
        self.process.send_signal(sig)
        return self.process.wait(timeout=EXIT_SECONDS)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=EXIT_SECONDS)


@contextlib.contextmanager
def serving(env: dict[str, str], logs: Path, *serve_args: str) -> Iterator[Serving]:
    server = Serving(env, logs, *serve_args)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """UMBRA_DATA_DIR for one test; an embedded PostgreSQL left running in it is stopped."""
    folder = private_folder()
    try:
        yield folder
    finally:
        if (folder / "postgres" / "pgdata" / "postmaster.pid").exists():
            EmbeddedPostgres(folder / "postgres").stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_serve_with_no_database_url_runs_and_stops_an_embedded_postgres(
    data_dir: Path, tmp_path: Path
) -> None:
    env = environment(UMBRA_DATA_DIR=str(data_dir), UMBRA_LISTEN=f"127.0.0.1:{free_port()}")
    pgdata = data_dir / "postgres" / "pgdata"
    with serving(env, tmp_path) as server:
        server.wait_serving()
        assert (pgdata / "postmaster.pid").exists()
        assert "umbra-grpc token --user" in server.stdout
        assert server.stop(signal.SIGTERM) == 0, server.stderr[-3000:]
    assert not (pgdata / "postmaster.pid").exists()
    assert "no server running" in EmbeddedPostgres(data_dir / "postgres").status()
    assert (data_dir / "jwt-secret").exists()
    assert "Traceback" not in server.stderr


@pytest.fixture
def module_env(database_url: str) -> Iterator[dict[str, str]]:
    """Environment for commands against this module's database, with a known secret."""
    folder = private_folder()
    try:
        yield environment(
            UMBRA_DATABASE_URL=database_url,
            UMBRA_JWT_SECRET=CLI_SECRET,
            UMBRA_LISTEN=f"127.0.0.1:{free_port()}",
            UMBRA_DATA_DIR=str(folder),
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def token(env: dict[str, str], *args: str) -> str:
    result = run("token", *args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def bearer(value: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {value}"),)


def test_serve_token_and_demo_against_a_configured_database(
    module_env: dict[str, str], tmp_path: Path
) -> None:
    with serving(module_env, tmp_path) as server:
        server.wait_serving()
        demo = run("demo", env=module_env)
        assert demo.returncode == 0, demo.stderr
        assert "grpcurl -plaintext -H" in demo.stdout
        assert f"{server.target} umbra.connections.v1.ConnectionService/Search" in demo.stdout
        assert "export ALICE=" in demo.stdout

        admin = bearer(token(module_env, "--admin"))
        user = bearer(token(module_env, "--user", "42"))
        with grpc.insecure_channel(server.target) as channel:
            accounts = accounts_pb2_grpc.AccountServiceStub(channel)
            for user_id, handle in ((1, "alice"), (2, "bob"), (3, "carol")):
                reply = accounts.GetUser(
                    accounts_pb2.GetUserRequest(user_id=user_id), metadata=admin, timeout=10
                )
                assert reply.user.umbral_name == handle
                assert reply.user.is_active
                assert reply.user.settings.accept_connections

            accounts.UpsertUser(
                accounts_pb2.UpsertUserRequest(
                    user=accounts_pb2.User(id=42, umbral_name="cli.user", is_active=True)
                ),
                metadata=admin,
                timeout=10,
            )
            accounts.UpdateSettings(
                accounts_pb2.UpdateSettingsRequest(
                    user_id=42,
                    settings=accounts_pb2.Settings(accept_connections=True),
                    update_mask={"paths": ["accept_connections"]},
                ),
                metadata=admin,
                timeout=10,
            )
            connections = connections_pb2_grpc.ConnectionServiceStub(channel)
            found = connections.Search(
                connections_pb2.SearchRequest(umbral_name="bob"), metadata=user, timeout=10
            )
            assert found.found
        assert server.stop(signal.SIGINT) == 0, server.stderr[-3000:]
    assert "Traceback" not in server.stderr


async def table_names(url: str) -> set[str]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    finally:
        await connection.close()
    return {row["table_name"] for row in rows}


def test_migrate_creates_the_tables_in_an_empty_database(pg_server_url: str) -> None:
    name = f"umbra_cli_{uuid.uuid4().hex[:12]}"
    admin_sql(pg_server_url, f'CREATE DATABASE "{name}"')
    url = with_database(pg_server_url, name)
    try:
        assert asyncio.run(table_names(url)) == set()
        result = run("migrate", env=environment(UMBRA_DATABASE_URL=url))
        assert result.returncode == 0, result.stderr
        assert "migrated to head" in result.stdout
        assert asyncio.run(table_names(url)) == TABLES
    finally:
        admin_sql(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("UMBRA_DB_POOL_SIZE", "abc"),
        ("UMBRA_GRACE_SECONDS", "-1"),
        ("UMBRA_LOG_FORMAT", "xml"),
        ("UMBRA_DATABASE_URL", "mysql://localhost/umbra"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_bad_configuration_names_the_variable(command: str, variable: str, value: str) -> None:
    # A URL that nothing answers: the command must stop before it tries to connect.
    env = environment(UMBRA_DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres")
    env[variable] = value
    result = run(command, env=env)
    assert result.returncode != 0
    assert variable in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
    return found


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on `port` (/proc/net/tcp{,6}: state 0A is LISTEN)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_serve_workers_share_one_port_and_stop_together(
    module_env: dict[str, str], tmp_path: Path
) -> None:
    with serving(module_env, tmp_path, "--workers", "2") as server:
        server.wait_serving()
        workers = [
            child
            for child in children(server.process.pid)
            if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_text()
        ]
        assert len(workers) == 2
        # Both hold a listening socket on the one port (SO_REUSEPORT among themselves only).
        port = int(server.target.rsplit(":", 1)[1])
        assert listening_sockets(port) == 2
        # New connections land on one worker or the other; each worker becomes SERVING once
        # it has started (the first answer above may have come from the faster one).
        for _ in range(20):
            server.wait_serving(new_connection=True)
        assert server.stop(signal.SIGTERM) == 0, server.stderr[-3000:]
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
    assert "Traceback" not in server.stderr


def test_serve_workers_need_a_fixed_port(module_env: dict[str, str]) -> None:
    result = run("serve", "--workers", "2", env={**module_env, "UMBRA_LISTEN": "127.0.0.1:0"})
    assert result.returncode != 0
    assert "fixed port" in result.stderr
