"""`Config.from_env`: every variable is read and checked up front, and errors name it.

Structured values go through the parsers the server itself uses, files are loaded, and every
number must be finite and inside the range the README documents (SPEC 10.7).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.certificates import Authority, private_pem
from umbra_grpc.config import RANGES, Config, ConfigError, plain

README = Path(__file__).resolve().parents[2] / "README.md"
SECRET = "unit-config-secret-0123456789-abcdefghijklmnop"

# Builds extra variables (and files) for a case, in a folder of its own.
Setup = Callable[[Path], dict[str, str]]


def numeric_variables() -> list[str]:
    """UMBRA_* names of the numeric fields of Config (bool is not numeric here)."""
    return [
        f"UMBRA_{field.name.upper()}"
        for field in dataclasses.fields(Config)
        if field.type in ("int", "float") and field.name != "reuse_port"
    ]


def error_for(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as raised:
        Config.from_env(environ)
    return str(raised.value)


def test_an_empty_environment_gives_the_documented_defaults() -> None:
    assert Config.from_env({}) == Config()


def test_every_numeric_variable_has_a_range_holding_its_default() -> None:
    defaults = Config()
    assert sorted(numeric_variables()) == sorted(RANGES)
    for name, (low, high) in RANGES.items():
        default = getattr(defaults, name.removeprefix("UMBRA_").lower())
        assert low <= default <= high, name


def test_every_range_is_in_the_readme_table() -> None:
    rows = {
        match[1]: line
        for line in README.read_text().splitlines()
        if (match := re.match(r"\| `(UMBRA_[A-Z_]+)`", line))
    }
    for name, (low, high) in RANGES.items():
        assert name in rows, f"{name} is not in the README's configuration table"
        assert f"{plain(low)}\u2013{plain(high)}" in rows[name], (
            f"{name}: range not in {rows[name]}"
        )


def _out_of_range(name: str) -> list[str]:
    low, high = RANGES[name]
    whole = isinstance(getattr(Config(), name.removeprefix("UMBRA_").lower()), int)
    step = 1 if whole else low / 2 or 0.5
    below = low - step
    above = high + (1 if whole else high)
    return [plain(below).replace(",", ""), plain(above).replace(",", "")]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (name, value)
        for name in sorted(RANGES)
        for value in ("nan", "inf", "-inf", "1e9", "-1", "abc", *_out_of_range(name))
    ],
)
def test_a_number_outside_its_range_names_the_variable(name: str, value: str) -> None:
    message = error_for({name: value})
    assert message.startswith(f"{name} must be"), message
    assert "Traceback" not in message


@pytest.mark.parametrize("name", sorted(RANGES))
def test_both_ends_of_a_range_are_accepted(name: str) -> None:
    field = name.removeprefix("UMBRA_").lower()
    for bound in RANGES[name]:
        config = Config.from_env({name: plain(bound).replace(",", ""), **_consistent(name, bound)})
        assert getattr(config, field) == bound


def _consistent(name: str, bound: float) -> dict[str, str]:
    """Other variables a bound needs to be valid with (retry base <= cap, window <= TTL)."""
    if name == "UMBRA_REQUEST_TTL_SECONDS":
        return {"UMBRA_PENDING_WINDOW_SECONDS": plain(min(bound, 600)).replace(",", "")}
    if name == "UMBRA_OUTBOX_RETRY_BASE_SECONDS":
        return {"UMBRA_OUTBOX_RETRY_CAP_SECONDS": plain(max(bound, 30)).replace(",", "")}
    if name == "UMBRA_OUTBOX_RETRY_CAP_SECONDS":
        return {"UMBRA_OUTBOX_RETRY_BASE_SECONDS": plain(min(bound, 0.5))}
    return {}


def _ec_public_key(folder: Path) -> Path:
    path = folder / "public.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


def _tls(folder: Path, **overrides: str) -> dict[str, str]:
    authority = Authority.create(folder)
    server = authority.issue(folder, "server", server=True)
    return {
        "UMBRA_TLS_CERT_FILE": str(server.cert),
        "UMBRA_TLS_KEY_FILE": str(server.key),
        **overrides,
    }


def _write(folder: Path, name: str, data: str | bytes) -> str:
    path = folder / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return str(path)


def _other_key(folder: Path) -> dict[str, str]:
    stranger = _write(folder, "other.key", private_pem(ec.generate_private_key(ec.SECP256R1())))
    return _tls(folder, UMBRA_TLS_KEY_FILE=stranger)


def _encrypted_key(folder: Path) -> dict[str, str]:
    authority = Authority.create(folder)
    server = authority.issue(folder, "server", server=True)
    key = serialization.load_pem_private_key(server.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    locked = _write(folder, "locked.key", private_pem(key, password=b"hunter2"))
    return {"UMBRA_TLS_CERT_FILE": str(server.cert), "UMBRA_TLS_KEY_FILE": locked}


def _duplicate_kids(folder: Path) -> dict[str, str]:
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(2)]
    document = {"keys": [{**json.loads(ECAlgorithm.to_jwk(key)), "kid": "k"} for key in keys]}
    return {"UMBRA_JWT_JWKS_FILE": _write(folder, "jwks.json", json.dumps(document))}


# (variable, value or None when `setup` gives it, setup): one bad value per way to be wrong.
BAD: list[tuple[str, str | None, Setup | None]] = [
    ("UMBRA_DATABASE_URL", "mysql://localhost/umbra", None),
    ("UMBRA_LISTEN", "localhost", None),
    ("UMBRA_LISTEN", "127.0.0.1:", None),
    ("UMBRA_LISTEN", "127.0.0.1:65536", None),
    ("UMBRA_LISTEN", "::1:50051", None),
    ("UMBRA_LISTEN", "[not-ipv6]:50051", None),
    ("UMBRA_LISTEN", ":50051", None),
    ("UMBRA_LISTEN", "127.0.0.1:50051/x", None),
    ("UMBRA_METRICS_LISTEN", "9100", None),
    ("UMBRA_METRICS_LISTEN", "127.0.0.1:http", None),
    ("UMBRA_RATE_LIMITS", "Search", None),
    ("UMBRA_RATE_LIMITS", "Search=0/1s", None),
    ("UMBRA_RATE_LIMITS", "Search=20/1d", None),
    ("UMBRA_RATE_LIMITS", "Search=20/1s,Search=5/1s", None),
    ("UMBRA_RATE_LIMITS", "Search=2000000/1s", None),
    ("UMBRA_RATE_LIMITS", "Search=20/100000h", None),
    ("UMBRA_TIMING_FLOORS", "Search", None),
    ("UMBRA_TIMING_FLOORS", "Search:NOPE=50ms", None),
    ("UMBRA_TIMING_FLOORS", "Search=-5ms", None),
    ("UMBRA_TIMING_FLOORS", "Search=11s", None),
    ("UMBRA_TRUSTED_PROXIES", "10.0.0.0/8,proxy.local", None),
    ("UMBRA_TRUSTED_PROXIES", "10.0.0.0/33", None),
    ("UMBRA_JWT_SECRET", "too-short", None),
    ("UMBRA_JWT_PUBLIC_KEY_FILES", "/nonexistent/key.pem", None),
    (
        "UMBRA_JWT_PUBLIC_KEY_FILES",
        None,
        lambda f: {"UMBRA_JWT_PUBLIC_KEY_FILES": _write(f, "x", "x")},
    ),
    (
        "UMBRA_JWT_PUBLIC_KEY_FILES",
        None,
        lambda f: {"UMBRA_JWT_PUBLIC_KEY_FILES": f"{_ec_public_key(f)},{f / 'missing.pem'}"},
    ),
    ("UMBRA_JWT_JWKS_FILE", "/nonexistent/jwks.json", None),
    ("UMBRA_JWT_JWKS_FILE", None, lambda f: {"UMBRA_JWT_JWKS_FILE": _write(f, "j", "{nope")}),
    ("UMBRA_JWT_JWKS_FILE", None, _duplicate_kids),
    ("UMBRA_TLS_CERT_FILE", None, lambda f: {"UMBRA_TLS_CERT_FILE": _write(f, "c", "x")}),
    ("UMBRA_TLS_CERT_FILE", None, lambda f: _tls(f, UMBRA_TLS_CERT_FILE=str(f / "missing"))),
    ("UMBRA_TLS_CERT_FILE", None, lambda f: _tls(f, UMBRA_TLS_CERT_FILE=_write(f, "c", "x"))),
    ("UMBRA_TLS_KEY_FILE", None, lambda f: _tls(f, UMBRA_TLS_KEY_FILE=str(f / "missing"))),
    ("UMBRA_TLS_KEY_FILE", None, lambda f: _tls(f, UMBRA_TLS_KEY_FILE=_write(f, "k", "x"))),
    ("UMBRA_TLS_KEY_FILE", None, _other_key),
    ("UMBRA_TLS_KEY_FILE", None, _encrypted_key),
    ("UMBRA_TLS_CLIENT_CA_FILE", None, lambda f: {"UMBRA_TLS_CLIENT_CA_FILE": str(f)}),
    (
        "UMBRA_TLS_CLIENT_CA_FILE",
        None,
        lambda f: _tls(f, UMBRA_TLS_CLIENT_CA_FILE=_write(f, "ca", "not a certificate")),
    ),
    ("UMBRA_LOG_FORMAT", "xml", None),
    ("UMBRA_LOG_LEVEL", "LOUD", None),
    ("UMBRA_EVENT_LOOP", "trio", None),
    ("UMBRA_OUTBOX_ENABLED", "sometimes", None),
    ("UMBRA_MIGRATE", "later", None),
    (
        "UMBRA_OUTBOX_RETRY_BASE_SECONDS",
        None,
        lambda f: {"UMBRA_OUTBOX_RETRY_BASE_SECONDS": "10", "UMBRA_OUTBOX_RETRY_CAP_SECONDS": "5"},
    ),
]


@pytest.mark.parametrize(
    ("name", "value", "setup"),
    BAD,
    ids=[f"{name}-{n}" for n, (name, _, _) in enumerate(BAD)],
)
def test_a_bad_value_names_its_variable(
    name: str, value: str | None, setup: Setup | None, tmp_path: Path
) -> None:
    environ = setup(tmp_path) if setup else {}
    if value is not None:
        environ[name] = value
    message = error_for(environ)
    assert message.startswith(name), message


def test_good_structured_values_are_accepted(tmp_path: Path) -> None:
    authority = Authority.create(tmp_path)
    server = authority.issue(tmp_path, "server", server=True)
    config = Config.from_env(
        {
            "UMBRA_LISTEN": "[::1]:0",
            "UMBRA_METRICS_LISTEN": "0.0.0.0:9100",
            "UMBRA_RATE_LIMITS": "Search=5/2s,SendRequest=1/1h",
            "UMBRA_TIMING_FLOORS": "Search=50ms,SendRequest:NOT_FOUND=0.05s",
            "UMBRA_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7, fd00::/8",
            "UMBRA_JWT_SECRET": SECRET,
            "UMBRA_JWT_PUBLIC_KEY_FILES": str(_ec_public_key(tmp_path)),
            "UMBRA_TLS_CERT_FILE": str(server.cert),
            "UMBRA_TLS_KEY_FILE": str(server.key),
            "UMBRA_TLS_CLIENT_CA_FILE": str(authority.cert_file),
            "UMBRA_MIGRATE": "off",
        }
    )
    assert config.trusted_proxies == ("10.0.0.0/8", "192.168.1.7", "fd00::/8")
    assert config.tls_client_ca_file == authority.cert_file
    assert not config.migrate
