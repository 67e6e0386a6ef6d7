"""Composition root: builds the server. The ONE place the interceptor order is written down.

Outermost first: access log (and error hygiene) -> tracing (only when on) -> anonymous
stream cap -> concurrency cap -> auth -> rate limit -> timing floor -> servicer. Health and
reflection are registered beside the two services and need no token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import logging
import secrets
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from umbra_grpc import reflection
from umbra_grpc.api.accounts import AccountServicer
from umbra_grpc.api.connections import ConnectionServicer
from umbra_grpc.api.status import map_errors
from umbra_grpc.config import Config
from umbra_grpc.destinations import Destinations, Resolver, system_resolver
from umbra_grpc.domain.accounts import Accounts
from umbra_grpc.domain.callers import ActiveUsers
from umbra_grpc.domain.connections import Connections
from umbra_grpc.domain.expiry import ExpirySweeper
from umbra_grpc.domain.feed import RequestFeed
from umbra_grpc.domain.idempotency import IdempotentWrites
from umbra_grpc.domain.notifications import Notifications
from umbra_grpc.domain.pages import PageTokens
from umbra_grpc.domain.relationships import Relationships
from umbra_grpc.domain.requests import Requests
from umbra_grpc.domain.retention import Retention, RetentionPolicy
from umbra_grpc.domain.watch import Watching
from umbra_grpc.interceptors.access_log import AccessLogInterceptor
from umbra_grpc.interceptors.anonymous_streams import AnonymousStreamLimit
from umbra_grpc.interceptors.auth import PUBLIC_METHOD_PREFIXES, AuthInterceptor
from umbra_grpc.interceptors.concurrency import ConcurrencyLimitInterceptor
from umbra_grpc.interceptors.rate_limit import RateLimitInterceptor, parse_rate_limits
from umbra_grpc.interceptors.timing_floor import TimingFloorInterceptor, parse_timing_floors
from umbra_grpc.metrics import Metrics
from umbra_grpc.outbox.worker import OutboxWorker
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2, connections_pb2_grpc
from umbra_grpc.peer import parse_networks
from umbra_grpc.storage import migrate
from umbra_grpc.storage.database import Database, StorageUnavailable, plain_url
from umbra_grpc.storage.listener import Listener
from umbra_grpc.storage.notify import (
    OUTBOX_CHANNEL,
    REQUESTS_CHANNEL,
    USERS_CHANNEL,
    parse_user_changed,
)
from umbra_grpc.tasks import cancel_and_wait, report_stall
from umbra_grpc.tokens import TokenVerifier

if TYPE_CHECKING:
    from umbra_grpc.telemetry import Tracing

_log = logging.getLogger(__name__)

CONNECTION_SERVICE = connections_pb2.DESCRIPTOR.services_by_name["ConnectionService"].full_name
ACCOUNT_SERVICE = accounts_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name
SERVICE_NAMES = (CONNECTION_SERVICE, ACCOUNT_SERVICE)
HEALTH_PROBE_SECONDS = 1.0
# A stop still going this long after its grace logs where it waits (`tasks.report_stall`).
STALL_MARGIN_SECONDS = 5.0


T = TypeVar("T")


def run_loop(config: Config, main: Coroutine[Any, Any, T]) -> T:
    """Runs `main` on the event loop UMBRA_EVENT_LOOP names: asyncio's (the default) or uvloop.

    bench/ measured less server CPU per call on uvloop for most RPCs (docs/PERFORMANCE.md),
    but one CI run saw `serve` on uvloop fail to exit after SIGTERM with 100 open streams
    (not reproduced since): it stays opt-in until that is understood.
    """
    factory = uvloop.new_event_loop if config.event_loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def server_options(config: Config) -> list[tuple[str, int]]:
    """Channel arguments set on purpose (SPEC 4.1); each one has a test."""
    return [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        # A second server on a taken port must fail loudly, not share the port; only the
        # processes of one `serve --workers N` share theirs.
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        # Keepalive enforcement: clients may ping every 10 s at most, even without calls.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 2),
        # Connections are recycled so load balancers can rebalance long-lived clients.
        ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_seconds * 1000)),
        ("grpc.max_connection_idle_ms", 15 * 60 * 1000),
    ]


def page_token_key(config: Config) -> bytes:
    """The page-token HMAC key: configured, else derived from the JWT secret, else random.

    A random key works for one process only: replicas must share UMBRA_PAGE_TOKEN_SECRET
    (or an HS256 UMBRA_JWT_SECRET) so that a page token made by one is accepted by another.
    """
    if config.page_token_secret:
        return config.page_token_secret.encode()
    if config.jwt_secret:
        return hmac.new(config.jwt_secret.encode(), b"umbra page tokens", "sha256").digest()
    _log.warning("no UMBRA_PAGE_TOKEN_SECRET: page tokens are valid in this process only")
    return secrets.token_bytes(32)


class Service:
    """A built server with what it owns: start it, then stop it once."""

    def __init__(
        self,
        config: Config,
        db: Database,
        *,
        extra_servicers: Iterable[tuple[object, object]] = (),
        resolver: Resolver = system_resolver,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.tracing = tracing
        # Where pushes may go (SPEC 10.4): judged when a URL is saved and when it is used.
        destinations = Destinations(parse_networks(config.ntfy_allowed_networks), resolver)
        self.active_users = ActiveUsers(db, config.user_cache_seconds)
        self.health = health.aio.HealthServicer()
        self.metrics = Metrics()
        trusted = parse_networks(config.trusted_proxies)
        rate_limit = RateLimitInterceptor(parse_rate_limits(config.rate_limits))
        timing_floor = TimingFloorInterceptor(parse_timing_floors(config.timing_floors))
        self.anonymous_streams = AnonymousStreamLimit(
            config.max_anonymous_streams, PUBLIC_METHOD_PREFIXES
        )
        self.server = grpc.aio.server(
            interceptors=[
                AccessLogInterceptor(trusted_proxies=trusted, sink=self.metrics.observe_rpc),
                # Right inside the access log: the span covers every layer further in, and
                # the access-log line gets its trace id. Absent when tracing is off.
                *([tracing.interceptor()] if tracing is not None else []),
                self.anonymous_streams,
                ConcurrencyLimitInterceptor(config.max_concurrent_rpcs),
                AuthInterceptor(
                    TokenVerifier.from_config(config),
                    self.active_users.is_active,
                    unavailable=(StorageUnavailable,),
                ),
                rate_limit,
                timing_floor,
            ],
            options=server_options(config),
            # grpc's own cap counts every call, streams included, and refuses without an
            # ErrorInfo: a backstop only. Unary calls are held to their cap by
            # ConcurrencyLimitInterceptor, watch streams to theirs by the feed, anonymous
            # streams to theirs by AnonymousStreamLimit; the room past all three (one more
            # unary cap's worth) is for calls being refused by them at that moment.
            maximum_concurrent_rpcs=2 * config.max_concurrent_rpcs
            + config.watch_max_streams
            + config.max_anonymous_streams,
        )
        accounts = Accounts(db, self.active_users.forget, destinations)
        pages = PageTokens(page_token_key(config))
        ttl = dt.timedelta(seconds=config.request_ttl_seconds)
        requests = Requests(
            db,
            pages,
            cap=config.pending_cap,
            window=dt.timedelta(seconds=config.pending_window_seconds),
            cooldown=dt.timedelta(seconds=config.resend_cooldown_seconds),
            ttl=ttl,
        )
        writes = IdempotentWrites(db)
        notifications = Notifications(db, pages)
        self.feed = RequestFeed(
            db,
            queue_size=config.watch_queue_size,
            max_per_user=config.watch_max_per_user,
            max_streams=config.watch_max_streams,
        )
        watching = Watching(
            db,
            self.feed,
            heartbeat=config.watch_heartbeat_seconds,
            write_timeout=config.watch_write_timeout_seconds,
            ttl=ttl,
        )
        # Domain errors and a lost database become statuses here, once for every RPC.
        accounts_pb2_grpc.add_AccountServiceServicer_to_server(
            map_errors(AccountServicer(accounts, writes)), self.server
        )
        connections_pb2_grpc.add_ConnectionServiceServicer_to_server(
            map_errors(
                ConnectionServicer(
                    requests,
                    Connections(db, pages),
                    notifications,
                    watching,
                    Relationships(db, pages, ttl=ttl),
                    writes,
                )
            ),
            self.server,
        )
        for add, servicer in extra_servicers:
            add(servicer, self.server)  # type: ignore[operator]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self._bind()
        self._monitor: asyncio.Task[None] | None = None

        assert config.listener_url is not None
        self.listener = Listener(
            plain_url(config.listener_url),
            notify=db.notify,
            probe_interval=config.listener_probe_seconds,
        )
        # Other replicas changed a user: drop what this one cached, and end the user's
        # streams if they were deactivated. After an outage events may have been missed,
        # so everything cached is dropped (and the streams end with the listener).
        self.listener.subscribe(USERS_CHANNEL, self._user_changed)
        self.listener.on_down(self.active_users.forget_all)
        self.listener.subscribe(REQUESTS_CHANNEL, self.feed.on_notify)
        self.listener.on_up(self.feed.on_up)
        self.listener.on_down(self.feed.on_down)
        if tracing is not None:
            # Outbox rows keep the writing RPC's trace, for the push span's link.
            db.tag_transactions(tracing.traceparent)
        self.outbox = OutboxWorker(
            db,
            config,
            destinations=destinations,
            push_span=tracing.push_span if tracing is not None else None,
        )
        self.listener.subscribe(OUTBOX_CHANNEL, lambda _payload: self.outbox.wake())
        # Wake-ups sent while the listener was down are lost: look for due rows on reconnect.
        self.listener.on_up(self.outbox.wake)
        self._outbox_backlog = 0
        self.serving = False
        self.retention = Retention(
            db, RetentionPolicy.from_config(config), interval=config.retention_interval_seconds
        )
        self.expiry = ExpirySweeper(db, ttl=ttl, interval=config.expiry_sweep_seconds)
        self._register_metrics(rate_limit, timing_floor)

    def _user_changed(self, payload: str) -> None:
        user_id = parse_user_changed(payload)
        self.active_users.forget(user_id)
        self.feed.on_user_changed(user_id)

    def _register_metrics(
        self, rate_limit: RateLimitInterceptor, timing_floor: TimingFloorInterceptor
    ) -> None:
        metrics, stats = self.metrics, self.outbox.stats
        metrics.gauge(
            "umbra_watch_streams",
            "Open WatchIncomingRequests streams.",
            lambda: self.feed.open_streams,
        )
        metrics.gauge(
            "umbra_anonymous_streams",
            "Open health Watch and reflection streams (no token).",
            lambda: self.anonymous_streams.open_streams,
        )
        metrics.gauge(
            "umbra_db_pool_checked_out", "Pooled connections in use.", self.db.checked_out
        )
        metrics.gauge(
            "umbra_db_pool_size", "Pooled connections allowed.", lambda: self.config.db_pool_size
        )
        # A readiness check for load balancers that cannot send a gRPC health request
        # (HAProxy's http-check cannot send its binary body): deploy/haproxy.cfg reads this.
        metrics.gauge(
            "umbra_serving",
            "1 while grpc.health.v1 says SERVING.",
            lambda: int(self.serving),
        )
        metrics.gauge(
            "umbra_listener_up",
            "1 while the LISTEN connection is up.",
            lambda: int(self.listener.connected),
        )
        metrics.gauge(
            "umbra_outbox_backlog",
            "Pending outbox rows (refreshed every second).",
            lambda: self._outbox_backlog,
        )
        metrics.counter(
            "umbra_outbox_sent", "Pushes delivered by this process.", lambda: stats.sent
        )
        metrics.counter(
            "umbra_outbox_skipped",
            "Pushes skipped (switched off) by this process.",
            lambda: stats.skipped,
        )
        metrics.counter(
            "umbra_outbox_failed", "Pushes dead-lettered by this process.", lambda: stats.failed
        )
        metrics.counter(
            "umbra_outbox_retried", "Push attempts retried by this process.", lambda: stats.retried
        )
        metrics.counter(
            "umbra_timing_floor_overruns",
            "Calls whose work outlasted their floor.",
            lambda: sum(timing_floor.overruns.values()),
        )
        metrics.counter(
            "umbra_rate_limited",
            "Calls refused by the rate limits.",
            lambda: sum(rate_limit.refusals.values()),
        )

    def _bind(self) -> int:
        config = self.config
        if config.tls_cert_file is None or config.tls_key_file is None:
            return self.server.add_insecure_port(config.listen)
        root = config.tls_client_ca_file.read_bytes() if config.tls_client_ca_file else None
        credentials = grpc.ssl_server_credentials(
            [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())],
            root_certificates=root,
            require_client_auth=root is not None,
        )
        return self.server.add_secure_port(config.listen, credentials)

    async def start(self) -> None:
        """Starts serving; once the database answers and is migrated, the push worker, the
        retention job and the expiry sweeper start and health turns SERVING."""
        await self._set_health(serving=False)
        if self.tracing is not None:
            self.tracing.start()
        await self.listener.start()
        await self.server.start()
        if self.config.metrics_listen:
            port = self.metrics.serve(self.config.metrics_listen)
            _log.info("metrics on %s (port %d)", self.config.metrics_listen, port)
        self._monitor = asyncio.create_task(self._watch_database(), name="health-monitor")

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop accepting, let in-flight calls finish within the grace.

        A stop that outlasts the grace by STALL_MARGIN_SECONDS logs every pending task's stack.
        """
        grace = self.config.grace_seconds if grace is None else grace
        watchdog = asyncio.create_task(
            report_stall(grace + STALL_MARGIN_SECONDS, "shutdown", _log), name="stop-watchdog"
        )
        try:
            await self._stop(grace)
        finally:
            watchdog.cancel()

    async def _stop(self, grace: float) -> None:
        self.serving = False
        await self.health.enter_graceful_shutdown()
        self.feed.shut_down()
        if self._monitor is not None:
            await cancel_and_wait(self._monitor)
        await self.server.stop(grace)
        await self.outbox.stop()
        await self.retention.stop()
        await self.expiry.stop()
        await self.listener.stop()
        self.metrics.stop()
        await self.db.dispose()
        if self.tracing is not None:
            self.tracing.shutdown()

    async def _watch_database(self) -> None:
        migrated = False
        said_why = False
        serving: bool | None = None
        while True:
            ok = await self.db.ping()
            if ok and not migrated:
                migrated = await self._is_migrated()
                if migrated:
                    # Started once their tables exist (UMBRA_MIGRATE=off may start us early).
                    if self.config.outbox_enabled:
                        await self.outbox.start()
                    self.retention.start()
                    self.expiry.start()
                if not migrated and not said_why:
                    said_why = True
                    _log.warning(
                        "the database schema is not at revision %s, which this code needs: "
                        "NOT_SERVING until `umbra-grpc migrate` has run",
                        migrate.head_revision(),
                    )
            now_serving = ok and migrated and self.listener.connected
            if ok:
                with contextlib.suppress(Exception):
                    self._outbox_backlog = await self.outbox.backlog()
            if now_serving != serving:
                serving = self.serving = now_serving
                _log.info("health %s", "SERVING" if serving else "NOT_SERVING")
                await self._set_health(serving=serving)
            await asyncio.sleep(HEALTH_PROBE_SECONDS)

    async def _is_migrated(self) -> bool:
        try:
            async with self.db.background() as conn:
                return await migrate.is_at_head(conn)
        except Exception:  # any failure means "not ready yet"
            _log.warning("migration state unreadable", exc_info=True)
            return False

    async def _set_health(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)
