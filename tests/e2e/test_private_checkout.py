"""The embedded PostgreSQL from a checkout inside a 0700 folder (root's home, `mktemp -d`).

Under root PostgreSQL runs as an unprivileged user who cannot pass such a folder, yet the
checkout's `.venv` holds pgserver's binaries and `.umbra/` the data. The test clones the
repository into a fresh 0700 folder, puts a copy of the installed pgserver package inside it
(as the clone's own `.venv` would), and runs the clone's `umbra-grpc serve` from there with
its data directory inside the clone: it must serve, answer a real call and stop cleanly.
As an ordinary user the same test shows that nothing changes for them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.test_cli import (
    CLI_SECRET,
    EXIT_SECONDS,
    Serving,
    bearer,
    environment,
)
from umbra_grpc.embedded import SHARED_DATA, EmbeddedPostgres, free_port
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc
from umbra_grpc.tokens import mint_token

REPOSITORY = Path(__file__).resolve().parents[2]


def pgserver_package() -> Path:
    """The installed pgserver package folder."""
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None and spec.origin is not None, "pgserver is a dependency"
    return Path(spec.origin).parent


@pytest.fixture
def private_clone() -> Iterator[Path]:
    """A clone of this repository inside a fresh 0700 folder, with pgserver inside it."""
    top = Path(tempfile.mkdtemp(prefix="umbra-private-"))
    assert top.stat().st_mode & 0o777 == 0o700
    clone = top / "src" / "umbra"
    try:
        subprocess.run(
            ["git", "clone", "--quiet", "--no-hardlinks", str(REPOSITORY), str(clone)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        # The clone has the committed code; the working tree's may be newer (uncommitted
        # edits under test), so the package itself is copied over the clone's.
        shutil.rmtree(clone / "umbra_grpc")
        shutil.copytree(
            REPOSITORY / "umbra_grpc",
            clone / "umbra_grpc",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        site = clone / ".venv-site"
        package = pgserver_package()
        shutil.copytree(package, site / package.name, ignore=shutil.ignore_patterns("__pycache__"))
        libs = package.with_name(package.name + ".libs")
        if libs.is_dir():
            shutil.copytree(libs, site / libs.name)
        yield clone
    finally:
        data = clone / ".umbra" / "postgres"
        if (data / "pgdata" / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                EmbeddedPostgres(data).stop()
        if data.is_symlink():
            shutil.rmtree(data.resolve(), ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


def test_serve_from_a_checkout_inside_a_0700_folder(private_clone: Path, tmp_path: Path) -> None:
    env = environment(
        UMBRA_DATA_DIR=str(private_clone / ".umbra"),
        UMBRA_LISTEN=f"127.0.0.1:{free_port()}",
        UMBRA_JWT_SECRET=CLI_SECRET,
        PYTHONPATH=os.pathsep.join(
            str(path)
            for path in (private_clone, private_clone / "generated", private_clone / ".venv-site")
        ),
    )
    # The clone's own code and its copy of pgserver, not the installed ones.
    probe = subprocess.run(
        [sys.executable, "-c", "import pgserver, umbra_grpc; print(pgserver, umbra_grpc)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=private_clone,
    )
    assert probe.stdout.count(str(private_clone)) == 2, probe.stdout

    # Run from inside the clone: `-m` puts the working folder first on sys.path.
    server = Serving(env, tmp_path, command=(sys.executable, "-m", "umbra_grpc"), cwd=private_clone)
    try:
        server.wait_serving()
        admin = bearer(mint_token(CLI_SECRET, subject="private-checkout", scopes=["umbra.admin"]))
        with grpc.insecure_channel(server.target) as channel:
            accounts = accounts_pb2_grpc.AccountServiceStub(channel)
            reply = accounts.UpsertUser(
                accounts_pb2.UpsertUserRequest(
                    user=accounts_pb2.User(id=7, umbral_name="private", is_active=True)
                ),
                metadata=admin,
                timeout=10,
            )
            assert reply.user.umbral_name == "private"
        assert server.stop(signal.SIGTERM) == 0, server.stderr[-3000:]
    finally:
        server.kill()
    assert "Traceback" not in server.stderr

    data = private_clone / ".umbra" / "postgres"
    if os.geteuid() == 0:
        # The folder stays closed; the cluster lives where its user can reach it.
        assert (private_clone.parents[1].stat().st_mode & 0o777) == 0o700
        assert data.is_symlink()
        assert data.resolve().parent == SHARED_DATA
    version_file = data / "pgdata" / "PG_VERSION"
    made = version_file.stat().st_ino
    assert not (data / "pgdata" / "postmaster.pid").exists()
    # A second start finds the same cluster (the symlink is followed, nothing re-created).
    again = subprocess.run(
        [sys.executable, "-m", "umbra_grpc", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=EXIT_SECONDS * 2,
        check=False,
        cwd=private_clone,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert version_file.stat().st_ino == made
