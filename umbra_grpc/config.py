"""Frozen settings read once from `UMBRA_*` environment variables.

Every variable is listed in the README's configuration table; names are fixed there. A bad
value stops the process at start-up with a message naming the variable, never later:
`Config.from_env` reads and checks everything, structured values (rate limits, timing floors,
trusted proxies, addresses) with the same parsers the server uses, and files (JWT keys, TLS)
by loading them, before the CLI starts PostgreSQL or binds a port. Every number must be
finite and inside its documented range (`RANGES`, SPEC 10.7).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from umbra_grpc.interceptors.rate_limit import parse_rate_limits
from umbra_grpc.interceptors.timing_floor import parse_timing_floors
from umbra_grpc.peer import parse_networks

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
    request_ttl_seconds: float = 2_592_000.0
    expiry_sweep_seconds: float = 60.0
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
    migrate: bool = True
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
            request_ttl_seconds=env.number("UMBRA_REQUEST_TTL_SECONDS", cls.request_ttl_seconds),
            expiry_sweep_seconds=env.number("UMBRA_EXPIRY_SWEEP_SECONDS", cls.expiry_sweep_seconds),
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
            migrate=env.flag("UMBRA_MIGRATE", cls.migrate),
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Checks what reading one variable cannot: formats, files, values that go together."""
        if self.database_url is not None and not self.database_url.startswith(_URL_PREFIXES):
            raise ConfigError("UMBRA_DATABASE_URL must be a postgresql:// URL")
        if self.listen_database_url is not None:
            if self.database_url is None:
                raise ConfigError("UMBRA_LISTEN_DATABASE_URL needs UMBRA_DATABASE_URL")
            if not self.listen_database_url.startswith(_URL_PREFIXES):
                raise ConfigError("UMBRA_LISTEN_DATABASE_URL must be a postgresql:// URL")
        check_address("UMBRA_LISTEN", self.listen)
        if self.metrics_listen is not None:
            check_address("UMBRA_METRICS_LISTEN", self.metrics_listen, empty_disables=True)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("UMBRA_TLS_CERT_FILE and UMBRA_TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("UMBRA_TLS_CLIENT_CA_FILE needs UMBRA_TLS_CERT_FILE")
        if self.outbox_retry_base_seconds > self.outbox_retry_cap_seconds:
            raise ConfigError(
                "UMBRA_OUTBOX_RETRY_BASE_SECONDS must not exceed UMBRA_OUTBOX_RETRY_CAP_SECONDS"
            )
        _check_rate_limits(self.rate_limits)
        _check_timing_floors(self.timing_floors)
        try:
            parse_networks(self.trusted_proxies)
        except ValueError as error:
            raise ConfigError(f"UMBRA_TRUSTED_PROXIES: {error}") from None
        for network in self.ntfy_allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ConfigError(
                    f"UMBRA_NTFY_ALLOWED_NETWORKS: {network!r} is not a CIDR or an address"
                ) from None
        _check_jwt_keys(self)
        _check_tls(self)
        # A request must outlive the cap's window, or expiring would free cap places.
        if self.request_ttl_seconds < self.pending_window_seconds:
            raise ConfigError(
                "UMBRA_REQUEST_TTL_SECONDS must be at least UMBRA_PENDING_WINDOW_SECONDS"
            )

    @property
    def listener_url(self) -> str | None:
        """Where the one LISTEN connection goes: its own URL (past a transaction pooler, which
        would take LISTEN and never deliver), else the pool's."""
        return self.listen_database_url or self.database_url

    def with_changes(self, **changes: object) -> Config:
        """A copy with some fields replaced (tests and the CLI use it)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# The documented range (README table) of every numeric variable, ends included; SPEC 10.7.
# A value outside it, or not finite, stops the process naming the variable. A numeric
# variable missing here fails every start (`_Env`) and tests/unit/test_config.py.
RANGES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "UMBRA_JWT_LEEWAY_SECONDS": (0, 300),
        "UMBRA_DB_POOL_SIZE": (1, 1000),
        "UMBRA_DB_STATEMENT_CACHE_SIZE": (0, 10_000),
        "UMBRA_DB_POOL_TIMEOUT_SECONDS": (0.1, 300),
        "UMBRA_DB_STATEMENT_TIMEOUT_MS": (1, 3_600_000),
        "UMBRA_DB_LOCK_TIMEOUT_MS": (1, 3_600_000),
        "UMBRA_DB_IDLE_IN_TRANSACTION_TIMEOUT_MS": (1, 3_600_000),
        "UMBRA_USER_CACHE_SECONDS": (0, 3600),
        "UMBRA_GRACE_SECONDS": (0, 3600),
        "UMBRA_MAX_CONCURRENT_RPCS": (1, 100_000),
        "UMBRA_MAX_ANONYMOUS_STREAMS": (0, 100_000),
        "UMBRA_MAX_CONCURRENT_STREAMS": (1, 100_000),
        "UMBRA_MAX_RECEIVE_MESSAGE_BYTES": (1024, 16 * 1024 * 1024),
        "UMBRA_MAX_CONNECTION_AGE_SECONDS": (1, 604_800),
        "UMBRA_MAX_CONNECTION_AGE_GRACE_SECONDS": (0, 3600),
        "UMBRA_PENDING_CAP": (1, 1000),
        "UMBRA_PENDING_WINDOW_SECONDS": (1, 2_592_000),
        "UMBRA_RESEND_COOLDOWN_SECONDS": (0, 31_536_000),
        "UMBRA_REQUEST_TTL_SECONDS": (60, 315_360_000),
        "UMBRA_EXPIRY_SWEEP_SECONDS": (0, 86_400),
        "UMBRA_LISTENER_PROBE_SECONDS": (0.1, 300),
        "UMBRA_WATCH_HEARTBEAT_SECONDS": (0.1, 3600),
        "UMBRA_WATCH_QUEUE_SIZE": (1, 100_000),
        "UMBRA_WATCH_WRITE_TIMEOUT_SECONDS": (0.1, 3600),
        "UMBRA_WATCH_MAX_PER_USER": (1, 1000),
        "UMBRA_WATCH_MAX_STREAMS": (1, 1_000_000),
        "UMBRA_OUTBOX_BATCH_SIZE": (1, 1000),
        "UMBRA_OUTBOX_POLL_SECONDS": (0.01, 3600),
        "UMBRA_OUTBOX_RETRY_BASE_SECONDS": (0.001, 3600),
        "UMBRA_OUTBOX_RETRY_CAP_SECONDS": (0.001, 86_400),
        "UMBRA_OUTBOX_MAX_ATTEMPTS": (1, 100),
        "UMBRA_NTFY_TIMEOUT_SECONDS": (0.1, 300),
        "UMBRA_RETENTION_INTERVAL_SECONDS": (0, 604_800),
        "UMBRA_RETENTION_OUTBOX_DAYS": (1, 36_500),
        "UMBRA_RETENTION_NOTIFICATIONS_DAYS": (1, 36_500),
        "UMBRA_RETENTION_REQUESTS_DAYS": (1, 36_500),
        "UMBRA_RETENTION_AUDIT_DAYS": (1, 36_500),
    }
)
# Numbers inside the structured variables, documented in the same table.
RATE_LIMIT_BURST_RANGE = (1, 1_000_000)
RATE_LIMIT_INTERVAL_RANGE = (0.001, 86_400.0)
TIMING_FLOOR_RANGE = (0.0, 10.0)

_ADDRESS = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})")


def check_address(name: str, value: str, *, empty_disables: bool = False) -> int:
    """The port of a `host:port` (IPv6 in brackets) listen address; `ConfigError` if malformed."""
    match = _ADDRESS.fullmatch(value)
    port = int(match["port"]) if match else -1
    if match and match["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            match = None
    if match is None or port > 65535:
        hint = " (empty disables it)" if empty_disables else ""
        raise ConfigError(
            f"{name} must be host:port with a port 0-65535, IPv6 in brackets "
            f"([::1]:50051){hint}; got {value!r}"
        )
    return port


def _check_rate_limits(spec: str) -> None:
    try:
        limits = parse_rate_limits(spec)
    except ValueError as error:
        raise ConfigError(f"UMBRA_RATE_LIMITS: {error}") from None
    for method, limit in limits.items():
        _check_range("UMBRA_RATE_LIMITS", f"{method}'s burst", limit.burst, RATE_LIMIT_BURST_RANGE)
        _check_range(
            "UMBRA_RATE_LIMITS",
            f"{method}'s interval (s)",
            limit.interval,
            RATE_LIMIT_INTERVAL_RANGE,
        )


def _check_timing_floors(spec: str) -> None:
    try:
        rules = parse_timing_floors(spec)
    except ValueError as error:
        raise ConfigError(f"UMBRA_TIMING_FLOORS: {error}") from None
    for rule in rules:
        _check_range(
            "UMBRA_TIMING_FLOORS", f"{rule.method}'s floor (s)", rule.seconds, TIMING_FLOOR_RANGE
        )


def _check_range(name: str, what: str, value: float, bounds: tuple[float, float]) -> None:
    if not bounds[0] <= value <= bounds[1]:
        raise ConfigError(f"{name}: {what} must be {range_text(bounds)}, got {plain(value)}")


def range_text(bounds: tuple[float, float]) -> str:
    """How a range reads in messages (the README table writes `Range low-high`, en dash)."""
    return f"between {plain(bounds[0])} and {plain(bounds[1])}"


def plain(number: float) -> str:
    """A number as people write it: `300`, `0.1`, `3,600,000` (no exponent, no `.0`)."""
    if float(number).is_integer():
        return f"{int(number):,}"
    return f"{number:f}".rstrip("0")


def _check_jwt_keys(config: Config) -> None:
    """Loads the configured JWT keys as the server will; none configured is `serve`'s
    business (it falls back to the development secret)."""
    if not (config.jwt_secret or config.jwt_public_key_files or config.jwt_jwks_file):
        return
    # Imported here: tokens builds its verifier from a Config, so it imports this module.
    from umbra_grpc.tokens import TokenVerifier

    TokenVerifier.from_config(config)


def _check_tls(config: Config) -> None:
    """The certificate chain, its private key (which must match it) and the client CA."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return
    chain = _certificates("UMBRA_TLS_CERT_FILE", config.tls_cert_file)
    key_pem = _read("UMBRA_TLS_KEY_FILE", config.tls_key_file)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            f"UMBRA_TLS_KEY_FILE: {config.tls_key_file} is encrypted; grpc needs it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ConfigError(
            f"UMBRA_TLS_KEY_FILE: {config.tls_key_file} holds no usable PEM private key ({error})"
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != chain[0].public_key().public_bytes(der, spki):
        raise ConfigError(
            f"UMBRA_TLS_KEY_FILE: {config.tls_key_file} is not the private key of the "
            f"(first) certificate in UMBRA_TLS_CERT_FILE"
        )
    if config.tls_client_ca_file is not None:
        _certificates("UMBRA_TLS_CLIENT_CA_FILE", config.tls_client_ca_file)


def _certificates(name: str, path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(name, path))
    except ValueError:
        raise ConfigError(f"{name}: {path} holds no PEM certificate") from None


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{name}: cannot read {path}: {error.strerror}") from None


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
        bounds = RANGES[name]  # KeyError: a numeric variable without a documented range
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
        _check_number(name, value, number, bounds)
        return number

    def number(self, name: str, default: float) -> float:
        bounds = RANGES[name]  # KeyError: a numeric variable without a documented range
        value = self.text(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        _check_number(name, value, number, bounds)
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


def _check_number(name: str, text: str, number: float, bounds: tuple[float, float]) -> None:
    if not math.isfinite(number) or not bounds[0] <= number <= bounds[1]:
        raise ConfigError(f"{name} must be a finite number {range_text(bounds)}, got {text!r}")
