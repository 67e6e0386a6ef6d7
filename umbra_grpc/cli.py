"""`umbra-grpc serve | migrate | prune | token | demo`.

With no UMBRA_DATABASE_URL, `serve` and `migrate` use a private PostgreSQL kept in
UMBRA_DATA_DIR (default `.umbra/`), and `serve`, `token` and `demo` share the development
JWT secret kept there unless UMBRA_JWT_SECRET is set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Sequence

import grpc
from google.protobuf import field_mask_pb2

from umbra_grpc import tracing
from umbra_grpc.config import Config, ConfigError
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


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `umbra-grpc` command."""
    args = _parser().parse_args(argv)
    try:
        config = Config.from_env()
    except ConfigError as error:
        sys.exit(f"configuration error: {error}")
    configure_logging(config.log_format, config.log_level)
    sys.exit(args.run(config, args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umbra-grpc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
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


def _secret(config: Config) -> str:
    return config.jwt_secret or dev_jwt_secret(config.data_dir)


def _serve(config: Config, args: argparse.Namespace) -> int:
    if not config.jwt_secret and not config.jwt_public_key_files and not config.jwt_jwks_file:
        config = config.with_changes(jwt_secret=dev_jwt_secret(config.data_dir))
        _log.warning("no UMBRA_JWT_SECRET: using the development secret in %s", config.data_dir)
    if args.workers < 1:
        sys.exit("--workers must be at least 1")
    try:
        tracing.exporters()  # a bad OTEL_* value stops us before anything starts
    except ConfigError as error:
        sys.exit(f"configuration error: {error}")
    if args.workers > 1 and config.listen.rsplit(":", 1)[-1] == "0":
        sys.exit("--workers needs a fixed port in UMBRA_LISTEN (port 0 would differ per process)")
    with _database(config) as ready:
        assert ready.database_url is not None
        migrate.upgrade(ready.database_url)
        if args.workers == 1:
            return run_loop(ready, _run_server(ready))
        return _run_workers(ready.with_changes(reuse_port=True), args.workers)


def _run_workers(config: Config, count: int) -> int:
    """N processes serving one port; SIGTERM/SIGINT reach all of them; 0 when all exit 0."""
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker_main, args=(_worker_config(config, n),), name=f"umbra-worker-{n}"
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


def _worker_main(config: Config) -> None:
    """One of `serve --workers N`'s processes."""
    configure_logging(config.log_format, config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM
    sys.exit(run_loop(config, _run_server(config)))


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
    return 0


def _print_banner(config: Config, port: int) -> None:
    print(
        f"umbra-grpc serving on {config.listen} (port {port})\n"
        f"  mint a token:  umbra-grpc token --user 1   (or --admin)\n"
        f"  try it:        grpcurl -plaintext {config.listen} list",
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
        token = mint_token(
            _secret(config),
            subject="umbra-cli",
            scopes=[ADMIN_SCOPE],
            ttl_seconds=args.ttl,
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
        )
    else:
        token = mint_token(
            _secret(config),
            subject=str(args.user),
            ttl_seconds=args.ttl,
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
        )
    print(token)
    return 0


def _demo(config: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_create_demo_users(config))


async def _create_demo_users(config: Config) -> int:
    secret = _secret(config)
    admin = mint_token(secret, subject="umbra-demo", scopes=[ADMIN_SCOPE], ttl_seconds=300)
    metadata = (("authorization", f"Bearer {admin}"),)
    async with grpc.aio.insecure_channel(config.listen) as channel:
        stub = accounts_pb2_grpc.AccountServiceStub(channel)
        for user_id, handle, name in DEMO_USERS:
            user = accounts_pb2.User(id=user_id, umbral_name=handle, is_active=True)
            user.profile.email = f"{handle}@example.org"
            await stub.UpsertUser(accounts_pb2.UpsertUserRequest(user=user), metadata=metadata)
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
            )
    tokens = {
        handle: mint_token(secret, subject=str(user_id), ttl_seconds=24 * 3600)
        for user_id, handle, _ in DEMO_USERS
    }
    service = "umbra.connections.v1.ConnectionService"
    print("Demo users (tokens valid for 24 hours):")
    for handle, token in tokens.items():
        print(f"  export {handle.upper()}={token}")
    print(
        "\nTry:\n"
        f'  grpcurl -plaintext -H "authorization: Bearer $ALICE" -d \'{{"umbral_name": "bob"}}\''
        f" {config.listen} {service}/Search\n"
        f'  grpcurl -plaintext -H "authorization: Bearer $ALICE" -d \'{{"umbral_name": "bob"}}\''
        f" {config.listen} {service}/SendRequest\n"
        f'  grpcurl -plaintext -H "authorization: Bearer $BOB"'
        f" {config.listen} {service}/ListIncomingRequests\n"
        f'  grpcurl -plaintext -H "authorization: Bearer $BOB" -d \'{{"request_id": 1,'
        f' "action": "ACTION_ACCEPT"}}\' {config.listen} {service}/Respond\n'
        f'  grpcurl -plaintext -H "authorization: Bearer $ALICE"'
        f" {config.listen} {service}/ListConnections"
    )
    return 0
