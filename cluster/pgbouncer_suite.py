"""`make test-pgbouncer`: the whole pytest suite with the service behind PgBouncer.

A private PostgreSQL (umbra_grpc.embedded, in a temporary folder, on a free loopback port)
and a PgBouncer in transaction mode in front of it (another free loopback port, trust auth,
every database through a `*` fallback entry). pytest then runs with
`UMBRA_TEST_DATABASE_URL` straight to PostgreSQL (the fixtures' CREATE/DROP DATABASE and
migrations, the tests' own SQL) and `UMBRA_TEST_POOLER`, which points every service the
tests start at PgBouncer with `UMBRA_DB_STATEMENT_CACHE_SIZE=0` and its LISTEN connection
direct (tests/support.py `app_settings`), as deploy/ runs it.

    python -m cluster.pgbouncer_suite WORKDIR [pytest arguments]
    python -m cluster.pgbouncer_suite --teardown WORKDIR

Everything lives in WORKDIR; `--teardown` (cluster/test-pgbouncer.sh runs it on any exit)
ends the PgBouncer and the PostgreSQL recorded there and is safe to run twice.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from umbra_grpc.config import Config
from umbra_grpc.embedded import EmbeddedPostgres, free_port

HOST = "127.0.0.1"
IGNORED = "extra_float_digits, statement_timeout, lock_timeout, idle_in_transaction_session_timeout"
PYTEST = Path(sys.executable).parent / "pytest"
# PgBouncer does not forward the service's timeouts (startup parameters): deploy/ sets them on
# the role (deploy/roles.sql). Here the role is also the tests' own, direct, so PgBouncer sets
# them on each server connection it opens instead, with the service's defaults: without them a
# test holding a row lock on purpose would wait forever for an RPC that waits for that lock.
TIMEOUTS = (
    f"SET statement_timeout = {Config.db_statement_timeout_ms}; "
    f"SET lock_timeout = {Config.db_lock_timeout_ms}; "
    f"SET idle_in_transaction_session_timeout = {Config.db_idle_in_transaction_timeout_ms}"
)
# The suite opens a pool per test server (several per module, some concurrent): PgBouncer
# must take every client; the server side stays under the private PostgreSQL's 300.
CONFIG = """\
[databases]
* = host={host} port={pg_port} connect_query='{timeouts}'

[pgbouncer]
listen_addr = {host}
listen_port = {port}
unix_socket_dir =
pidfile = {folder}/pgbouncer.pid
logfile = {folder}/pgbouncer.log
auth_type = trust
auth_file = {folder}/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_db_connections = 40
max_client_conn = 2000
; As deploy/pgbouncer.ini: these startup parameters are not forwarded.
ignore_startup_parameters = {ignored}
server_login_retry = 1
query_wait_timeout = 30
"""


def _postgres_user() -> pwd.struct_passwd | None:
    """PgBouncer refuses to run as root: under root it runs as `postgres`."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam("postgres")


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
        return True
    return False


def start_pgbouncer(workdir: Path, pg_port: int) -> int:
    """Starts PgBouncer in front of `pg_port`; returns its port once it accepts."""
    folder = workdir / "pgbouncer"
    folder.mkdir()
    port = free_port()
    (folder / "pgbouncer.ini").write_text(
        CONFIG.format(
            host=HOST, pg_port=pg_port, port=port, folder=folder, ignored=IGNORED, timeouts=TIMEOUTS
        )
    )
    (folder / "userlist.txt").write_text('"postgres" ""\n')
    user = _postgres_user()
    if user is not None:
        for path in (folder, *folder.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
    subprocess.run(
        ["pgbouncer", "--daemon", str(folder / "pgbouncer.ini")],
        check=True,
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
    )
    deadline = time.monotonic() + 30
    while not _listening(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"PgBouncer not listening on {port}: see {folder}/pgbouncer.log")
        time.sleep(0.1)
    return port


def teardown(workdir: Path) -> None:
    """Ends the PgBouncer and the PostgreSQL of `workdir`, then removes it."""
    pidfile = workdir / "pgbouncer" / "pgbouncer.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    postgres = workdir / "postgres"
    if (postgres / "pgdata" / "postmaster.pid").exists():
        with contextlib.suppress(Exception):
            EmbeddedPostgres(postgres, durable=False).stop()
    shutil.rmtree(workdir, ignore_errors=True)


def run(workdir: Path, pytest_args: list[str]) -> int:
    """Brings both up, runs pytest through them, returns pytest's exit code."""
    workdir.chmod(0o755)  # the postgres user must reach its folders
    direct = EmbeddedPostgres(workdir / "postgres", durable=False, max_connections=300).start()
    pg_port = int(direct.rsplit(":", 1)[1].split("/")[0])
    port = start_pgbouncer(workdir, pg_port)
    print(f"== PostgreSQL {direct}, PgBouncer (transaction mode) {HOST}:{port}", flush=True)
    env = {
        **os.environ,
        "UMBRA_TEST_DATABASE_URL": direct,
        "UMBRA_TEST_POOLER": f"{HOST}:{port}",
    }
    return subprocess.run([str(PYTEST), *pytest_args], env=env, check=False).returncode


def main(argv: list[str]) -> int:
    if argv[:1] == ["--teardown"]:
        teardown(Path(argv[1]))
        return 0
    return run(Path(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
