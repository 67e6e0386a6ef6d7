"""A private PostgreSQL in a data directory: the zero-configuration default and the test cluster.

Binaries come from the `pgserver` package (PostgreSQL 16) when it is installed, else from the
machine's own installation. PostgreSQL refuses to run as root, so under root the cluster is
owned by and run as an unprivileged system user (`postgres` when it exists, else one created
as `umbra-pg`). The server listens on 127.0.0.1 only, on a free port, with trust auth: it is
for one developer's machine or one test run, never for production.

`python -m umbra_grpc.embedded probe URL` exits 0 when a PostgreSQL answers at URL (the
Makefile uses it to decide whether to run the suite a second time on the machine's server).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import TracebackType

_FALLBACK_USER = "umbra-pg"


class EmbeddedPostgresError(RuntimeError):
    """The private PostgreSQL could not be set up or started."""


def find_binaries() -> Path:
    """The folder holding initdb, pg_ctl and postgres."""
    # Located without importing pgserver: its import touches platformdirs and warns.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "pginstall" / "bin"
        if (bundled / "pg_ctl").exists():
            return bundled
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = subprocess.run(  # noqa: S603 - fixed argument list
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if bindir and (Path(bindir) / "initdb").exists():
            return Path(bindir)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key)
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries: install the pgserver package or PostgreSQL itself"
    )


def _version_key(path: str) -> int:
    version = Path(path).parent.name
    return int(version) if version.isdigit() else 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedPostgres:
    """One private cluster: `start()` returns its URL, `stop()` shuts it down."""

    def __init__(self, data_dir: Path, *, durable: bool = True, max_connections: int = 300):
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.socket_dir = self.data_dir / "run"
        self.log_file = self.data_dir / "postgres.log"
        self.durable = durable
        self.max_connections = max_connections
        self.port: int | None = None
        self._bin = find_binaries()
        self._user = _run_as_user()

    @property
    def url(self) -> str:
        """`postgresql://` URL of the running cluster's `postgres` database."""
        if self.port is None:
            raise EmbeddedPostgresError("not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        """Initialises the data directory if needed, starts the server, returns its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._user is not None:
            _check_reachable(self.data_dir, self._user)
            for path in (self.data_dir, self.socket_dir):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
            if self.log_file.exists():
                os.chown(self.log_file, self._user.pw_uid, self._user.pw_gid)
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                *(() if self.durable else ("--no-sync",)),
            )
        self.port = free_port()
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-p {self.port}",
            f"-k {self.socket_dir}",
            f"-c max_connections={self.max_connections}",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.log_file),
            "-o",
            " ".join(options),
        )
        return self.url

    def stop(self) -> None:
        """Fast shutdown: open sessions are ended, the data stays."""
        if (self.pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.pgdata))
        self.port = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, program: str, *args: str) -> None:
        command = [str(self._bin / program), *args]
        for _attempt in range(2):
            result = subprocess.run(  # noqa: S603 - binaries we located, no shell
                command,
                capture_output=True,
                text=True,
                check=False,
                user=self._user.pw_uid if self._user else None,
                group=self._user.pw_gid if self._user else None,
                cwd=self.data_dir,
            )
            # Killed by a signal before it ran (seen once: a crash in the forked child of a
            # process full of gRPC threads): the command did nothing, so run it again.
            if result.returncode >= 0:
                break
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip()[-2000:]
            raise EmbeddedPostgresError(f"{program} failed ({result.returncode}): {tail}")


def _run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", _FALLBACK_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(  # noqa: S603 - fixed argument list
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _FALLBACK_USER],  # noqa: S607
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(_FALLBACK_USER)


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """PostgreSQL runs as `user`: every folder above the data directory must let it pass."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001 and parent.stat().st_uid != user.pw_uid:
            raise EmbeddedPostgresError(
                f"{parent} is closed to the '{user.pw_name}' user PostgreSQL runs as; "
                "choose another UMBRA_DATA_DIR (e.g. under /tmp or /var/lib)"
            )


def dev_jwt_secret(data_dir: Path) -> str:
    """The development HS256 secret kept in the data directory (created on first use)."""
    path = data_dir / "jwt-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


async def probe(url: str, wait_seconds: float = 3.0) -> bool:
    """Whether a PostgreSQL answers at `url`."""
    import asyncpg

    try:
        connection = await asyncpg.connect(url, timeout=wait_seconds)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await connection.close()
    return True


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "probe":
        sys.exit(0 if asyncio.run(probe(sys.argv[2])) else 1)
    sys.exit("usage: python -m umbra_grpc.embedded probe URL")
