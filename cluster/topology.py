"""The production topology of deploy/, brought up on loopback ports of this one machine.

etcd (one member) <- Patroni x 2 (PostgreSQL 15, synchronous replication) <- HAProxy's
primary-only route <- PgBouncer (transaction pooling) <- `umbra-grpc serve` x 2 <- HAProxy's
h2 route <- clients. Each replica's one LISTEN connection goes straight to the primary with a
multi-host URL. Every configuration file is rendered from deploy/ (the same files an operator
uses), with free loopback ports and small memory settings.

Every process started is recorded (pid and start time) in `<workdir>/pids`, so `teardown`
(run by `cluster/test-cluster.sh` on any exit, interrupt included) ends exactly those.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from umbra_grpc.embedded import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UMBRA_GRPC = Path(sys.executable).parent / "umbra-grpc"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
HOST = "127.0.0.1"
NODES = ("pg1", "pg2")
REPLICAS = (1, 2)
JWT_SECRET = secrets.token_hex(32)
# I3 as the replicas run it: roomy enough that senders stay busy through all the faults
# (the default 5 per 10 minutes would turn most of the load into TOO_MANY_PENDING), tight
# enough that some senders reach it; the end-of-run invariant check uses the same figures.
PENDING_CAP, PENDING_WINDOW = 40, 600
STOP_SECONDS = 30.0


def render(template: str, values: dict[str, object]) -> str:
    """deploy/`template` with its ${NAME}s filled in (a missing one is an error)."""
    text = (DEPLOY / template).read_text()
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


def env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
    return {key.strip(): value.strip() for key, value in pairs}


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET `url`, None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def wait_for(what: str, condition, within: float, every: float = 0.25):
    """Polls `condition()` until it returns something truthy; fails after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within:.0f}s")
        time.sleep(every)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/pid/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass
class Ports:
    """Free loopback ports, one per listening socket."""

    etcd_client: int = field(default_factory=free_port)
    etcd_peer: int = field(default_factory=free_port)
    pg: dict[str, int] = field(default_factory=lambda: {n: free_port() for n in NODES})
    api: dict[str, int] = field(default_factory=lambda: {n: free_port() for n in NODES})
    pg_primary: int = field(default_factory=free_port)
    pgbouncer: int = field(default_factory=free_port)
    lb: int = field(default_factory=free_port)
    grpc: dict[int, int] = field(default_factory=lambda: {i: free_port() for i in REPLICAS})
    metrics: dict[int, int] = field(default_factory=lambda: {i: free_port() for i in REPLICAS})


class Topology:
    """Starts, breaks and stops the pieces; every step is a plain blocking call."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.ports = Ports()
        self.passwords = {name: secrets.token_hex(12) for name in ("super", "repl", "umbra")}
        self.postgres = pwd.getpwnam("postgres")
        self.replicas: dict[int, subprocess.Popen[bytes]] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    # --- addresses -----------------------------------------------------------------------

    @property
    def lb_target(self) -> str:
        return f"{HOST}:{self.ports.lb}"

    def replica_target(self, index: int) -> str:
        return f"{HOST}:{self.ports.grpc[index]}"

    def node_url(self, node: str, user: str = "postgres", database: str = "umbra") -> str:
        password = self.passwords["super" if user == "postgres" else "umbra"]
        return f"postgresql://{user}:{password}@{HOST}:{self.ports.pg[node]}/{database}"

    @property
    def primary_url(self) -> str:
        """Superuser, straight to whichever node is primary (for the checks)."""
        hosts = ",".join(f"{HOST}:{self.ports.pg[n]}" for n in NODES)
        return (
            f"postgresql://postgres:{self.passwords['super']}@{hosts}/umbra"
            "?target_session_attrs=read-write"
        )

    # --- processes -----------------------------------------------------------------------

    def _spawn(
        self, name: str, argv: list[str], *, env: dict[str, str] | None = None, as_postgres=False
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=self.workdir,
            start_new_session=True,
            user=self.postgres.pw_uid if as_postgres else None,
            group=self.postgres.pw_gid if as_postgres else None,
        )
        log.close()
        with (self.workdir / "pids").open("a") as pids:
            pids.write(f"{process.pid} {_start_time(process.pid)} {name}\n")
        self.processes[name] = process
        return process

    def _postgres_dir(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, self.postgres.pw_uid, self.postgres.pw_gid)
        path.chmod(0o700)
        return path

    # --- bring-up ------------------------------------------------------------------------

    def up(self) -> None:
        """Everything, in dependency order; returns once both replicas are SERVING."""
        self.workdir.chmod(0o755)  # the postgres user must reach its folders
        self.logs.mkdir()
        self.logs.chmod(0o777)
        self.start_etcd()
        for node in NODES:
            self.start_patroni(node)
        self.wait_for_replication()
        self.create_role()
        self.start_haproxy()
        self.start_pgbouncer()
        self.migrate()
        for index in REPLICAS:
            self.start_replica(index)
        for index in REPLICAS:
            self.wait_for_replica(index)
        wait_for("HAProxy routing to the replicas", self.balanced, 30)

    def balanced(self) -> bool:
        """Whether a health check through the balancer answers SERVING."""
        with grpc.insecure_channel(self.lb_target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def start_etcd(self) -> None:
        port = self.ports
        values = {
            "ETCD_NAME": "etcd1",
            "ETCD_DATA_DIR": self.workdir / "etcd",
            "ETCD_HOST": HOST,
            "ETCD_CLIENT_PORT": port.etcd_client,
            "ETCD_PEER_PORT": port.etcd_peer,
            "ETCD_INITIAL_CLUSTER": f"etcd1=http://{HOST}:{port.etcd_peer}",
        }
        self._spawn("etcd", ["etcd"], env=env_file(render("etcd.env", values)))
        health = f"http://{HOST}:{port.etcd_client}/health"
        wait_for("etcd healthy", lambda: http_status(health) == 200, 30)

    def patroni_config(self, node: str) -> Path:
        return self.workdir / f"patroni-{node}.yml"

    def start_patroni(self, node: str) -> None:
        data = self.workdir / "pg" / node
        self._postgres_dir(data.parent)
        sockets = self._postgres_dir(self.workdir / "sockets" / node)
        values = {
            "NODE_NAME": node,
            "NODE_HOST": HOST,
            "PATRONI_API_PORT": self.ports.api[node],
            "ETCD_HOSTS": f"{HOST}:{self.ports.etcd_client}",
            "PG_MAX_CONNECTIONS": 60,
            "PG_SHARED_BUFFERS": "16MB",
            "PG_PORT": self.ports.pg[node],
            "PG_DATA_DIR": data,
            "PG_BIN_DIR": PG_BIN,
            "PG_SOCKET_DIR": sockets,
            "SUPERUSER_PASSWORD": self.passwords["super"],
            "REPLICATION_PASSWORD": self.passwords["repl"],
        }
        config = self.patroni_config(node)
        config.write_text(render("patroni.yml", values))
        os.chown(config, self.postgres.pw_uid, self.postgres.pw_gid)
        config.chmod(0o600)
        self._spawn(f"patroni-{node}", ["patroni", str(config)], as_postgres=True)

    def members(self) -> list[dict[str, object]]:
        """Patroni's view of the cluster (asked of any node that answers)."""
        for node in NODES:
            try:
                url = f"http://{HOST}:{self.ports.api[node]}/cluster"
                with urllib.request.urlopen(url, timeout=2) as reply:
                    members: list[dict[str, object]] = json.load(reply)["members"]
                    return members
            except (OSError, ValueError, KeyError):
                continue
        return []

    def role_of(self, role: str) -> str | None:
        """The name of the member with `role` (leader, sync_standby, replica) that is running."""
        for member in self.members():
            if member.get("role") == role and member.get("state") in ("running", "streaming"):
                return str(member["name"])
        return None

    def wait_for_replication(self, within: float = 120) -> tuple[str, str]:
        """Until there is a leader and a synchronous standby; returns their names."""

        def ready() -> tuple[str, str] | None:
            leader, standby = self.role_of("leader"), self.role_of("sync_standby")
            return (leader, standby) if leader and standby else None

        found: tuple[str, str] = wait_for("leader and sync standby", ready, within, every=0.5)
        return found

    def create_role(self) -> None:
        argv = [
            str(PG_BIN / "psql"),
            self.primary_url.replace("/umbra?", "/postgres?"),
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"password={self.passwords['umbra']}",
            "-qf",
            str(DEPLOY / "roles.sql"),
        ]
        subprocess.run(argv, check=True, capture_output=True, text=True)

    def start_haproxy(self) -> None:
        port = self.ports
        values = {
            "LB_GRPC_BIND": f"{HOST}:{port.lb}",
            "PG_PRIMARY_BIND": f"{HOST}:{port.pg_primary}",
            **{f"REPLICA_{i}": self.replica_target(i) for i in REPLICAS},
            **{f"REPLICA_{i}_METRICS_PORT": port.metrics[i] for i in REPLICAS},
            **{f"PG_NODE_{n[-1]}": f"{HOST}:{port.pg[n]}" for n in NODES},
            **{f"PG_NODE_{n[-1]}_API_PORT": port.api[n] for n in NODES},
        }
        config = self.workdir / "haproxy.cfg"
        config.write_text(render("haproxy.cfg", values))
        subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], check=True)
        self._spawn("haproxy", ["haproxy", "-db", "-f", str(config)])

    def start_pgbouncer(self) -> None:
        folder = self._postgres_dir(self.workdir / "pgbouncer")
        values = {
            "PG_PRIMARY_HOST": HOST,
            "PG_PRIMARY_PORT": self.ports.pg_primary,
            "PGBOUNCER_LISTEN_ADDR": HOST,
            "PGBOUNCER_PORT": self.ports.pgbouncer,
            "PGBOUNCER_DIR": folder,
            "PGBOUNCER_POOL_SIZE": 10,
        }
        config = folder / "pgbouncer.ini"
        config.write_text(render("pgbouncer.ini", values))
        (folder / "userlist.txt").write_text(f'"umbra" "{self.passwords["umbra"]}"\n')
        for path in (config, folder / "userlist.txt"):
            os.chown(path, self.postgres.pw_uid, self.postgres.pw_gid)
            path.chmod(0o600)
        self._spawn("pgbouncer", ["pgbouncer", str(config)], as_postgres=True)

    def replica_env(self, index: int) -> dict[str, str]:
        port = self.ports
        values = {
            "UMBRA_DB_PASSWORD": self.passwords["umbra"],
            "PGBOUNCER_HOST": HOST,
            "PGBOUNCER_PORT": port.pgbouncer,
            **{f"PG_NODE_{n[-1]}": f"{HOST}:{port.pg[n]}" for n in NODES},
            "UMBRA_LISTEN": self.replica_target(index),
            "UMBRA_METRICS_LISTEN": f"{HOST}:{port.metrics[index]}",
            "UMBRA_JWT_SECRET": JWT_SECRET,
            "UMBRA_PAGE_TOKEN_SECRET": JWT_SECRET,
            "UMBRA_DB_POOL_SIZE": 5,
        }
        return {
            **env_file(render("umbra.env", values)),
            # The scenario's own settings: no rate limits or floors in the way of its load,
            # quick probes and polls, the ntfy recorder on loopback allowed. No resend cooldown:
            # the actors send again to a pair whose request they cancelled or that was rejected,
            # and a RESEND_TOO_SOON there would be the cooldown working, not a failover's doing.
            "UMBRA_RATE_LIMITS": "off",
            "UMBRA_RESEND_COOLDOWN_SECONDS": "0",
            "UMBRA_PENDING_CAP": str(PENDING_CAP),
            "UMBRA_PENDING_WINDOW_SECONDS": str(PENDING_WINDOW),
            "UMBRA_TIMING_FLOORS": "off",
            "UMBRA_NTFY_ALLOWED_NETWORKS": "127.0.0.0/8",
            "UMBRA_LISTENER_PROBE_SECONDS": "1",
            "UMBRA_OUTBOX_POLL_SECONDS": "1",
            "UMBRA_NTFY_TIMEOUT_SECONDS": "2",
            "UMBRA_GRACE_SECONDS": "2",
            "UMBRA_LOG_FORMAT": "text",
            "UMBRA_DATA_DIR": str(self.workdir / f"umbra-{index}"),
        }

    def migrate(self) -> None:
        """Once, through PgBouncer (so that path is proved too), before any replica starts."""
        env = {**os.environ, **self.replica_env(1)}
        subprocess.run(
            [str(UMBRA_GRPC), "migrate"], check=True, env=env, capture_output=True, text=True
        )

    def start_replica(self, index: int) -> None:
        self.replicas[index] = self._spawn(
            f"umbra-{index}", [str(UMBRA_GRPC), "serve"], env=self.replica_env(index)
        )

    def serving(self, index: int) -> bool:
        url = f"http://{HOST}:{self.ports.metrics[index]}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                return b"\numbra_serving 1.0" in reply.read()
        except OSError:
            return False

    def wait_for_replica(self, index: int, within: float = 60) -> None:
        wait_for(f"replica {index} SERVING", lambda: self.serving(index), within)

    # --- faults --------------------------------------------------------------------------

    def switchover(self) -> tuple[str, str]:
        """A planned switchover to the synchronous standby; returns (old, new) leader.

        Through Patroni's REST API, which is what `patronictl switchover` calls (Debian's
        patronictl 3.0.2 crashed with SIGSEGV in one run here, under a shell of its own).
        """
        leader, standby = self.wait_for_replication()
        request = urllib.request.Request(
            f"http://{HOST}:{self.ports.api[leader]}/switchover",
            data=json.dumps({"leader": leader, "candidate": standby}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            if reply.status != 200:
                raise RuntimeError(f"switchover refused: {reply.status} {reply.read()!r}")
        return leader, standby

    def postmaster_pid(self, node: str) -> int | None:
        try:
            first = (self.workdir / "pg" / node / "postmaster.pid").read_text().split()[0]
        except (OSError, IndexError):
            return None
        return int(first)

    def kill_primary_postgres(self) -> str:
        """SIGKILL to the primary's postmaster (its backends die with it); returns the node."""
        leader = wait_for("a leader", lambda: self.role_of("leader"), 60)
        pid = self.postmaster_pid(leader)
        assert pid is not None, f"no postmaster.pid for {leader}"
        os.kill(pid, signal.SIGKILL)
        return leader

    def kill_replica(self, index: int) -> None:
        self.replicas[index].send_signal(signal.SIGKILL)
        self.replicas[index].wait()

    # --- teardown ------------------------------------------------------------------------

    def down(self) -> None:
        teardown(self.workdir)


def teardown(workdir: Path) -> None:
    """Ends every process recorded in `workdir/pids` (SIGTERM, then SIGKILL) and any
    postmaster left in the cluster's data folders. Safe to run twice."""
    recorded = []
    pids_file = workdir / "pids"
    if pids_file.exists():
        for line in pids_file.read_text().splitlines():
            pid, started, name = line.split(" ", 2)
            recorded.append((int(pid), started, name))
    # Replicas and balancer first, the database last (Patroni stops its PostgreSQL itself).
    order = sorted(recorded, key=lambda r: (r[2].startswith("patroni"), r[2] == "etcd"))
    for pid, started, name in order:
        if _start_time(pid) == started:
            _stop(pid, name)
    for postmaster in (workdir / "pg").glob("*/postmaster.pid"):
        try:
            pid = int(postmaster.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if _start_time(pid) is not None and "postgres" in _cmdline(pid):
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _stop(pid: int, name: str) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (teardown from another process)
            finished = 0 if _start_time(pid) else pid
        if finished:
            return
        time.sleep(0.1)
    print(f"{name} ({pid}) did not stop in {STOP_SECONDS:.0f}s: SIGKILL", flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def remove(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
