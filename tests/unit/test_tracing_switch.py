"""The OTEL_* switch: off by default (importing nothing of OpenTelemetry), on as the
standard variables say, and a clear stop for values it does not understand."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from umbra_grpc import tracing
from umbra_grpc.config import ConfigError


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ()),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": " OTLP , console,otlp"}, ("otlp", "console")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ("otlp",)),
    ],
)
def test_exporters_from_the_environment(env: dict[str, str], expected: tuple[str, ...]) -> None:
    assert tracing.exporters(env) == expected


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp,none"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ),
    ],
)
def test_values_not_understood_name_their_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable}: "):
        tracing.exporters(env)


def test_on_it_builds_providers_named_after_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    on = tracing.from_environment({"OTEL_TRACES_EXPORTER": "console"})
    assert on is not None
    try:
        assert on.provider.resource.attributes["service.name"] == "umbra-grpc"
    finally:
        on.provider.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "connections-eu")
    named = tracing.from_environment({"OTEL_TRACES_EXPORTER": "console"})
    assert named is not None
    try:
        assert named.provider.resource.attributes["service.name"] == "connections-eu"
    finally:
        named.provider.shutdown()


def test_off_nothing_of_opentelemetry_is_imported() -> None:
    script = (
        "import sys\n"
        "import umbra_grpc.cli, umbra_grpc.server\n"
        "from umbra_grpc import tracing\n"
        "assert tracing.from_environment({}) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_serve_stops_at_once_on_a_bad_value(tmp_path: os.PathLike[str]) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "UMBRA_"))},
        "UMBRA_DATA_DIR": str(tmp_path),
        "OTEL_TRACES_EXPORTER": "zipkin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "umbra_grpc", "serve"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert "configuration error: OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'" in done.stderr
