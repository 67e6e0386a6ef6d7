"""The settings of the production topology: the listener's own URL, the statement cache."""

from __future__ import annotations

import pytest

from umbra_grpc.config import Config, ConfigError

POOLED = "postgresql://umbra@127.0.0.1:6432/umbra"
DIRECT = "postgresql://umbra@10.0.0.1:5432,10.0.0.2:5432/umbra?target_session_attrs=read-write"


def test_the_listener_uses_the_pool_url_unless_given_its_own() -> None:
    assert Config.from_env({"UMBRA_DATABASE_URL": POOLED}).listener_url == POOLED
    both = Config.from_env({"UMBRA_DATABASE_URL": POOLED, "UMBRA_LISTEN_DATABASE_URL": DIRECT})
    assert (both.database_url, both.listener_url) == (POOLED, DIRECT)


def test_statement_cache_size_is_read_and_bounded() -> None:
    assert Config.from_env({}).db_statement_cache_size == 100
    assert Config.from_env({"UMBRA_DB_STATEMENT_CACHE_SIZE": "0"}).db_statement_cache_size == 0
    for bad in ("-1", "many", "10001"):
        with pytest.raises(ConfigError, match="UMBRA_DB_STATEMENT_CACHE_SIZE"):
            Config.from_env({"UMBRA_DB_STATEMENT_CACHE_SIZE": bad})


@pytest.mark.parametrize(
    "environ",
    [
        {"UMBRA_DATABASE_URL": POOLED, "UMBRA_LISTEN_DATABASE_URL": "mysql://x/y"},
        {"UMBRA_LISTEN_DATABASE_URL": DIRECT},  # the embedded database has no other route
    ],
)
def test_a_bad_listener_url_stops_the_process_naming_it(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="UMBRA_LISTEN_DATABASE_URL"):
        Config.from_env(environ)
