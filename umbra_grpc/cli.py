"""`umbra-grpc serve | migrate | prune | token | demo`.

With no UMBRA_DATABASE_URL, `serve` and `migrate` use a private PostgreSQL kept in
UMBRA_DATA_DIR (default `.umbra/`), and `serve`, `token` and `demo` share the development
JWT secret kept there unless UMBRA_JWT_SECRET is set. `token` and `demo` mint what the
configured server accepts (its secret, `iss` and `aud`) and `demo` reaches it as configured
(TLS trusting UMBRA_TLS_CERT_FILE); where they cannot (public keys only, mTLS) they say so.

Every command reads the whole configuration first (`Config.from_env`): a bad variable stops
it before a PostgreSQL starts or a port is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence

import grpc
from google.protobuf import field_mask_pb2

from umbra_grpc import tracing
from umbra_grpc.config import Config, ConfigError, check_address
from umbra_grpc.domain.retention import Report, Retention, RetentionPolicy
from umbra_grpc.embedded import EmbeddedPostgres, dev_jwt_secret
from umbra_grpc.logs import configure_logging
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc
from umbra_grpc.principal import ADMIN_SCOPE
from umbra_grpc.server import Service, run_loop
from umbra_grpc.storage import migrate
from umbra_grpc.storage.database import Database
from umbra_grpc.tokens import mint_token

_log = logging.getLogger("umbra.cli")
DEMO_USERS = ((1, "alice", "Alice"), (2, "bob", "Bob"), (3, "carol", "Carol"))
DEMO_CALL_SECONDS = 10.0


class CommandError(Exception):
    """A command cannot do what it was asked; the message tells the user why (no traceback)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `umbra-grpc` command."""
    args = _parser().parse_args(argv)
    try:
        config = Config.from_env()
    except ConfigError as error:
        sys.exit(f"configuration error: {error}")
    configure_logging(config.log_format, config.log_level)
    try:
        sys.exit(args.run(config, args))
    except CommandError as error:
        sys.exit(f"umbra-grpc {args.command}: {error}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umbra-grpc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND", dest="command")
    serve = commands.add_parser("serve", help="migrate the database, then serve")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N server processes sharing the port (SO_REUSEPORT); needs a fixed port",
    )
    serve.set_defaults(run=_serve)
    commands.add_parser("migrate", help="migrate the database to head").set_defaults(run=_migrate)
    commands.add_parser(
        "prune", help="delete what the UMBRA_RETENTION_* settings say has aged, once"
    ).set_defaults(run=_prune)
    token = commands.add_parser("token", help="print a JWT for grpcurl and scripts")
    who = token.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, metavar="ID", help="an end user's id")
    who.add_argument("--admin", action="store_true", help=f"a backend service ({ADMIN_SCOPE})")
    token.add_argument("--ttl", type=float, default=3600.0, metavar="SECONDS")
    token.set_defaults(run=_token)
    demo = commands.add_parser("demo", help="create alice, bob and carol on a running server")
    demo.set_defaults(run=_demo)
    return parser


@contextlib.contextmanager
def _database(config: Config) -> Iterator[Config]:
    """The configuration with a database URL: the configured one or the embedded one."""
    if config.database_url is not None:
        yield config
        return
    cluster = EmbeddedPostgres(config.data_dir / "postgres")
    url = cluster.start()
    _log.info("embedded PostgreSQL started in %s", cluster.pgdata)
    try:
        yield config.with_changes(database_url=url)
    finally:
        cluster.stop()
        _log.info("embedded PostgreSQL stopped")


def _serve(config: Config, args: argparse.Namespace) -> int:
    port = check_address("UMBRA_LISTEN", config.listen)
    try:
        tracing.exporters()  # a bad OTEL_* value stops us before anything starts
    except ConfigError as error:
        sys.exit(f"configuration error: {error}")
    if args.workers < 1:
        sys.exit("--workers must be at least 1")
    if args.workers > 1 and port == 0:
        sys.exit("--workers needs a fixed port in UMBRA_LISTEN (port 0 would differ per process)")
    ports = [("UMBRA_LISTEN", config.listen, port), *_metrics_ports(config, args.workers)]
    if not config.jwt_secret and not config.jwt_public_key_files and not config.jwt_jwks_file:
        config = config.with_changes(jwt_secret=dev_jwt_secret(config.data_dir))
        _log.warning("no UMBRA_JWT_SECRET: using the development secret in %s", config.data_dir)
    with _claimed_port(config.listen, port, ports), _database(config) as ready:
        assert ready.database_url is not None
        if ready.migrate:
            migrate.upgrade(ready.database_url)
        else:
            _log.info("UMBRA_MIGRATE=off: not migrating; SERVING once the schema is at head")
        if args.workers == 1:
            return run_loop(ready, _run_server(ready))
        return _run_workers(ready.with_changes(reuse_port=True), args.workers)


# A port this serve will listen on: (the variable that names it, its address, the port).
Binding = tuple[str, str, int]


def _metrics_ports(config: Config, workers: int) -> list[Binding]:
    """The metrics port of each worker (port + index); checked before anything starts."""
    if not config.metrics_listen:
        return []
    port = check_address("UMBRA_METRICS_LISTEN", config.metrics_listen)
    if workers > 1 and (port == 0 or port + workers - 1 > 65535):
        sys.exit(
            f"configuration error: UMBRA_METRICS_LISTEN: --workers {workers} needs a fixed "
            f"port with room for one port per worker (port + 0 ... port + {workers - 1})"
        )
    return [
        ("UMBRA_METRICS_LISTEN", config.metrics_listen, port + index) for index in range(workers)
    ]


@contextlib.contextmanager
def _claimed_port(listen: str, port: int, bindings: Sequence[Binding]) -> Iterator[None]:
    """Holds `port` for this `serve` (and its workers) while it runs; exits naming the port
    when another `serve` holds it or anything listens on one of `bindings`' ports.

    `serve --workers N` binds with SO_REUSEPORT, and Linux lets any process of the same user
    join such a port: a second `serve --workers` would share the first one's port silently.
    So every `serve` first takes an abstract unix socket named after the port (unique per
    network namespace, released by the kernel when this process dies, not inherited by the
    workers), then checks that nothing listens on its ports by binding them without
    SO_REUSEPORT.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as claim:
        if port != 0:
            try:
                claim.bind(f"\0umbra-grpc-serve:{port}")
            except OSError:
                sys.exit(
                    f"port {port} is already served by another `umbra-grpc serve` on this "
                    f"machine (UMBRA_LISTEN={listen}); stop it or choose another port"
                )
        for binding in bindings:
            _check_free(*binding)
        yield


def _check_free(variable: str, address: str, port: int) -> None:
    """Exits naming the port when something already listens on `address`'s host at `port`."""
    if port == 0:
        return
    host = address.rpartition(":")[0].strip("[]")
    try:
        candidates = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        sys.exit(f"cannot listen on {address} ({variable}): {error.strerror}")
    for family, kind, protocol, _, resolved in candidates:
        with socket.socket(family, kind, protocol) as probe:
            # As grpc binds: SO_REUSEADDR, so closed connections in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(resolved)
            except OSError as error:
                sys.exit(f"cannot listen on port {port} ({variable}): {error.strerror}")


def _run_workers(config: Config, count: int) -> int:
    """N processes serving one port; SIGTERM/SIGINT reach all of them; 0 when all exit 0."""
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker_main,
            args=(_worker_config(config, n), os.getpid()),
            name=f"umbra-worker-{n}",
        )
        for n in range(count)
    ]
    for worker in workers:
        worker.start()
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    _log.info("serving with %d worker processes on %s", count, config.listen)
    _print_banner(config, int(config.listen.rsplit(":", 1)[-1]))
    for worker in workers:
        worker.join()
    failed = [w.name for w in workers if w.exitcode != 0]
    if failed and not stopping:
        _log.error("worker processes exited early: %s", ", ".join(failed))
    return 1 if failed else 0


def _worker_config(config: Config, index: int) -> Config:
    """Worker `index` serves its metrics on the configured port + index."""
    if not config.metrics_listen:
        return config
    host, _, port = config.metrics_listen.rpartition(":")
    return config.with_changes(metrics_listen=f"{host}:{int(port) + index}")


def _worker_main(config: Config, parent: int) -> None:
    """One of `serve --workers N`'s processes."""
    _end_with_parent(parent)
    configure_logging(config.log_format, config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM
    sys.exit(run_loop(config, _run_server(config)))


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _end_with_parent(parent: int) -> None:
    """Asks Linux for SIGTERM (a graceful stop) when the parent dies, even by SIGKILL.

    A parent that died before the request was made sends nothing; this process has been
    handed to another parent by then, which `getppid` shows.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent:
        sys.exit("the serve process that started this worker is gone")


async def _run_server(config: Config) -> int:
    service = Service(config, Database.connect(config), tracing=tracing.from_environment())
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # A worker of `--workers N` leaves SIGINT to its parent, which forwards SIGTERM.
    for sig in (signal.SIGTERM,) if config.reuse_port else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not config.reuse_port:
        _print_banner(config, service.port)
    await stop.wait()
    _log.info("shutting down (grace %.1fs)", config.grace_seconds)
    await service.stop()
    _log.info("stopped")
    return 0


def _print_banner(config: Config, port: int) -> None:
    print(
        f"umbra-grpc serving on {config.listen} (port {port})\n"
        f"  mint a token:  umbra-grpc token --user 1   (or --admin)\n"
        f"  try it:        grpcurl {_grpcurl_flags(config)} {_client_target(config)} list",
        flush=True,
    )


def _migrate(config: Config, args: argparse.Namespace) -> int:
    with _database(config) as ready:
        assert ready.database_url is not None
        migrate.upgrade(ready.database_url)
    print("migrated to head")
    return 0


def _prune(config: Config, args: argparse.Namespace) -> int:
    with _database(config) as ready:
        report = asyncio.run(_prune_once(ready))
    if report is None:
        print("skipped: another process is pruning (it holds the retention lock)")
    else:
        print("pruned: " + ", ".join(f"{rule}={count}" for rule, count in report.items()))
    return 0


async def _prune_once(config: Config) -> Report | None:
    db = Database.connect(config)
    try:
        return await Retention(db, RetentionPolicy.from_config(config)).prune()
    finally:
        await db.dispose()


def _token(config: Config, args: argparse.Namespace) -> int:
    if args.admin:
        print(_mint(config, "umbra-cli", scopes=[ADMIN_SCOPE], ttl_seconds=args.ttl))
    else:
        print(_mint(config, str(args.user), ttl_seconds=args.ttl))
    return 0


def _mint(config: Config, subject: str, *, scopes: Sequence[str] = (), ttl_seconds: float) -> str:
    """A token this configuration's server accepts: its HS256 secret, `iss` and `aud`."""
    if config.jwt_secret:
        secret = config.jwt_secret
    elif config.jwt_public_key_files or config.jwt_jwks_file:
        raise CommandError(
            "cannot mint tokens: the server verifies tokens with public keys only "
            "(UMBRA_JWT_PUBLIC_KEY_FILES / UMBRA_JWT_JWKS_FILE), and signing needs the private "
            "key. Get tokens from the identity provider that holds it, or also set "
            "UMBRA_JWT_SECRET (for the server and this command)."
        )
    else:
        secret = dev_jwt_secret(config.data_dir)
    try:
        return mint_token(
            secret,
            subject=subject,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None


def _client_target(config: Config) -> str:
    """Where a client on this machine reaches the server (a wildcard host means loopback)."""
    host, _, port = config.listen.rpartition(":")
    loopback = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}  # noqa: S104 - compared, not bound
    return f"{loopback.get(host, host)}:{port}"


def _grpcurl_flags(config: Config) -> str:
    if config.tls_cert_file is None:
        return "-plaintext"
    flags = f"-cacert {config.tls_cert_file}"
    if config.tls_client_ca_file is not None:
        flags += " -cert CLIENT.crt -key CLIENT.key"
    return flags


def _demo_channel(config: Config) -> grpc.aio.Channel:
    """A channel to the configured server: plaintext, or TLS trusting its own certificate."""
    target = _client_target(config)
    if config.tls_cert_file is None:
        return grpc.aio.insecure_channel(target)
    if config.tls_client_ca_file is not None:
        raise CommandError(
            "the server requires client certificates (UMBRA_TLS_CLIENT_CA_FILE) and demo has "
            "none: create the demo users with an mTLS client of your own (grpcurl -cert/-key), "
            "or run demo against a server without UMBRA_TLS_CLIENT_CA_FILE"
        )
    credentials = grpc.ssl_channel_credentials(root_certificates=config.tls_cert_file.read_bytes())
    return grpc.aio.secure_channel(target, credentials)


def _demo(config: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_create_demo_users(config))


async def _create_demo_users(config: Config) -> int:
    admin = _mint(config, "umbra-demo", scopes=[ADMIN_SCOPE], ttl_seconds=300)
    metadata = (("authorization", f"Bearer {admin}"),)
    async with _demo_channel(config) as channel:
        stub = accounts_pb2_grpc.AccountServiceStub(channel)
        try:
            for user_id, handle, name in DEMO_USERS:
                user = accounts_pb2.User(id=user_id, umbral_name=handle, is_active=True)
                user.profile.email = f"{handle}@example.org"
                await stub.UpsertUser(
                    accounts_pb2.UpsertUserRequest(user=user),
                    metadata=metadata,
                    timeout=DEMO_CALL_SECONDS,
                )
                settings = accounts_pb2.Settings(accept_connections=True, preferred_name=name)
                settings.sharing_defaults.email = True
                await stub.UpdateSettings(
                    accounts_pb2.UpdateSettingsRequest(
                        user_id=user_id,
                        settings=settings,
                        update_mask=field_mask_pb2.FieldMask(
                            paths=["accept_connections", "preferred_name", "sharing_defaults"]
                        ),
                    ),
                    metadata=metadata,
                    timeout=DEMO_CALL_SECONDS,
                )
        except grpc.aio.AioRpcError as error:
            raise CommandError(
                f"could not create the demo users on {_client_target(config)}: "
                f"{error.code().name}: {error.details()} (is `umbra-grpc serve` running there "
                f"with the same UMBRA_* settings?)"
            ) from None
    tokens = {
        handle: _mint(config, str(user_id), ttl_seconds=24 * 3600)
        for user_id, handle, _ in DEMO_USERS
    }
    service = "umbra.connections.v1.ConnectionService"
    grpcurl = f"grpcurl {_grpcurl_flags(config)}"
    target = _client_target(config)
    print("Demo users (tokens valid for 24 hours):")
    for handle, token in tokens.items():
        print(f"  export {handle.upper()}={token}")
    print(
        "\nTry:\n"
        f'  {grpcurl} -H "authorization: Bearer $ALICE" -d \'{{"umbral_name": "bob"}}\''
        f" {target} {service}/Search\n"
        f'  {grpcurl} -H "authorization: Bearer $ALICE" -d \'{{"umbral_name": "bob"}}\''
        f" {target} {service}/SendRequest\n"
        f'  {grpcurl} -H "authorization: Bearer $BOB"'
        f" {target} {service}/ListIncomingRequests\n"
        f'  {grpcurl} -H "authorization: Bearer $BOB" -d \'{{"request_id": 1,'
        f' "action": "ACTION_ACCEPT"}}\' {target} {service}/Respond\n'
        f'  {grpcurl} -H "authorization: Bearer $ALICE"'
        f" {target} {service}/ListConnections"
    )
    return 0
