"""`python -m bench.server`: the product server plus the bench-only RPCs.

Configured like `umbra-grpc serve` from `UMBRA_*` variables (the bench sets
UMBRA_DATABASE_URL to its private, already migrated PostgreSQL, turns rate limits off and
timing floors off or on, and picks the event loop with UMBRA_EVENT_LOOP). Builds exactly what
the CLI builds, `Service(config, db)`, with the echo and statement-count handlers added
through `extra_servicers`, so they sit behind the same interceptor chain, and runs it on the
loop `run_loop` picks, as `serve` does. Serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from bench.echo import add_generic_handler, echo_handler, statements_handler
from umbra_grpc.config import Config, ConfigError
from umbra_grpc.logs import configure_logging
from umbra_grpc.server import Service, run_loop
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
    try:
        config = Config.from_env()
    except ConfigError as error:
        sys.exit(f"configuration error: {error}")
    configure_logging(config.log_format, config.log_level)
    run_loop(config, serve(config))


if __name__ == "__main__":
    main()
