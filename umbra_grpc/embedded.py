"""A private PostgreSQL in a data directory: the zero-configuration default and the test cluster.

Binaries come from the `pgserver` package (PostgreSQL 16) when it is installed, else from the
machine's own installation. PostgreSQL refuses to run as root, so under root the cluster is
owned by and run as an unprivileged system user (`postgres` when it exists, else one created
as `umbra-pg`). The server listens on 127.0.0.1 only, on a free port, with trust auth: it is
for one developer's machine or one test run, never for production.

Root's checkouts often sit in folders that user cannot pass (`/root/src`, `mktemp -d`: 0700).
Nothing is loosened there; instead, under root:
- binaries the user cannot reach (pgserver's, inside the checkout's `.venv`) are run from a
  root-owned copy under `/var/cache/umbra-grpc` (made once per installation, 34 MB);
- a data directory the user cannot reach is kept under `/var/lib/umbra-grpc`, and the
  requested path becomes a symlink to it, so later runs find the same cluster.

`python -m umbra_grpc.embedded probe URL` exits 0 when a PostgreSQL answers at URL (the
Makefile uses it to decide whether to run the suite a second time on the machine's server).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

_FALLBACK_USER = "umbra-pg"
# Root-owned homes for what the unprivileged user must reach (see the module docstring).
SHARED_BINARIES = Path("/var/cache/umbra-grpc")
SHARED_DATA = Path("/var/lib/umbra-grpc")


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
        self._user = _run_as_user()
        if self._user is not None and not _reachable(data_dir.resolve(), self._user):
            data_dir = _relocated(data_dir)
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.socket_dir = self.data_dir / "run"
        self.log_file = self.data_dir / "postgres.log"
        self.durable = durable
        self.max_connections = max_connections
        self.port: int | None = None
        self._bin = find_binaries()
        if self._user is not None and not _reachable(self._bin / "pg_ctl", self._user):
            self._bin = _shared_copy(self._bin.parent) / "bin"

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

    def status(self) -> str:
        """What `pg_ctl status` says of the data directory (run as the cluster's user)."""
        return self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, program: str, *args: str, check: bool = True) -> str:
        """Runs one of the cluster's programs as its user; returns what it printed."""
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
        if check and result.returncode != 0:
            tail = (result.stderr or result.stdout).strip()[-2000:]
            raise EmbeddedPostgresError(f"{program} failed ({result.returncode}): {tail}")
        return result.stdout + result.stderr


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


def _reachable(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether `user` may pass through every folder above `path`."""
    for folder in path.parents:
        if not folder.exists():
            continue
        info = folder.stat()
        if info.st_uid != user.pw_uid and not info.st_mode & 0o001:
            return False
    return True


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """PostgreSQL runs as `user`: every folder above the data directory must let it pass."""
    if not _reachable(path, user):
        raise EmbeddedPostgresError(
            f"a folder above {path} is closed to the '{user.pw_name}' user PostgreSQL runs as; "
            "choose another UMBRA_DATA_DIR (e.g. under /tmp or /var/lib)"
        )


def _root_owned_folder(path: Path) -> Path:
    """`path` as a folder owned by root that only root may write (created when missing).

    Refuses a folder someone else could have prepared: its binaries would run as PostgreSQL.
    """
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    info = path.lstat()
    if not path.is_dir() or path.is_symlink() or info.st_uid != 0 or info.st_mode & 0o022:
        raise EmbeddedPostgresError(f"{path} must be a folder owned and writable by root only")
    return path


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(str(part) for part in parts).encode()).hexdigest()[:16]


def _shared_copy(install: Path) -> Path:
    """A root-owned copy of a PostgreSQL installation (bin, lib, share) others may run.

    pgserver's binaries find their libraries through `RPATH $ORIGIN/../../../pgserver.libs`
    (auditwheel), so the copy keeps that layout: `<package>/<install>` beside
    `<package>.libs`. Keyed by the source's path and its `postgres` binary's size and mtime,
    so a new version gets a new copy. Made in a scratch folder and renamed into place, so a
    half-made copy is never used and two processes racing both end with a whole one.
    """
    package = install.parent
    libs = package.with_name(package.name + ".libs")
    postgres = (install / "bin" / "postgres").stat()
    base = _root_owned_folder(SHARED_BINARIES)
    target = base / f"pg-{_digest(install, postgres.st_size, postgres.st_mtime_ns)}"
    copied = target / package.name / install.name
    if (copied / "bin" / "pg_ctl").exists():
        return copied
    scratch = Path(tempfile.mkdtemp(prefix=".copy-", dir=base))
    try:
        shutil.copytree(install, scratch / package.name / install.name, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, scratch / libs.name, symlinks=True)
        for folder in (scratch, scratch / package.name):
            folder.chmod(0o755)
        with contextlib.suppress(OSError):  # another process won the race: use its copy
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return copied


def _relocated(data_dir: Path) -> Path:
    """Where a data directory the PostgreSQL user cannot reach is kept instead.

    `data_dir` becomes a symlink to a root-owned folder under SHARED_DATA named after it, so
    the next run with the same UMBRA_DATA_DIR finds the same cluster.
    """
    if data_dir.is_symlink():
        return data_dir.resolve()
    if data_dir.exists() and any(data_dir.iterdir()):
        raise EmbeddedPostgresError(
            f"{data_dir} is closed to the user PostgreSQL runs as and is not empty; "
            "choose another UMBRA_DATA_DIR (e.g. under /tmp or /var/lib)"
        )
    target = _root_owned_folder(SHARED_DATA) / f"pg-{_digest(data_dir.resolve())}"
    target.mkdir(mode=0o700, exist_ok=True)
    if data_dir.exists():
        data_dir.rmdir()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.symlink_to(target, target_is_directory=True)
    return target


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
