"""Frozen settings read once from `UMBRA_*` environment variables.

Every variable is listed in the README's configuration table; names are fixed there. A bad
value stops the process at start-up with a message naming the variable, never later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

_URL_PREFIXES = ("postgresql://", "postgres://", "postgresql+asyncpg://")


class ConfigError(ValueError):
    """An `UMBRA_*` variable holds a value the service cannot use."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the server needs, with the defaults of the README table."""

    database_url: str | None = None
    listen_database_url: str | None = None
    listen: str = "127.0.0.1:50051"
    metrics_listen: str | None = None
    data_dir: Path = Path(".umbra")
    jwt_secret: str | None = None
    jwt_public_key_files: tuple[Path, ...] = ()
    jwt_jwks_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = 10.0
    page_token_secret: str | None = None
    rate_limits: str = "default"
    timing_floors: str = "default"
    trusted_proxies: tuple[str, ...] = ()
    log_format: str = "json"
    log_level: str = "INFO"
    event_loop: str = "asyncio"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    db_pool_size: int = 10
    db_statement_cache_size: int = 100
    db_pool_timeout_seconds: float = 5.0
    db_statement_timeout_ms: int = 5000
    db_lock_timeout_ms: int = 2000
    db_idle_in_transaction_timeout_ms: int = 10000
    user_cache_seconds: float = 1.0
    grace_seconds: float = 10.0
    max_concurrent_rpcs: int = 1000
    max_anonymous_streams: int = 100
    max_concurrent_streams: int = 100
    max_receive_message_bytes: int = 64 * 1024
    max_connection_age_seconds: float = 1800.0
    max_connection_age_grace_seconds: float = 30.0
    pending_cap: int = 5
    pending_window_seconds: float = 600.0
    resend_cooldown_seconds: float = 3600.0
    listener_probe_seconds: float = 2.0
    watch_heartbeat_seconds: float = 15.0
    watch_queue_size: int = 64
    watch_write_timeout_seconds: float = 10.0
    watch_max_per_user: int = 5
    watch_max_streams: int = 10_000
    outbox_enabled: bool = True
    outbox_batch_size: int = 20
    outbox_poll_seconds: float = 5.0
    outbox_retry_base_seconds: float = 0.5
    outbox_retry_cap_seconds: float = 30.0
    outbox_max_attempts: int = 5
    ntfy_timeout_seconds: float = 5.0
    ntfy_allowed_networks: tuple[str, ...] = ()
    retention_interval_seconds: float = 3600.0
    retention_outbox_days: int = 7
    retention_notifications_days: int = 90
    retention_requests_days: int = 365
    retention_audit_days: int = 365
    # Set by `serve --workers N` for its own processes only (never from the environment).
    reuse_port: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Reads the configuration; raises `ConfigError` naming the first bad variable."""
        env = _Env(os.environ if environ is None else environ)
        config = cls(
            database_url=env.text("UMBRA_DATABASE_URL"),
            listen_database_url=env.text("UMBRA_LISTEN_DATABASE_URL"),
            listen=env.text("UMBRA_LISTEN") or cls.listen,
            metrics_listen=env.text("UMBRA_METRICS_LISTEN"),
            data_dir=Path(env.text("UMBRA_DATA_DIR") or cls.data_dir),
            jwt_secret=env.text("UMBRA_JWT_SECRET"),
            jwt_public_key_files=tuple(Path(p) for p in env.items("UMBRA_JWT_PUBLIC_KEY_FILES")),
            jwt_jwks_file=env.path("UMBRA_JWT_JWKS_FILE"),
            jwt_issuer=env.text("UMBRA_JWT_ISSUER"),
            jwt_audience=env.text("UMBRA_JWT_AUDIENCE"),
            jwt_leeway_seconds=env.number("UMBRA_JWT_LEEWAY_SECONDS", cls.jwt_leeway_seconds),
            page_token_secret=env.text("UMBRA_PAGE_TOKEN_SECRET"),
            rate_limits=env.text("UMBRA_RATE_LIMITS") or cls.rate_limits,
            timing_floors=env.text("UMBRA_TIMING_FLOORS") or cls.timing_floors,
            trusted_proxies=env.items("UMBRA_TRUSTED_PROXIES"),
            log_format=env.choice("UMBRA_LOG_FORMAT", ("json", "text"), cls.log_format),
            log_level=env.choice(
                "UMBRA_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), cls.log_level
            ),
            event_loop=env.choice("UMBRA_EVENT_LOOP", ("uvloop", "asyncio"), cls.event_loop),
            tls_cert_file=env.path("UMBRA_TLS_CERT_FILE"),
            tls_key_file=env.path("UMBRA_TLS_KEY_FILE"),
            tls_client_ca_file=env.path("UMBRA_TLS_CLIENT_CA_FILE"),
            db_pool_size=env.integer("UMBRA_DB_POOL_SIZE", cls.db_pool_size),
            db_statement_cache_size=env.integer(
                "UMBRA_DB_STATEMENT_CACHE_SIZE", cls.db_statement_cache_size
            ),
            db_pool_timeout_seconds=env.number(
                "UMBRA_DB_POOL_TIMEOUT_SECONDS", cls.db_pool_timeout_seconds
            ),
            db_statement_timeout_ms=env.integer(
                "UMBRA_DB_STATEMENT_TIMEOUT_MS", cls.db_statement_timeout_ms
            ),
            db_lock_timeout_ms=env.integer("UMBRA_DB_LOCK_TIMEOUT_MS", cls.db_lock_timeout_ms),
            db_idle_in_transaction_timeout_ms=env.integer(
                "UMBRA_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", cls.db_idle_in_transaction_timeout_ms
            ),
            user_cache_seconds=env.number("UMBRA_USER_CACHE_SECONDS", cls.user_cache_seconds),
            grace_seconds=env.number("UMBRA_GRACE_SECONDS", cls.grace_seconds),
            max_concurrent_rpcs=env.integer("UMBRA_MAX_CONCURRENT_RPCS", cls.max_concurrent_rpcs),
            max_anonymous_streams=env.integer(
                "UMBRA_MAX_ANONYMOUS_STREAMS", cls.max_anonymous_streams
            ),
            max_concurrent_streams=env.integer(
                "UMBRA_MAX_CONCURRENT_STREAMS", cls.max_concurrent_streams
            ),
            max_receive_message_bytes=env.integer(
                "UMBRA_MAX_RECEIVE_MESSAGE_BYTES", cls.max_receive_message_bytes
            ),
            max_connection_age_seconds=env.number(
                "UMBRA_MAX_CONNECTION_AGE_SECONDS", cls.max_connection_age_seconds
            ),
            max_connection_age_grace_seconds=env.number(
                "UMBRA_MAX_CONNECTION_AGE_GRACE_SECONDS", cls.max_connection_age_grace_seconds
            ),
            pending_cap=env.integer("UMBRA_PENDING_CAP", cls.pending_cap),
            pending_window_seconds=env.number(
                "UMBRA_PENDING_WINDOW_SECONDS", cls.pending_window_seconds
            ),
            resend_cooldown_seconds=env.number(
                "UMBRA_RESEND_COOLDOWN_SECONDS", cls.resend_cooldown_seconds
            ),
            listener_probe_seconds=env.number(
                "UMBRA_LISTENER_PROBE_SECONDS", cls.listener_probe_seconds
            ),
            watch_heartbeat_seconds=env.number(
                "UMBRA_WATCH_HEARTBEAT_SECONDS", cls.watch_heartbeat_seconds
            ),
            watch_queue_size=env.integer("UMBRA_WATCH_QUEUE_SIZE", cls.watch_queue_size),
            watch_write_timeout_seconds=env.number(
                "UMBRA_WATCH_WRITE_TIMEOUT_SECONDS", cls.watch_write_timeout_seconds
            ),
            watch_max_per_user=env.integer("UMBRA_WATCH_MAX_PER_USER", cls.watch_max_per_user),
            watch_max_streams=env.integer("UMBRA_WATCH_MAX_STREAMS", cls.watch_max_streams),
            outbox_enabled=env.flag("UMBRA_OUTBOX_ENABLED", cls.outbox_enabled),
            outbox_batch_size=env.integer("UMBRA_OUTBOX_BATCH_SIZE", cls.outbox_batch_size),
            outbox_poll_seconds=env.number("UMBRA_OUTBOX_POLL_SECONDS", cls.outbox_poll_seconds),
            outbox_retry_base_seconds=env.number(
                "UMBRA_OUTBOX_RETRY_BASE_SECONDS", cls.outbox_retry_base_seconds
            ),
            outbox_retry_cap_seconds=env.number(
                "UMBRA_OUTBOX_RETRY_CAP_SECONDS", cls.outbox_retry_cap_seconds
            ),
            outbox_max_attempts=env.integer("UMBRA_OUTBOX_MAX_ATTEMPTS", cls.outbox_max_attempts),
            ntfy_timeout_seconds=env.number("UMBRA_NTFY_TIMEOUT_SECONDS", cls.ntfy_timeout_seconds),
            ntfy_allowed_networks=env.items("UMBRA_NTFY_ALLOWED_NETWORKS"),
            retention_interval_seconds=env.number(
                "UMBRA_RETENTION_INTERVAL_SECONDS", cls.retention_interval_seconds
            ),
            retention_outbox_days=env.integer(
                "UMBRA_RETENTION_OUTBOX_DAYS", cls.retention_outbox_days
            ),
            retention_notifications_days=env.integer(
                "UMBRA_RETENTION_NOTIFICATIONS_DAYS", cls.retention_notifications_days
            ),
            retention_requests_days=env.integer(
                "UMBRA_RETENTION_REQUESTS_DAYS", cls.retention_requests_days
            ),
            retention_audit_days=env.integer(
                "UMBRA_RETENTION_AUDIT_DAYS", cls.retention_audit_days
            ),
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Checks the values that depend on each other."""
        if self.database_url is not None and not self.database_url.startswith(_URL_PREFIXES):
            raise ConfigError("UMBRA_DATABASE_URL must be a postgresql:// URL")
        if self.listen_database_url is not None:
            if self.database_url is None:
                raise ConfigError("UMBRA_LISTEN_DATABASE_URL needs UMBRA_DATABASE_URL")
            if not self.listen_database_url.startswith(_URL_PREFIXES):
                raise ConfigError("UMBRA_LISTEN_DATABASE_URL must be a postgresql:// URL")
        if self.metrics_listen is not None and not self.metrics_listen.rpartition(":")[2].isdigit():
            raise ConfigError("UMBRA_METRICS_LISTEN must be host:port (empty disables it)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("UMBRA_TLS_CERT_FILE and UMBRA_TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("UMBRA_TLS_CLIENT_CA_FILE needs UMBRA_TLS_CERT_FILE")
        if self.watch_queue_size < 1 or self.outbox_max_attempts < 1:
            raise ConfigError("UMBRA_WATCH_QUEUE_SIZE and UMBRA_OUTBOX_MAX_ATTEMPTS must be >= 1")
        if self.db_statement_cache_size > 10_000:
            raise ConfigError("UMBRA_DB_STATEMENT_CACHE_SIZE must be at most 10000")
        if self.db_pool_timeout_seconds <= 0 or self.db_pool_size < 1:
            raise ConfigError("UMBRA_DB_POOL_SIZE and UMBRA_DB_POOL_TIMEOUT_SECONDS must be > 0")
        for network in self.ntfy_allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(
                    f"UMBRA_NTFY_ALLOWED_NETWORKS: {network!r} is not a CIDR or an address"
                ) from None
        for name, value, lowest, highest in (
            ("UMBRA_RESEND_COOLDOWN_SECONDS", self.resend_cooldown_seconds, 0, 31_536_000),
            ("UMBRA_RETENTION_INTERVAL_SECONDS", self.retention_interval_seconds, 0, 604_800),
            ("UMBRA_RETENTION_OUTBOX_DAYS", self.retention_outbox_days, 1, 36_500),
            ("UMBRA_RETENTION_NOTIFICATIONS_DAYS", self.retention_notifications_days, 1, 36_500),
            ("UMBRA_RETENTION_REQUESTS_DAYS", self.retention_requests_days, 1, 36_500),
            ("UMBRA_RETENTION_AUDIT_DAYS", self.retention_audit_days, 1, 36_500),
        ):
            if not lowest <= value <= highest:  # NaN fails every comparison
                raise ConfigError(f"{name} must be between {lowest} and {highest}")

    @property
    def listener_url(self) -> str | None:
        """Where the one LISTEN connection goes: its own URL (past a transaction pooler, which
        would take LISTEN and never deliver), else the pool's."""
        return self.listen_database_url or self.database_url

    def with_changes(self, **changes: object) -> Config:
        """A copy with some fields replaced (tests and the CLI use it)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


class _Env:
    """Typed reads of one environment mapping; errors name the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def path(self, name: str) -> Path | None:
        value = self.text(name)
        return Path(value) if value else None

    def items(self, name: str) -> tuple[str, ...]:
        value = self.text(name) or ""
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def integer(self, name: str, default: int) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
        if number < 0:
            raise ConfigError(f"{name} must not be negative")
        return number

    def number(self, name: str, default: float) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if number < 0:
            raise ConfigError(f"{name} must not be negative")
        return number

    def flag(self, name: str, default: bool) -> bool:
        value = self.text(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(name)
        if value is None:
            return default
        normalized = value.upper() if choices[0].isupper() else value.lower()
        if normalized not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}")
        return normalized
