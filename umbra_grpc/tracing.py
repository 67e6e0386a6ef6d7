"""Whether to trace: OpenTelemetry is off unless the standard `OTEL_*` variables turn it on.

On when `OTEL_TRACES_EXPORTER` names exporters (`otlp`, `console`, comma-separated), or when
it is unset and `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set
(then `otlp`). `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` keeps it off.
Everything else is read by the OpenTelemetry SDK itself: `OTEL_TRACES_SAMPLER` (+`_ARG`),
`OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` (service.name defaults to `umbra-grpc`),
`OTEL_EXPORTER_OTLP_*` (endpoint, headers, certificates; the OTLP exporter speaks gRPC),
`OTEL_BSP_*` (batching), `OTEL_PROPAGATORS` (how a caller's trace context is read).

Off, this module imports nothing of OpenTelemetry, the server adds no interceptor and asyncpg
is not instrumented: the serving path is exactly the one without tracing. The packages are
the `tracing` extra (`pip install 'umbra-grpc[tracing]'`, part of `make install`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from umbra_grpc.config import ConfigError

if TYPE_CHECKING:
    from umbra_grpc.telemetry import Tracing

EXPORTERS: Final = ("otlp", "console")
_OTLP_ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_PROTOCOLS: Final = ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")


def exporters(env: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The span exporters the environment asks for (empty: tracing off).

    Raises `ConfigError` naming the variable when a value is not understood.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    configured = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if configured:
        names = tuple(dict.fromkeys(name.strip().lower() for name in configured.split(",")))
    else:
        names = ("otlp",) if any(env.get(name, "").strip() for name in _OTLP_ENDPOINTS) else ()
    if names == ("none",):
        return ()
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r} (otlp, console or none)"
        )
    if "otlp" in names:
        for name in _PROTOCOLS:
            protocol = env.get(name, "").strip()
            if protocol and protocol != "grpc":
                raise ConfigError(f"{name}: only grpc is supported, got {protocol!r}")
    return names


def from_environment(env: Mapping[str, str] = os.environ) -> Tracing | None:
    """Tracing as the environment asks for it, or None when it is off."""
    names = exporters(env)
    if not names:
        return None
    try:
        from umbra_grpc.telemetry import Tracing
    except ImportError as error:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={','.join(names)} needs the OpenTelemetry packages: "
            f"pip install 'umbra-grpc[tracing]' ({error.name} is missing)"
        ) from error
    return Tracing.exporting_to(names)
