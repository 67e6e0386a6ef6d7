"""UMBRA_EVENT_LOOP: `serve` runs on asyncio's own loop unless told to use uvloop."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from umbra_grpc.config import Config, ConfigError
from umbra_grpc.server import run_loop


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_asyncio_is_the_default() -> None:
    config = Config.from_env({})
    assert config.event_loop == "asyncio"
    assert not issubclass(run_loop(config, _loop_type()), uvloop.Loop)


def test_uvloop_on_request() -> None:
    config = Config.from_env({"UMBRA_EVENT_LOOP": "UVLoop"})
    assert config.event_loop == "uvloop"
    assert issubclass(run_loop(config, _loop_type()), uvloop.Loop)


def test_an_unknown_loop_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="UMBRA_EVENT_LOOP"):
        Config.from_env({"UMBRA_EVENT_LOOP": "trio"})
