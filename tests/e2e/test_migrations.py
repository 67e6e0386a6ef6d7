"""Safe migrations at start (SPEC 10.12): replicas migrating together migrate once, under an
advisory lock; with UMBRA_MIGRATE=off `serve` issues no DDL, so a role without DDL rights can
run it, and an unmigrated database keeps it NOT_SERVING with the reason in its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.test_cli import (
    CLI_SECRET,
    COMMAND_SECONDS,
    STARTUP_SECONDS,
    TABLES,
    UMBRA_GRPC,
    bearer,
    environment,
    run,
    serving,
    table_names,
    token,
)
from tests.support import admin_sql, until_sync, with_database
from umbra_grpc.embedded import free_port
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2, connections_pb2_grpc
from umbra_grpc.storage import migrate
from umbra_grpc.storage.migrate import MIGRATION_LOCK_KEY

REPLICAS = 4
RUNNING_UPGRADE = "Running upgrade"  # Alembic's log line for each revision it applies


@pytest.fixture
def empty_database(pg_server_url: str) -> Iterator[str]:
    """A database of its own with nothing in it."""
    name = f"umbra_migrate_{uuid.uuid4().hex[:12]}"
    admin_sql(pg_server_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(pg_server_url, name)
    finally:
        admin_sql(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def sql_value(url: str, query: str, *args: object) -> object:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


WAITING_FOR_MIGRATION_LOCK = """
    SELECT count(*) FROM pg_locks
    WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND (classid::bigint << 32 | objid::bigint) = $1
"""


def waiting_for_the_lock(url: str) -> int:
    count = asyncio.run(sql_value(url, WAITING_FOR_MIGRATION_LOCK, MIGRATION_LOCK_KEY))
    assert isinstance(count, int)
    return count


def test_replicas_migrating_one_empty_database_together_migrate_it_once(
    empty_database: str, tmp_path: Path
) -> None:
    env = environment(UMBRA_DATABASE_URL=empty_database)

    async def hold_the_lock() -> asyncpg.Connection:
        holder = await asyncpg.connect(empty_database)
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        return holder

    loop = asyncio.new_event_loop()
    holder = loop.run_until_complete(hold_the_lock())
    logs = [tmp_path / f"replica-{n}.log" for n in range(REPLICAS)]
    replicas: list[subprocess.Popen[bytes]] = []
    try:
        for log in logs:
            with log.open("wb") as sink:
                replicas.append(
                    subprocess.Popen(
                        [str(UMBRA_GRPC), "migrate"], env=env, stdout=sink, stderr=sink
                    )
                )
        # All of them are in at once, each waiting on the lock this test holds: they overlap.
        until_sync(
            lambda: waiting_for_the_lock(empty_database) == REPLICAS,
            within=STARTUP_SECONDS,
            what=f"{REPLICAS} migrations waiting on the advisory lock",
        )
        assert asyncio.run(table_names(empty_database)) == set()
        loop.run_until_complete(holder.close())
        codes = [replica.wait(timeout=COMMAND_SECONDS) for replica in replicas]
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(holder.close())
        loop.close()
        for replica in replicas:
            if replica.poll() is None:
                replica.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [0] * REPLICAS, outputs
    assert all("migrated to head" in output for output in outputs)
    # Exactly one of them applied the revisions; the others found the schema at head.
    assert [RUNNING_UPGRADE in output for output in outputs].count(True) == 1, outputs
    assert asyncio.run(table_names(empty_database)) == TABLES
    assert asyncio.run(sql_value(empty_database, "SELECT count(*) FROM alembic_version")) == 1
    head = asyncio.run(sql_value(empty_database, "SELECT version_num FROM alembic_version"))
    assert head == migrate.head_revision()
    migrate.check(empty_database)


def as_role(url: str, role: str, password: str) -> str:
    """`url` with another user (and password) in it."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


@pytest.fixture
def runtime_url(empty_database: str) -> Iterator[str]:
    """The database migrated to head by its owner, and a URL for a role that may only read
    and write rows: no CREATE on the database or its schema, no TEMPORARY."""
    migrate.upgrade(empty_database)
    role = f"umbra_runtime_{uuid.uuid4().hex[:12]}"
    database = empty_database.rpartition("/")[2]
    admin_sql(
        empty_database,
        f"CREATE ROLE {role} LOGIN PASSWORD 'runtime'",
        f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC',
        f'GRANT CONNECT ON DATABASE "{database}" TO {role}',
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
    )
    try:
        yield as_role(empty_database, role, "runtime")
    finally:
        admin_sql(empty_database, f"DROP OWNED BY {role}")
        with contextlib.suppress(asyncpg.PostgresError):
            # The database goes first (the fixture above), then the role can go.
            admin_sql(empty_database.rpartition("/")[0] + "/postgres", f"DROP ROLE {role}")


def test_migrate_off_serves_with_a_role_that_has_no_ddl_rights(
    runtime_url: str, tmp_path: Path
) -> None:
    may_create = asyncio.run(
        sql_value(
            runtime_url,
            "SELECT has_database_privilege(current_database(), 'CREATE') "
            "OR has_database_privilege(current_database(), 'TEMPORARY') "
            "OR has_schema_privilege('public', 'CREATE')",
        )
    )
    assert may_create is False
    env = environment(
        UMBRA_DATABASE_URL=runtime_url,
        UMBRA_MIGRATE="off",
        UMBRA_JWT_SECRET=CLI_SECRET,
        UMBRA_LISTEN=f"127.0.0.1:{free_port()}",
        UMBRA_DATA_DIR=str(tmp_path),
    )
    admin = bearer(token(env, "--admin"))
    with serving(env, tmp_path) as server:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            accounts = accounts_pb2_grpc.AccountServiceStub(channel)
            for user_id, handle in ((1, "ada"), (2, "grace")):
                accounts.UpsertUser(
                    accounts_pb2.UpsertUserRequest(
                        user=accounts_pb2.User(id=user_id, umbral_name=handle, is_active=True)
                    ),
                    metadata=admin,
                    timeout=10,
                )
                accounts.UpdateSettings(
                    accounts_pb2.UpdateSettingsRequest(
                        user_id=user_id,
                        settings=accounts_pb2.Settings(accept_connections=True),
                        update_mask=field_mask_pb2.FieldMask(paths=["accept_connections"]),
                    ),
                    metadata=admin,
                    timeout=10,
                )
            connections = connections_pb2_grpc.ConnectionServiceStub(channel)
            sent = connections.SendRequest(
                connections_pb2.SendRequestRequest(umbral_name="grace"),
                metadata=bearer(token(env, "--user", "1")),
                timeout=10,
            )
            assert sent.request.status == connections_pb2.ConnectionRequest.STATUS_PENDING
            accepted = connections.Respond(
                connections_pb2.RespondRequest(
                    request_id=sent.request.id, action=connections_pb2.RespondRequest.ACTION_ACCEPT
                ),
                metadata=bearer(token(env, "--user", "2")),
                timeout=10,
            )
            assert accepted.connection.connected_user_id == 1
        assert server.stop(signal.SIGTERM) == 0, server.stderr[-3000:]
    assert "UMBRA_MIGRATE=off: not migrating" in server.stderr
    assert "Traceback" not in server.stderr


def health_status(target: str) -> int | None:
    """The server's overall health, or None while it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError:
            return None
    status: int = reply.status
    return status


def test_migrate_off_on_an_unmigrated_database_stays_not_serving_and_says_why(
    empty_database: str, tmp_path: Path
) -> None:
    env = environment(
        UMBRA_DATABASE_URL=empty_database,
        UMBRA_MIGRATE="off",
        UMBRA_JWT_SECRET=CLI_SECRET,
        UMBRA_LISTEN=f"127.0.0.1:{free_port()}",
        UMBRA_DATA_DIR=str(tmp_path),
    )
    with serving(env, tmp_path) as server:
        until_sync(
            lambda: "NOT_SERVING until `umbra-grpc migrate` has run" in server.stderr,
            within=STARTUP_SECONDS,
            what="the log saying why the server is not serving",
        )
        assert health_status(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        head = migrate.head_revision()
        assert head is not None
        assert head in server.stderr
        assert asyncio.run(table_names(empty_database)) == set()
        # Migrated by someone who may: the server notices and serves.
        migrated = run("migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        server.wait_serving()
        assert server.stop(signal.SIGTERM) == 0, server.stderr[-3000:]
    assert "Traceback" not in server.stderr
