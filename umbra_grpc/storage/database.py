"""The connection pool, units of work, and the statement counter.

The service talks to PostgreSQL through asyncpg directly: SQLAlchemy describes the schema
(`tables`) and drives Alembic, but adds 150-250 µs of Python to every statement it runs
(bench/: its execute path was the largest single cost of every RPC), so it is not on the
request path.

Repositories take a `Conn` and run `Query` objects (SQL with `:named` parameters, turned
once into asyncpg's `$n` form); the service layer opens the unit of work:
- `Database.transaction(work)` runs `work` in BEGIN ... COMMIT, retrying a bounded number of
  times on serialization failures and deadlocks, rolling back on any error or cancellation.
  Every RPC's write goes through it, single statements too: a statement may wait on a row
  lock, and an RPC cancelled while it waits must roll back (SPEC 4.1). In autocommit it
  would not: the driver cancels a running statement through a connection of its own, and
  a lock released meanwhile lets the statement commit after the client gave up (seen in CI);
- `Database.read(work)` runs single-statement reads in autocommit, so a read costs exactly one
  statement on the wire (no BEGIN/COMMIT around it);
- `Database.enclosing(work)` is a transaction that every `transaction` started inside `work`
  (in the same task) joins instead of opening its own: their statements run on its
  connection, between its BEGIN and COMMIT, and its retries run all of them again. The
  idempotency keys use it to record an RPC's outcome in the transaction of its write. A
  joined unit of work that raises marks the connection `aborted`: the enclosing transaction
  must then roll back, as the joined one would have on its own;
- `Database.background()` lends a connection to work that is not an RPC's (probes, the
  outbox worker, the watch feed): autocommit, and never counted;
- `Database.session()` opens a connection of its own for background work that needs one
  PostgreSQL session throughout (the retention job and the expiry sweeper hold a
  session-level advisory lock across autocommit batches). It goes to the listener's URL,
  which bypasses a transaction pooler: through one, the lock and its unlock could land on
  different server connections and the lock would stay behind on a pooled one.

Driver errors that mean "the database is not there" become `StorageUnavailable`; the API edge
maps it to UNAVAILABLE. So does a write refused by a read-only node (SQLSTATE 25006: during a
failover, a connection that reached the old primary after it was demoted): that connection
is closed rather than returned, so the pool's next one goes to whichever node is primary now.
Every connection carries statement, lock and idle-in-transaction timeouts, so no RPC can hold
a lock or a connection forever (behind a transaction pooler, which refuses them as startup
parameters, they are the role's settings instead: deploy/README.md). Running into one of
them, or into a deadlock or serialization failure that outlasts the retries, is contention,
not a bug: it becomes `StorageBusy` (UNAVAILABLE `STORAGE_BUSY` at the edge, SPEC 10.8),
logged here at WARNING with its SQLSTATE and no traceback.

Behind a transaction pooler (PgBouncer `pool_mode = transaction`) a session's prepared
statements may be on another server connection next time: `UMBRA_DB_STATEMENT_CACHE_SIZE=0`
turns asyncpg's named, cached statements off, so every statement is parsed and run in one
message group on whatever server connection the pooler lends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, NoReturn, TypeAlias, TypeVar

import asyncpg

from umbra_grpc.config import Config

T = TypeVar("T")

_log = logging.getLogger(__name__)

# serialization_failure, deadlock_detected: safe to run the whole transaction again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
# What each busy SQLSTATE means, for the log: query_canceled is how statement_timeout ends a
# statement (and an administrator's pg_cancel_backend, which is just as retryable).
BUSY_SQLSTATES = {
    "57014": "statement timeout",
    "55P03": "lock timeout",
    "40001": "serialization failure",
    "40P01": "deadlock",
}
# connection failures, admin shutdown, cannot connect now, too many connections.
UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57P", "53300")
# read_only_sql_transaction: a write reached a node that is (now) a standby.
READ_ONLY_SQLSTATE = "25006"
TRANSACTION_ATTEMPTS = 3
# The connection is gone or never came: a socket error, a pool or connect timeout, a closed
# connection, or (seen when a backend is terminated under a pooled connection) asyncpg's
# protocol refusing to start a statement on a connection that is being torn down.
LOST_CONNECTION = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)
CLOSE_SECONDS = 5.0

Observer = Callable[[str], None]


class StorageUnavailable(Exception):
    """The database could not be reached or dropped the connection."""


class StorageBusy(StorageUnavailable):
    """The database did not finish in time: a lock or statement timeout, or a deadlock or
    serialization failure still there after the retries. Retrying later may work."""


# What work on the database may meet from the database itself, rather than from a bug.
DATABASE_ERRORS = (asyncpg.PostgresError, StorageUnavailable, *LOST_CONNECTION)


# A result row, an `asyncpg.Record` (untyped: asyncpg ships no stubs): by position or by name,
# `row["id"]`, a C lookup. An attribute-style wrapper cost 0.6 µs per field read, a quarter of
# a 50-row list's Python time. Rows never leave storage: repositories turn them into typed
# records (`record`), so the layers above read attributes that mypy checks.
Row: TypeAlias = Any
R = TypeVar("R")


def record(make: Callable[..., R], columns: Sequence[str]) -> Callable[[Row], R]:
    """A row -> record converter: `make(*values)`, the values of `columns` (two or more)
    read by name, in the record's field order; one C `itemgetter` call a row, no slower than
    reading the keys one by one, and blind to the order of the SELECT list."""
    if len(columns) < 2:
        raise ValueError("a record reads two columns or more")  # itemgetter(one) is no tuple
    values = operator.itemgetter(*columns)

    def convert(row: Row) -> R:
        return make(*values(row))

    return convert


_PARAMETER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Query:
    """SQL with `:name` parameters, in the `$n` form asyncpg sends, built once per statement.

    A name used twice is one parameter. `::type` casts are left alone.
    """

    __slots__ = ("names", "sql")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.sql = _PARAMETER.sub(number, sql)
        self.names = tuple(names)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The values in `$n` order (a missing name is a KeyError: a bug, not bad input)."""
        return [params[name] for name in self.names]


class Conn:
    """A pooled connection lent to one unit of work; every statement goes through it."""

    __slots__ = ("_observe", "aborted", "raw")

    def __init__(self, raw: Any, observe: Observer | None) -> None:
        self.raw = raw
        self._observe = observe
        self.aborted = False
        """A unit of work that joined this connection's enclosing transaction raised."""

    def seen(self, sql: str) -> None:
        """Tells the observer a statement is going out (the units of work call it for
        BEGIN and COMMIT, which asyncpg sends itself)."""
        if self._observe is not None:
            self._observe(sql)

    async def fetch(self, query: Query, **params: Any) -> list[Row]:
        """Every row."""
        self.seen(query.sql)
        rows: list[Row] = await self.raw.fetch(query.sql, *query.args(params))
        return rows

    async def fetchrow(self, query: Query, **params: Any) -> Row | None:
        """The first row, or None."""
        self.seen(query.sql)
        row: Row | None = await self.raw.fetchrow(query.sql, *query.args(params))
        return row

    async def fetchval(self, query: Query, **params: Any) -> Any:
        """The first column of the first row, or None."""
        self.seen(query.sql)
        return await self.raw.fetchval(query.sql, *query.args(params))

    async def execute(self, query: Query, **params: Any) -> int:
        """Runs a statement; returns how many rows it changed (0 for other statements)."""
        self.seen(query.sql)
        status: str = await self.raw.execute(query.sql, *query.args(params))
        count = status.rpartition(" ")[2]
        return int(count) if count.isdigit() else 0


Work = Callable[[Conn], Awaitable[T]]
ConstraintErrors = Mapping[str, Callable[[], Exception]]

# The connection of the `Database.enclosing` transaction the current task runs in, if any.
_enclosing: ContextVar[Conn | None] = ContextVar("umbra_enclosing_transaction", default=None)


class StatementCounter:
    """Counts statements sent on the wire, BEGIN and COMMIT/ROLLBACK included.

    Statements on background connections (health probes, workers) are not counted unless
    `background` is set, so a test can read how many statements one RPC sent.
    """

    def __init__(self, *, background: bool = False) -> None:
        self.count = 0
        self.statements: list[str] = []
        self._background = background

    def attach(self, db: Database) -> None:
        """Counts what `db`'s units of work (and background work, if asked) send from now on."""
        db.observe(self._record, background=self._background)

    def reset(self) -> None:
        """Starts counting from zero."""
        self.count = 0
        self.statements.clear()

    def _record(self, statement: str) -> None:
        self.count += 1
        self.statements.append(statement)


def sqlstate(error: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind a driver error, if any."""
    code = getattr(error, "sqlstate", None)
    return code if isinstance(code, str) else None


def constraint_name(error: BaseException) -> str | None:
    """The constraint a unique/check/foreign-key violation names, if any."""
    name = getattr(error, "constraint_name", None)
    return name if isinstance(name, str) else None


async def _json_codecs(connection: Any) -> None:
    """json and jsonb come back as Python objects and go in as JSON text (`json.dumps`)."""
    for name in ("json", "jsonb"):
        await connection.set_type_codec(
            name, schema="pg_catalog", encoder=_json_text, decoder=json.loads
        )


def _json_text(value: str) -> str:
    if not isinstance(value, str):  # a dict here would be a bug: callers pass JSON text
        raise TypeError("json parameters are passed as JSON text")
    return value


async def _keep_session(connection: Any) -> None:
    """Nothing to reset when a connection goes back to the pool.

    asyncpg's default reset sends `RESET ALL; UNLISTEN *; ...` on every release: a round
    trip per unit of work for state this service never sets (the pool still rolls back a
    transaction left open). LISTEN happens on the listener's own connection.
    """


class Database:
    """The connection pool and the kinds of unit of work."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int,
        acquire_timeout: float,
        session_dsn: str | None = None,
        **connect: Any,
    ):
        self._dsn = dsn
        self._session_dsn = session_dsn or dsn
        self._pool_size = pool_size
        self._acquire_timeout = acquire_timeout
        self._connect = connect
        self._pool: Any = None
        self._opening = asyncio.Lock()
        self._observers: list[Observer] = []
        self._traceparent: Callable[[], str | None] | None = None
        self._background_observers: list[Observer] = []

    @classmethod
    def connect(cls, config: Config) -> Database:
        """Builds the pool from the configuration (connects lazily)."""
        if config.database_url is None or config.listener_url is None:
            raise ValueError("no database URL configured")
        return cls(
            plain_url(config.database_url),
            session_dsn=plain_url(config.listener_url),
            pool_size=config.db_pool_size,
            acquire_timeout=config.db_pool_timeout_seconds,
            timeout=config.db_pool_timeout_seconds,
            statement_cache_size=config.db_statement_cache_size,
            server_settings={
                "application_name": "umbra-grpc",
                "statement_timeout": str(config.db_statement_timeout_ms),
                "lock_timeout": str(config.db_lock_timeout_ms),
                "idle_in_transaction_session_timeout": str(
                    config.db_idle_in_transaction_timeout_ms
                ),
            },
        )

    def tag_transactions(self, traceparent: Callable[[], str | None]) -> None:
        """Calls `traceparent()` as every transaction begins; what it returns becomes the
        transaction's `umbra.traceparent`, which outbox rows written there keep (migration
        0005). Set only while tracing: it costs a statement per traced transaction."""
        self._traceparent = traceparent

    def observe(self, observer: Observer, *, background: bool = False) -> None:
        """Calls `observer(sql)` for every statement a unit of work sends (and background
        work, when `background` is set)."""
        self._observers.append(observer)
        if background:
            self._background_observers.append(observer)

    @staticmethod
    def _fan_out(observers: list[Observer]) -> Observer | None:
        """One observer calling all of `observers` (None when there are none: no cost)."""
        if not observers:
            return None

        def observe(sql: str) -> None:
            for observer in observers:
                observer(sql)

        return observe

    def checked_out(self) -> int:
        """Pooled connections in use right now."""
        pool = self._pool
        if pool is None:
            return 0
        return int(pool.get_size() - pool.get_idle_size())

    async def _opened(self) -> Any:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._pool_size,
                        init=_json_codecs,
                        reset=_keep_session,
                        **self._connect,
                    )
        return self._pool

    async def transaction(
        self, work: Work[T], *, constraint_errors: Mapping[str, Callable[[], Exception]] = {}
    ) -> T:
        """Runs `work` in one transaction (BEGIN ... COMMIT), for several statements.

        Retried on serialization failures and deadlocks; a violation of a constraint named in
        `constraint_errors` raises that domain error. Inside `enclosing`, `work` joins the
        enclosing transaction instead (which retries it, with everything else it holds).
        """
        joined = _enclosing.get()
        if joined is not None:
            try:
                return await _mapped(work, joined, constraint_errors)
            except BaseException:
                joined.aborted = True
                raise
        return await self._attempts(
            _in_transaction(lambda conn: _mapped(work, conn, constraint_errors), self._traceparent)
        )

    async def enclosing(self, work: Work[T]) -> T:
        """Runs `work` in one transaction that every `transaction` inside it joins."""

        async def with_joiners(conn: Conn) -> T:
            token = _enclosing.set(conn)
            try:
                return await work(conn)
            finally:
                _enclosing.reset(token)

        return await self._attempts(_in_transaction(with_joiners, self._traceparent))

    async def read(self, work: Work[T]) -> T:
        """Runs `work` in autocommit: for single-statement reads."""
        return await self._attempts(work)

    async def _attempts(self, work: Work[T]) -> T:
        observe = self._fan_out(self._observers)
        for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
            try:
                async with self._lent() as raw:
                    return await work(Conn(raw, observe))
            except asyncpg.PostgresError as error:
                if sqlstate(error) in RETRYABLE_SQLSTATES and attempt < TRANSACTION_ATTEMPTS:
                    _log.info("transaction retried", extra={"sqlstate": sqlstate(error)})
                    await asyncio.sleep(0.005 * attempt)
                    continue
                _reraise(error)
            except LOST_CONNECTION as error:
                raise StorageUnavailable(type(error).__name__) from error
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def _lent(self) -> AsyncIterator[Any]:
        """A pooled connection; one that turned out to reach a standby is closed, not kept."""
        pool = await self._opened()
        async with pool.acquire(timeout=self._acquire_timeout) as raw:
            try:
                yield raw
            except asyncpg.PostgresError as error:
                if sqlstate(error) == READ_ONLY_SQLSTATE:
                    raw.terminate()  # the pool's next connection goes to the primary
                raise

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[Conn]:
        """An autocommit connection for work that is not an RPC's: never counted."""
        observe = self._fan_out(self._background_observers)
        async with self._lent() as raw:
            yield Conn(raw, observe)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Conn]:
        """A connection of its own, straight to PostgreSQL (the listener's URL), for
        background work that needs one session throughout; closed afterwards."""
        raw = await asyncpg.connect(self._session_dsn, **self._connect)
        try:
            await _json_codecs(raw)
            yield Conn(raw, self._fan_out(self._background_observers))
        finally:
            if not raw.is_closed():  # `retention.exclusive` terminates it on failure
                await raw.close()

    async def notify(self, channel: str, payload: str) -> None:
        """Sends a NOTIFY the way the writers' transactions do: through the pool."""
        async with self.background() as conn:
            await conn.raw.execute("SELECT pg_notify($1, $2)", channel, payload)

    async def ping(self) -> bool:
        """Whether the database answers."""
        try:
            async with self.background() as conn:
                await conn.raw.execute("SELECT 1")
        except (StorageUnavailable, asyncpg.PostgresError, *LOST_CONNECTION):
            return False
        return True

    async def dispose(self) -> None:
        """Closes every pooled connection (those still lent out are cut after a while)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                await pool.close()
        except TimeoutError:
            pool.terminate()


_TAG = Query("SELECT set_config('umbra.traceparent', :traceparent, true)")


def _in_transaction(work: Work[T], traceparent: Callable[[], str | None] | None = None) -> Work[T]:
    """`work` between BEGIN and COMMIT (ROLLBACK when it raises or is cancelled), the
    transaction tagged with `traceparent()` when that gives one."""

    async def in_transaction(conn: Conn) -> T:
        conn.seen("BEGIN")
        async with conn.raw.transaction():
            try:
                tag = traceparent() if traceparent is not None else None
                if tag is not None:
                    await conn.fetchval(_TAG, traceparent=tag)
                result = await work(conn)
            except BaseException:
                conn.seen("ROLLBACK")
                raise
            conn.seen("COMMIT")
        return result

    return in_transaction


async def _mapped(work: Work[T], conn: Conn, constraint_errors: ConstraintErrors) -> T:
    """`work(conn)`, with a violation of a constraint named in `constraint_errors` raised as
    that domain error."""
    try:
        return await work(conn)
    except asyncpg.IntegrityConstraintViolationError as error:
        factory = constraint_errors.get(constraint_name(error) or "")
        if factory is None:
            raise
        raise factory() from error


def async_url(url: str) -> str:
    """`postgresql://` (as configured) to the `postgresql+asyncpg://` SQLAlchemy needs."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError("not a postgresql:// URL")


def plain_url(url: str) -> str:
    """The `postgresql://` URL asyncpg itself takes (no SQLAlchemy driver suffix)."""
    return "postgresql://" + async_url(url).removeprefix("postgresql+asyncpg://")


def _reraise(error: asyncpg.PostgresError) -> NoReturn:
    """Raises `StorageUnavailable` for lost or refused connections and for writes refused by
    a read-only node, `StorageBusy` for contention, else the error itself."""
    state = sqlstate(error) or ""
    if state.startswith(UNAVAILABLE_SQLSTATE_PREFIXES) or state == READ_ONLY_SQLSTATE:
        raise StorageUnavailable(state) from error
    if state in BUSY_SQLSTATES:
        _log.warning("database busy: %s", BUSY_SQLSTATES[state], extra={"sqlstate": state})
        raise StorageBusy(state) from error
    raise error
