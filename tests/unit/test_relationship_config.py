"""UMBRA_REQUEST_TTL_SECONDS and UMBRA_EXPIRY_SWEEP_SECONDS (SPEC 11): read, and checked."""

from __future__ import annotations

import pytest

from umbra_grpc.config import Config, ConfigError


def test_the_ttl_is_configured_and_checked() -> None:
    config = Config.from_env(
        {"UMBRA_REQUEST_TTL_SECONDS": "86400", "UMBRA_EXPIRY_SWEEP_SECONDS": "5"}
    )
    assert (config.request_ttl_seconds, config.expiry_sweep_seconds) == (86400.0, 5.0)
    assert Config.from_env({}).request_ttl_seconds == 2_592_000
    for env, named in (
        ({"UMBRA_REQUEST_TTL_SECONDS": "nan"}, "UMBRA_REQUEST_TTL_SECONDS"),
        ({"UMBRA_REQUEST_TTL_SECONDS": "10"}, "UMBRA_REQUEST_TTL_SECONDS"),
        (
            {"UMBRA_REQUEST_TTL_SECONDS": "300", "UMBRA_PENDING_WINDOW_SECONDS": "600"},
            "UMBRA_REQUEST_TTL_SECONDS",
        ),
        ({"UMBRA_EXPIRY_SWEEP_SECONDS": "inf"}, "UMBRA_EXPIRY_SWEEP_SECONDS"),
    ):
        with pytest.raises(ConfigError, match=named):
            Config.from_env(env)
