"""`python -m bench.server [--uvloop]`: the product server plus the bench-only RPCs.

Configured like `umbra-grpc serve` from `UMBRA_*` variables (the bench sets
UMBRA_DATABASE_URL to its private, already migrated PostgreSQL, and turns rate limits off,
and timing floors off or on). Builds exactly what the CLI builds, `Service(config, db)`, with
the echo and statement-count handlers added through `extra_servicers`, so they sit behind
the same interceptor chain. Serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from bench.echo import add_generic_handler, echo_handler, statements_handler
from umbra_grpc.config import Config, ConfigError
from umbra_grpc.logs import configure_logging
from umbra_grpc.server import Service
from umbra_grpc.storage.database import Database, StatementCounter


async def serve(config: Config) -> None:
    """Runs the server until a stop signal."""
    db = Database.connect(config)
    counter = StatementCounter()
    counter.attach(db)
    service = Service(
        config,
        db,
        extra_servicers=[
            (add_generic_handler, echo_handler()),
            (add_generic_handler, statements_handler(counter)),
        ],
    )
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench server on port {service.port}", flush=True)
    await stop.wait()
    await service.stop(0.5)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop")
    args = parser.parse_args()
    try:
        config = Config.from_env()
    except ConfigError as error:
        sys.exit(f"configuration error: {error}")
    configure_logging(config.log_format, config.log_level)
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config))


if __name__ == "__main__":
    main()
