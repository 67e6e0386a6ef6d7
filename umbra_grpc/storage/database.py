"""The engine, units of work, and the statement counter.

Repositories take an `AsyncConnection`; the service layer opens the unit of work:
- `Database.transaction(work)` runs `work` in BEGIN ... COMMIT, retrying a bounded number of
  times on serialization failures and deadlocks, rolling back on any error or cancellation;
- `Database.statement(work)` runs a write that is one statement (data-modifying CTEs) in
  autocommit: the statement is its own transaction, one round trip instead of three;
- `Database.read(work)` runs single-statement reads in autocommit, so a read costs exactly one
  statement on the wire (no BEGIN/COMMIT around it);
- `Database.background()` lends an autocommit connection to work that is not an RPC's (health
  probes, the outbox worker, the request feed): each of their statements stands alone, so each
  is one round trip, and the statement counter leaves them out.

Driver errors that mean "the database is not there" become `StorageUnavailable`; the API edge
maps it to UNAVAILABLE. Every connection carries statement, lock and idle-in-transaction
timeouts, so no RPC can hold a lock or a connection forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NoReturn, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from umbra_grpc.config import Config

T = TypeVar("T")
Work = Callable[[AsyncConnection], Awaitable[T]]

_log = logging.getLogger(__name__)

# serialization_failure, deadlock_detected: safe to run the whole transaction again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
# connection failures, admin shutdown, cannot connect now, too many connections.
UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57P", "53300")
TRANSACTION_ATTEMPTS = 3
BACKGROUND = "umbra_background"


class StorageUnavailable(Exception):
    """The database could not be reached or dropped the connection."""


def async_url(url: str) -> str:
    """`postgresql://` (as configured) to the `postgresql+asyncpg://` SQLAlchemy needs."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError("not a postgresql:// URL")


def plain_url(url: str) -> str:
    """The `postgresql://` URL asyncpg itself takes (no SQLAlchemy driver suffix)."""
    return "postgresql://" + async_url(url).removeprefix("postgresql+asyncpg://")


def sqlstate(error: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind a SQLAlchemy or asyncpg error, if any."""
    orig = getattr(error, "orig", error)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def constraint_name(error: BaseException) -> str | None:
    """The constraint a unique/check/foreign-key violation names, if any."""
    orig = getattr(error, "orig", error)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        name = getattr(candidate, "constraint_name", None)
        if isinstance(name, str):
            return name
    return None


class StatementCounter:
    """Counts statements sent on the wire, BEGIN and COMMIT/ROLLBACK included.

    Statements on connections marked background (health probes, workers) are not counted
    unless `background` is set, so a test can read how many statements one RPC sent.
    """

    def __init__(self, *, background: bool = False) -> None:
        self.count = 0
        self.statements: list[str] = []
        self._background = background

    def attach(self, engine: AsyncEngine) -> None:
        """Listens on the engine's events."""
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "before_cursor_execute", self._on_execute)
        for name in ("begin", "commit", "rollback"):
            event.listen(sync_engine, name, self._transaction_event(name.upper()))

    def reset(self) -> None:
        """Starts counting from zero."""
        self.count = 0
        self.statements.clear()

    def _record(self, conn: Connection, statement: str) -> None:
        if conn.get_execution_options().get(BACKGROUND) and not self._background:
            return
        self.count += 1
        self.statements.append(statement)

    def _on_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        self._record(conn, statement)

    def _transaction_event(self, name: str) -> Callable[[Connection], None]:
        def on_event(conn: Connection) -> None:
            # Read the option, never the server: asking would be a statement of its own.
            if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                self._record(conn, name)

        return on_event


class Database:
    """The connection pool and the units of work."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    @classmethod
    def connect(cls, config: Config) -> Database:
        """Builds the pool from the configuration (connects lazily)."""
        if config.database_url is None:
            raise ValueError("no database URL configured")
        engine = create_async_engine(
            async_url(config.database_url),
            pool_size=config.db_pool_size,
            max_overflow=0,
            pool_timeout=config.db_pool_timeout_seconds,
            pool_pre_ping=False,
            connect_args={
                "timeout": config.db_pool_timeout_seconds,
                "server_settings": {
                    "application_name": "umbra-grpc",
                    "statement_timeout": str(config.db_statement_timeout_ms),
                    "lock_timeout": str(config.db_lock_timeout_ms),
                    "idle_in_transaction_session_timeout": str(
                        config.db_idle_in_transaction_timeout_ms
                    ),
                },
            },
        )
        return cls(engine)

    async def transaction(
        self, work: Work[T], *, constraint_errors: Mapping[str, Callable[[], Exception]] = {}
    ) -> T:
        """Runs `work` in one transaction (BEGIN ... COMMIT), for several statements.

        Retried on serialization failures and deadlocks; a violation of a constraint named in
        `constraint_errors` raises that domain error.
        """
        return await self._attempts(self.engine.begin, work, constraint_errors)

    async def statement(
        self, work: Work[T], *, constraint_errors: Mapping[str, Callable[[], Exception]] = {}
    ) -> T:
        """Runs a write that is ONE statement, in autocommit: one round trip, no BEGIN/COMMIT.

        A single statement is its own transaction: all its data-modifying CTEs commit
        together or not at all, deferred constraints are checked at its end, and its NOTIFYs
        go out when it commits. Constraint errors and retries as in `transaction`.
        """
        return await self._attempts(self._autocommit.connect, work, constraint_errors)

    async def _attempts(
        self,
        connect: Callable[[], contextlib.AbstractAsyncContextManager[AsyncConnection]],
        work: Work[T],
        constraint_errors: Mapping[str, Callable[[], Exception]],
    ) -> T:
        for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
            try:
                async with connect() as conn:
                    return await work(conn)
            except IntegrityError as error:
                factory = constraint_errors.get(constraint_name(error) or "")
                if factory is None:
                    raise
                raise factory() from error
            except DBAPIError as error:
                if sqlstate(error) in RETRYABLE_SQLSTATES and attempt < TRANSACTION_ATTEMPTS:
                    _log.info("transaction retried", extra={"sqlstate": sqlstate(error)})
                    await asyncio.sleep(0.005 * attempt)
                    continue
                _reraise(error)
            except (PoolTimeoutError, OSError) as error:
                raise StorageUnavailable(type(error).__name__) from error
        raise AssertionError("unreachable")  # pragma: no cover

    async def read(self, work: Work[T]) -> T:
        """Runs `work` in autocommit: for single-statement reads."""
        return await self._attempts(self._autocommit.connect, work, {})

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[AsyncConnection]:
        """An autocommit connection for work that is not an RPC's (probes, workers).

        Every statement on it is its own transaction; the statement counter skips it.
        """
        async with self._autocommit.connect() as conn:
            yield await conn.execution_options(**{BACKGROUND: True})

    async def ping(self) -> bool:
        """Whether the database answers."""
        try:
            async with self.background() as conn:
                await conn.execute(text("SELECT 1"))
        except (DBAPIError, PoolTimeoutError, OSError):
            return False
        return True

    async def dispose(self) -> None:
        """Closes every pooled connection."""
        await self.engine.dispose()


def _reraise(error: DBAPIError) -> NoReturn:
    """Raises `StorageUnavailable` for lost or refused connections, else the error itself."""
    state = sqlstate(error) or ""
    lost = isinstance(error, InterfaceError | OperationalError) and not state
    if lost or state.startswith(UNAVAILABLE_SQLSTATE_PREFIXES):
        raise StorageUnavailable(state or type(error.orig).__name__) from error
    raise error
