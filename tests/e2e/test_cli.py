"""The `umbra-grpc` command as a newcomer runs it: serve, token, demo, migrate, bad config.

Every command is a real subprocess of the installed console script. Processes left running by
a failed test are killed in `finally` blocks, and so is an embedded PostgreSQL they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.certificates import Authority
from tests.support import admin_sql, app_environment, until, until_sync, with_database
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
    "user_blocks",
    "idempotency_keys",
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
    return {**env, "UMBRA_LOG_FORMAT": "text", **variables}


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
        options = [("grpc.use_local_subchannel_pool", 1)] if new_connection else []
        with grpc.insecure_channel(self.target, options=options) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                if self.process.poll() is not None:
                    pytest.fail(f"serve exited {self.process.returncode}: {self.stderr[-3000:]}")
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    return bool(
                        reply.status == health_pb2.HealthCheckResponse.SERVING
                    )  # grpc_health ships no stubs
                return False

            until_sync(
                serving,
                within=STARTUP_SECONDS,
                what=lambda: f"serve SERVING: {self.stderr[-3000:]}",
                every=0.2,
            )

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
            **app_environment(database_url),
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
                    update_mask=field_mask_pb2.FieldMask(paths=["accept_connections"]),
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


def test_demo_and_token_carry_the_configured_issuer_and_audience(
    module_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**module_env, "UMBRA_JWT_ISSUER": "https://id.example", "UMBRA_JWT_AUDIENCE": "umbra"}
    with serving(env, tmp_path) as server:
        server.wait_serving()
        demo = run("demo", env=env)
        assert demo.returncode == 0, demo.stderr
        exported = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in demo.stdout.splitlines()
            if line.strip().startswith("export ")
        )
        for minted in (exported["ALICE"], token(env, "--user", "2")):
            claims = jwt.decode(minted, options={"verify_signature": False})
            assert (claims["iss"], claims["aud"]) == ("https://id.example", "umbra")
        with grpc.insecure_channel(server.target) as channel:
            connections = connections_pb2_grpc.ConnectionServiceStub(channel)
            found = connections.Search(
                connections_pb2.SearchRequest(umbral_name="bob"),
                metadata=bearer(exported["ALICE"]),
                timeout=10,
            )
            assert found.found
        assert server.stop(signal.SIGTERM) == 0, server.stderr[-3000:]


@pytest.mark.parametrize("command", [("demo",), ("token", "--user", "1"), ("token", "--admin")])
def test_with_only_public_keys_demo_and_token_say_they_cannot_mint(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    public = tmp_path / "public.pem"
    public.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # No server listens there: the command must stop before it tries.
    env = environment(
        UMBRA_JWT_PUBLIC_KEY_FILES=str(public),
        UMBRA_DATA_DIR=str(tmp_path / "data"),
        UMBRA_LISTEN=f"127.0.0.1:{free_port()}",
    )
    result = run(*command, env=env)
    assert result.returncode == 1
    assert f"umbra-grpc {command[0]}: cannot mint tokens" in result.stderr, result.stderr
    assert "UMBRA_JWT_PUBLIC_KEY_FILES" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "data" / "jwt-secret").exists()


def test_demo_without_a_server_says_so(tmp_path: Path) -> None:
    env = environment(
        UMBRA_JWT_SECRET=CLI_SECRET,
        UMBRA_DATA_DIR=str(tmp_path),
        UMBRA_LISTEN=f"127.0.0.1:{free_port()}",
    )
    result = run("demo", env=env)
    assert result.returncode == 1
    assert "could not create the demo users" in result.stderr, result.stderr
    assert "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr


async def waiting_on_a_lock(url: str, statement_start: str) -> bool:
    """Whether a backend whose statement starts so waits on a lock now."""
    connection = await asyncpg.connect(url)
    try:
        waiting: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND ltrim(query) LIKE $1 || '%'",
            statement_start,
        )
    finally:
        await connection.close()
    return waiting > 0


async def refuses_new_calls(target: str) -> bool:
    """Whether a call on a fresh connection is refused (UNAVAILABLE) now."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAVAILABLE
    return False


@pytest.mark.asyncio(loop_scope="session")
async def test_sigterm_lets_a_call_in_progress_finish_and_refuses_new_ones(
    module_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    env = {
        **module_env,
        "UMBRA_GRACE_SECONDS": "60",
        # The call under test waits on a lock this test holds; no timeout may end it first.
        "UMBRA_DB_LOCK_TIMEOUT_MS": "120000",
        "UMBRA_DB_STATEMENT_TIMEOUT_MS": "120000",
        "UMBRA_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS": "120000",
    }
    admin = bearer(token(env, "--admin"))
    user_id = 4242
    with serving(env, tmp_path) as server:
        server.wait_serving()
        async with grpc.aio.insecure_channel(server.target) as channel:
            accounts = accounts_pb2_grpc.AccountServiceStub(channel)
            await accounts.UpsertUser(
                accounts_pb2.UpsertUserRequest(
                    user=accounts_pb2.User(id=user_id, umbral_name=f"grace{user_id}")
                ),
                metadata=admin,
                timeout=10,
            )
            holder = await asyncpg.connect(database_url)
            try:
                lock = holder.transaction()
                await lock.start()
                await holder.execute(
                    "SELECT 1 FROM settings WHERE user_id = $1 FOR UPDATE", user_id
                )
                in_flight = asyncio.ensure_future(
                    accounts.UpdateSettings(
                        accounts_pb2.UpdateSettingsRequest(
                            user_id=user_id,
                            settings=accounts_pb2.Settings(preferred_name="Finished"),
                            update_mask=field_mask_pb2.FieldMask(paths=["preferred_name"]),
                        ),
                        metadata=admin,
                        timeout=120,
                    )
                )
                await until(
                    lambda: waiting_on_a_lock(database_url, "UPDATE settings"),
                    within=STARTUP_SECONDS,
                    what="UpdateSettings waiting on the settings row",
                    every=0.05,
                )
                server.process.send_signal(signal.SIGTERM)
                await until(
                    lambda: refuses_new_calls(server.target),
                    within=STARTUP_SECONDS,
                    what="new calls refused",
                    every=0.05,
                )
                assert not in_flight.done()
                await lock.rollback()
            finally:
                await holder.close()
            reply = await in_flight
        assert reply.settings.preferred_name == "Finished"
        assert server.process.wait(timeout=EXIT_SECONDS) == 0, server.stderr[-3000:]
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


def _tls_pair(folder: Path) -> dict[str, str]:
    authority = Authority.create(folder)
    server = authority.issue(folder, "server", server=True)
    return {"UMBRA_TLS_CERT_FILE": str(server.cert), "UMBRA_TLS_KEY_FILE": str(server.key)}


def _file(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return str(folder / name)


# One bad value per variable the issue named (and a few more); unit/test_config.py has them all.
BAD_CONFIGURATION: list[tuple[str, Callable[[Path], dict[str, str]]]] = [
    ("UMBRA_RATE_LIMITS", lambda _: {"UMBRA_RATE_LIMITS": "Search=lots"}),
    ("UMBRA_TIMING_FLOORS", lambda _: {"UMBRA_TIMING_FLOORS": "Search=50"}),
    ("UMBRA_TRUSTED_PROXIES", lambda _: {"UMBRA_TRUSTED_PROXIES": "10.0.0.0/8,proxy"}),
    ("UMBRA_JWT_PUBLIC_KEY_FILES", lambda f: {"UMBRA_JWT_PUBLIC_KEY_FILES": str(f / "no.pem")}),
    ("UMBRA_JWT_JWKS_FILE", lambda f: {"UMBRA_JWT_JWKS_FILE": _file(f, "jwks.json", "{")}),
    ("UMBRA_TLS_CERT_FILE", lambda f: {**_tls_pair(f), "UMBRA_TLS_CERT_FILE": str(f / "no")}),
    ("UMBRA_TLS_KEY_FILE", lambda f: {**_tls_pair(f), "UMBRA_TLS_KEY_FILE": _file(f, "k", "")}),
    (
        "UMBRA_TLS_CLIENT_CA_FILE",
        lambda f: {**_tls_pair(f), "UMBRA_TLS_CLIENT_CA_FILE": _file(f, "ca", "no")},
    ),
    ("UMBRA_LISTEN", lambda _: {"UMBRA_LISTEN": "127.0.0.1"}),
    ("UMBRA_METRICS_LISTEN", lambda _: {"UMBRA_METRICS_LISTEN": "localhost:metrics"}),
    ("UMBRA_JWT_LEEWAY_SECONDS", lambda _: {"UMBRA_JWT_LEEWAY_SECONDS": "nan"}),
    ("UMBRA_GRACE_SECONDS", lambda _: {"UMBRA_GRACE_SECONDS": "-1"}),
    ("UMBRA_DB_POOL_SIZE", lambda _: {"UMBRA_DB_POOL_SIZE": "1e9"}),
    ("UMBRA_LOG_FORMAT", lambda _: {"UMBRA_LOG_FORMAT": "xml"}),
    ("UMBRA_MIGRATE", lambda _: {"UMBRA_MIGRATE": "sometimes"}),
]


@pytest.mark.parametrize(
    ("variable", "setup"), BAD_CONFIGURATION, ids=[name for name, _ in BAD_CONFIGURATION]
)
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_bad_configuration_stops_before_postgres_starts(
    command: str, variable: str, setup: Callable[[Path], dict[str, str]], data_dir: Path
) -> None:
    # No UMBRA_DATABASE_URL: the command would start an embedded PostgreSQL in data_dir.
    env = environment(UMBRA_DATA_DIR=str(data_dir), **setup(data_dir))
    result = run(command, env=env)
    assert result.returncode == 1
    assert result.stderr.startswith(f"configuration error: {variable}"), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (data_dir / "postgres").exists()


def test_a_bad_database_url_names_the_variable() -> None:
    result = run("migrate", env=environment(UMBRA_DATABASE_URL="mysql://localhost/umbra"))
    assert result.returncode == 1
    assert result.stderr.startswith("configuration error: UMBRA_DATABASE_URL"), result.stderr


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


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (its parent may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def worker_pids(server: Serving) -> list[int]:
    """The `--workers` processes of `server` (multiprocessing's resource tracker left out)."""
    return [
        child
        for child in children(server.process.pid)
        if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_text()
    ]


def listener_pids(port: int, candidates: list[int]) -> set[int]:
    """Which of `candidates` hold a socket listening on `port` (by socket inode)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    owners = set()
    for pid in candidates:
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir()):
                owners.add(pid)
    return owners


def test_serve_workers_share_one_port_and_stop_together(
    module_env: dict[str, str], tmp_path: Path
) -> None:
    with serving(module_env, tmp_path, "--workers", "2") as server:
        server.wait_serving()
        workers = worker_pids(server)
        assert len(workers) == 2
        # Both come to hold a listening socket on the one port (SO_REUSEPORT among themselves
        # only); the second may still be starting when the first answers.
        port = int(server.target.rsplit(":", 1)[1])
        until_sync(
            lambda: listening_sockets(port) == 2,
            within=STARTUP_SECONDS,
            what="both workers listening",
        )
        assert listener_pids(port, workers) == set(workers)
        # New connections land on one worker or the other; each worker becomes SERVING once
        # it has started (the first answer above may have come from the faster one).
        for _ in range(20):
            server.wait_serving(new_connection=True)
        assert server.stop(signal.SIGTERM) == 0, server.stderr[-3000:]
    assert not any(alive(pid) for pid in workers)
    assert "Traceback" not in server.stderr


@pytest.mark.parametrize("second_args", [("--workers", "2"), ()], ids=["workers", "single"])
def test_a_second_serve_on_a_served_port_fails_naming_it(
    module_env: dict[str, str], tmp_path: Path, second_args: tuple[str, ...]
) -> None:
    port = int(module_env["UMBRA_LISTEN"].rsplit(":", 1)[1])
    with serving(module_env, tmp_path, "--workers", "2") as first:
        first.wait_serving()
        until_sync(
            lambda: listening_sockets(port) == 2,
            within=STARTUP_SECONDS,
            what="both workers listening",
        )
        # Would run (and time out here) if it joined the first one's port.
        second = run("serve", *second_args, env=module_env)
        assert second.returncode == 1
        assert f"port {port} is already served" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        assert listening_sockets(port) == 2
        first.wait_serving(new_connection=True)


def test_serve_workers_refuse_a_port_another_program_shares(module_env: dict[str, str]) -> None:
    port = int(module_env["UMBRA_LISTEN"].rsplit(":", 1)[1])
    # A stranger of the same user listening with SO_REUSEPORT: the kernel would let workers in.
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind(("127.0.0.1", port))
        stranger.listen()
        result = run("serve", "--workers", "2", env=module_env)
    assert result.returncode == 1
    assert f"cannot listen on port {port} (UMBRA_LISTEN)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("variable", ["UMBRA_LISTEN", "UMBRA_METRICS_LISTEN"])
def test_a_taken_port_stops_serve_before_postgres_starts(variable: str, data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = environment(
            UMBRA_DATA_DIR=str(data_dir),
            **{"UMBRA_LISTEN": f"127.0.0.1:{free_port()}", variable: f"127.0.0.1:{port}"},
        )
        result = run("serve", env=env)
    assert result.returncode == 1
    assert f"cannot listen on port {port} ({variable})" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (data_dir / "postgres").exists()


def test_workers_exit_when_their_parent_is_killed(
    module_env: dict[str, str], tmp_path: Path
) -> None:
    with serving(module_env, tmp_path, "--workers", "2") as server:
        server.wait_serving()
        workers = worker_pids(server)
        assert len(workers) == 2
        try:
            server.process.kill()
            server.process.wait(timeout=EXIT_SECONDS)
            until_sync(
                lambda: not any(alive(pid) for pid in workers),
                within=EXIT_SECONDS,
                what="the workers exited after their parent was SIGKILLed",
            )
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free on 127.0.0.1 right now."""
    while True:
        port = free_port()
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("127.0.0.1", port + 1))
            return port


def metrics_answer(port: int) -> str:
    """The body of /metrics on `port`, or "" while nothing answers there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body: bytes = reply.read()
            return body.decode()
    except OSError:
        return ""


def serves_metrics(port: int) -> bool:
    return "umbra_rpcs_total" in metrics_answer(port)


def test_each_worker_serves_metrics_on_its_own_port(
    module_env: dict[str, str], tmp_path: Path
) -> None:
    base = free_port_pair()
    env = {**module_env, "UMBRA_METRICS_LISTEN": f"127.0.0.1:{base}"}
    with serving(env, tmp_path, "--workers", "2") as server:
        server.wait_serving()
        workers = worker_pids(server)
        for port in (base, base + 1):
            until_sync(
                functools.partial(serves_metrics, port),
                within=STARTUP_SECONDS,
                what=f"metrics on {port}",
            )
        owners = [listener_pids(port, workers) for port in (base, base + 1)]
        # One worker each, not the same one.
        assert all(len(owner) == 1 for owner in owners), owners
        assert owners[0] != owners[1]
        assert server.stop(signal.SIGTERM) == 0, server.stderr[-3000:]


def test_serve_workers_need_a_fixed_port(module_env: dict[str, str]) -> None:
    result = run("serve", "--workers", "2", env={**module_env, "UMBRA_LISTEN": "127.0.0.1:0"})
    assert result.returncode != 0
    assert "fixed port" in result.stderr
