"""The auth interceptor, alone: a real grpc.aio server and channel, keys made in fixtures."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import hashlib
import hmac
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from google.rpc import error_details_pb2, status_pb2

from tests.support import aio_unary_stream, raw_unary_stream, raw_unary_unary
from umbra_grpc.call_record import CallRecord, current_call
from umbra_grpc.config import Config, ConfigError
from umbra_grpc.interceptors.auth import (
    ADMIN_SCOPE_MESSAGE,
    NOT_ACTIVE_MESSAGE,
    UNAUTHENTICATED_MESSAGE,
    AuthInterceptor,
)
from umbra_grpc.interceptors.handlers import wrap_handler
from umbra_grpc.principal import ADMIN_SCOPE, Principal, current_principal
from umbra_grpc.rpc_errors import ERROR_DOMAIN
from umbra_grpc.tokens import InvalidToken, TokenVerifier, load_public_key, mint_token, parse_jwks

SECRET = "test-secret-9f3c1a7e5b2d4c6f8a0e1b3d5f7a9c2e"
OTHER_SECRET = "other-secret-0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d"

CONNECTIONS = "umbra.connections.v1.ConnectionService"
ACCOUNTS = "umbra.accounts.v1.AccountService"
SEARCH = f"/{CONNECTIONS}/Search"
WATCH = f"/{CONNECTIONS}/WatchIncomingRequests"
GET_USER = f"/{ACCOUNTS}/GetUser"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
REFLECTION_ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

ACTIVE_USER = 7
INACTIVE_USER = 8
UNKNOWN_USER = 404


# --- keys and tokens ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Keys:
    rsa: RSAPrivateKey
    rsa_other: RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa_other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
    )


def pem(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def write_pem(directory: Path, name: str, public_key: Any) -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(pem(public_key))
    return path


def claims(sub: object = str(ACTIVE_USER), ttl: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    values.update(extra)
    return {key: value for key, value in values.items() if value is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def signed(payload: dict[str, Any], key: Any, algorithm: str, kid: str | None = None) -> str:
    return jwt.encode(
        payload, key, algorithm=algorithm, headers={"kid": kid} if kid is not None else None
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand, HMAC-SHA256 signed with `hmac_key` (None: no signature)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if hmac_key is None:
        return f"{signing_input}."
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def verifier(**changes: Any) -> TokenVerifier:
    config = Config(jwt_secret=SECRET).with_changes(**changes)
    return TokenVerifier.from_config(config)


# --- a tiny server ------------------------------------------------------------------------


def _principal_body() -> bytes:
    principal = current_principal.get()
    if principal is None:
        return b"null"
    return json.dumps(
        {
            "subject": principal.subject,
            "user_id": principal.user_id,
            "scopes": sorted(principal.scopes),
            "expires_at": principal.expires_at,
        }
    ).encode()


async def echo_principal(request: bytes, context: Any) -> bytes:
    return _principal_body()


async def watch_principal(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield _principal_body()


def _handlers() -> list[grpc.GenericRpcHandler]:
    unary: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(echo_principal)
    return [
        grpc.method_handlers_generic_handler(
            CONNECTIONS,
            {
                "Search": unary,
                "WatchIncomingRequests": grpc.unary_stream_rpc_method_handler(watch_principal),
            },
        ),
        grpc.method_handlers_generic_handler(ACCOUNTS, {"GetUser": unary}),
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": unary}),
        grpc.method_handlers_generic_handler(
            "grpc.reflection.v1.ServerReflection", {"ServerReflectionInfo": unary}
        ),
        grpc.method_handlers_generic_handler(
            "grpc.reflection.v1alpha.ServerReflection", {"ServerReflectionInfo": unary}
        ),
    ]


class Users:
    """`is_active` backed by a dict; remembers whom it was asked about."""

    def __init__(self, active: dict[int, bool] | None = None, error: Exception | None = None):
        self.active = active if active is not None else {ACTIVE_USER: True, INACTIVE_USER: False}
        self.error = error
        self.asked: list[int] = []

    async def is_active(self, user_id: int) -> bool:
        self.asked.append(user_id)
        if self.error is not None:
            raise self.error
        return self.active.get(user_id, False)


class Probe(grpc.aio.ServerInterceptor):
    """Sits outside auth: gives it a CallRecord, notes the principal once the call is over."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.after: list[Principal | None] = []

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        probe = self

        def unary(behavior: Any) -> Any:
            async def probed(request: Any, context: Any) -> Any:
                record = CallRecord(details.method, "probe", None, 0.0)
                probe.records.append(record)
                token = current_call.set(record)
                try:
                    return await behavior(request, context)
                finally:
                    current_call.reset(token)
                    probe.after.append(current_principal.get())

            return probed

        def stream(behavior: Any) -> Any:
            async def probed(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    probe.after.append(current_principal.get())

            return probed

        return wrap_handler(handler, unary=unary, stream=stream)


@dataclasses.dataclass
class Outcome:
    code: grpc.StatusCode
    reason: str | None = None
    message: str | None = None
    principal: dict[str, Any] | None = None


class Client:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    async def call(
        self,
        method: str = SEARCH,
        token: str | None = None,
        *,
        authorization: str | None = None,
    ) -> Outcome:
        metadata: list[tuple[str, str]] = []
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        if authorization is not None:
            metadata.append(("authorization", authorization))
        try:
            body = await raw_unary_unary(self.channel, method)(b"", metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), *reason_of(error), None)
        return Outcome(grpc.StatusCode.OK, principal=json.loads(body))

    async def watch(self, token: str) -> list[dict[str, Any]]:
        call = raw_unary_stream(self.channel, WATCH)(
            b"", metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        return [json.loads(item) async for item in call]


def reason_of(error: grpc.aio.AioRpcError) -> tuple[str | None, str]:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.message == error.details()
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    assert info.domain == ERROR_DOMAIN
                    return info.reason, error.details() or ""
    return None, error.details() or ""


@contextlib.asynccontextmanager
async def serving(
    token_verifier: TokenVerifier | None = None,
    users: Users | None = None,
    *,
    probe: Probe | None = None,
    unavailable: tuple[type[Exception], ...] = (),
) -> AsyncIterator[Client]:
    auth = AuthInterceptor(
        token_verifier or verifier(),
        (users or Users()).is_active,
        unavailable=unavailable,
    )
    interceptors: list[grpc.aio.ServerInterceptor] = [probe, auth] if probe else [auth]
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers(_handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Client(channel)
    finally:
        await server.stop(None)


def assert_unauthenticated(outcome: Outcome) -> None:
    assert (outcome.code, outcome.reason, outcome.message) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        UNAUTHENTICATED_MESSAGE,
    )


# --- no token needed ----------------------------------------------------------------------


@pytest.mark.parametrize("method", [HEALTH, REFLECTION, REFLECTION_ALPHA])
async def test_health_and_reflection_need_no_token(method: str) -> None:
    async with serving() as client:
        outcome = await client.call(method)
    assert outcome.code == grpc.StatusCode.OK
    assert outcome.principal is None


async def test_unknown_method_is_unimplemented_without_a_token() -> None:
    async with serving() as client:
        outcome = await client.call(f"/{CONNECTIONS}/NoSuchMethod")
    assert outcome.code == grpc.StatusCode.UNIMPLEMENTED


# --- missing or malformed -----------------------------------------------------------------


async def test_no_token_is_unauthenticated() -> None:
    async with serving() as client:
        assert_unauthenticated(await client.call(SEARCH))
        assert_unauthenticated(await client.call(GET_USER))


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer garbage",
        "Bearer a.b.c",
        "Bearer two tokens",
        "Token x.y.z",
    ],
)
async def test_malformed_authorization_is_unauthenticated(authorization: str) -> None:
    async with serving() as client:
        assert_unauthenticated(await client.call(authorization=authorization))


async def test_token_without_the_bearer_scheme_is_unauthenticated() -> None:
    async with serving() as client:
        assert_unauthenticated(await client.call(authorization=hs256(claims())))


async def test_bearer_scheme_is_case_insensitive() -> None:
    async with serving() as client:
        outcome = await client.call(authorization=f"bearer {hs256(claims())}")
    assert outcome.code == grpc.StatusCode.OK


# --- HS256 --------------------------------------------------------------------------------


async def test_good_hs256_token_sets_the_principal() -> None:
    payload = claims(scope="umbra.read umbra.write")
    async with serving() as client:
        outcome = await client.call(SEARCH, hs256(payload))
    assert outcome.code == grpc.StatusCode.OK
    assert outcome.principal == {
        "subject": "7",
        "user_id": 7,
        "scopes": ["umbra.read", "umbra.write"],
        "expires_at": float(payload["exp"]),
    }


async def test_hs256_with_the_wrong_secret_is_unauthenticated() -> None:
    async with serving() as client:
        assert_unauthenticated(await client.call(SEARCH, hs256(claims(), OTHER_SECRET)))


async def test_tampered_payload_is_unauthenticated() -> None:
    header, _, signature = hs256(claims()).split(".")
    payload = b64(json.dumps(claims(sub=str(INACTIVE_USER + 100))).encode())
    async with serving() as client:
        assert_unauthenticated(await client.call(SEARCH, f"{header}.{payload}.{signature}"))


@pytest.mark.parametrize("algorithm", ["none", "None", "NONE"])
async def test_alg_none_is_refused(algorithm: str) -> None:
    token = forged({"alg": algorithm, "typ": "JWT"}, claims(), None)
    async with serving() as client:
        assert_unauthenticated(await client.call(SEARCH, token))


async def test_algorithms_outside_the_allow_list_are_refused(keys: Keys, tmp_path: Path) -> None:
    config = {"jwt_public_key_files": (write_pem(tmp_path, "rsa", keys.rsa.public_key()),)}
    with warnings.catch_warnings():
        # Signed with the configured secret itself, shorter than HS384/HS512 would like.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        tokens = [
            jwt.encode(claims(), SECRET, algorithm="HS512"),
            jwt.encode(claims(), SECRET, algorithm="HS384"),
        ]
    tokens += [signed(claims(), keys.rsa, "RS512"), signed(claims(), keys.rsa, "PS256")]
    async with serving(verifier(**config)) as client:
        for token in tokens:
            assert_unauthenticated(await client.call(SEARCH, token))


@pytest.mark.parametrize("with_secret", [True, False])
async def test_hs256_signed_with_the_rsa_public_key_is_refused(
    keys: Keys, tmp_path: Path, with_secret: bool
) -> None:
    """Algorithm confusion: the public key's PEM text used as the HMAC secret."""
    public_pem = pem(keys.rsa.public_key())
    token = forged({"alg": "HS256", "typ": "JWT"}, claims(), public_pem)
    # The forgery is well made: it verifies for anyone who would use that PEM as HMAC key.
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    assert signature == b64(expected)
    config = Config(
        jwt_secret=SECRET if with_secret else None,
        jwt_public_key_files=(write_pem(tmp_path, "rsa", keys.rsa.public_key()),),
    )
    async with serving(TokenVerifier.from_config(config)) as client:
        assert_unauthenticated(await client.call(SEARCH, token))
        # ...while an honest RS256 token from the same key is fine.
        assert (await client.call(SEARCH, signed(claims(), keys.rsa, "RS256"))).code == (
            grpc.StatusCode.OK
        )


async def test_a_secret_that_is_a_public_key_is_refused_at_start(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="public key"):
        verifier(jwt_secret=pem(keys.rsa.public_key()).decode())


# --- public keys and JWKS ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "algorithm"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA")]
)
async def test_good_asymmetric_tokens(
    keys: Keys, tmp_path: Path, name: str, algorithm: str
) -> None:
    files = tuple(
        write_pem(tmp_path, key_name, getattr(keys, key_name).public_key())
        for key_name in ("rsa", "ec", "ed")
    )
    async with serving(verifier(jwt_secret=None, jwt_public_key_files=files)) as client:
        outcome = await client.call(SEARCH, signed(claims(), getattr(keys, name), algorithm))
        assert outcome.code == grpc.StatusCode.OK
        assert outcome.principal is not None
        assert outcome.principal["user_id"] == ACTIVE_USER
        # With no secret configured, HS256 is refused outright.
        assert_unauthenticated(await client.call(SEARCH, hs256(claims())))


async def test_rs256_signed_by_another_key_is_refused(keys: Keys, tmp_path: Path) -> None:
    files = (write_pem(tmp_path, "rsa", keys.rsa.public_key()),)
    async with serving(verifier(jwt_public_key_files=files)) as client:
        assert_unauthenticated(await client.call(SEARCH, signed(claims(), keys.rsa_other, "RS256")))


async def test_algorithm_without_a_fitting_key_is_refused(keys: Keys, tmp_path: Path) -> None:
    files = (write_pem(tmp_path, "ec", keys.ec.public_key()),)
    async with serving(verifier(jwt_public_key_files=files)) as client:
        assert_unauthenticated(await client.call(SEARCH, signed(claims(), keys.rsa, "RS256")))
        assert_unauthenticated(await client.call(SEARCH, signed(claims(), keys.ed, "EdDSA")))


async def test_several_pem_keys_are_all_tried(keys: Keys, tmp_path: Path) -> None:
    files = (
        write_pem(tmp_path, "old", keys.rsa.public_key()),
        write_pem(tmp_path, "new", keys.rsa_other.public_key()),
    )
    async with serving(verifier(jwt_public_key_files=files)) as client:
        for key in (keys.rsa, keys.rsa_other):
            assert (await client.call(SEARCH, signed(claims(), key, "RS256"))).code == (
                grpc.StatusCode.OK
            )


def _to_jwk(public_key: Any) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        data = jwt.algorithms.OKPAlgorithm.to_jwk(public_key, as_dict=True)
    return dict(data)


def write_jwks(directory: Path, entries: Iterable[dict[str, Any]]) -> Path:
    path = directory / "jwks.json"
    path.write_text(json.dumps({"keys": list(entries)}))
    return path


async def test_jwks_picks_the_key_by_kid(keys: Keys, tmp_path: Path) -> None:
    jwks = write_jwks(
        tmp_path,
        [
            {**_to_jwk(keys.rsa.public_key()), "kid": "2024", "alg": "RS256", "use": "sig"},
            {**_to_jwk(keys.rsa_other.public_key()), "kid": "2025", "alg": "RS256"},
            {**_to_jwk(keys.ec.public_key()), "kid": "ec-1"},
        ],
    )
    async with serving(verifier(jwt_secret=None, jwt_jwks_file=jwks)) as client:

        async def code(token: str) -> grpc.StatusCode:
            return (await client.call(SEARCH, token)).code

        ok = grpc.StatusCode.OK
        refused = grpc.StatusCode.UNAUTHENTICATED
        # Rotation: both the old and the new key verify, each under its own kid.
        assert await code(signed(claims(), keys.rsa, "RS256", kid="2024")) == ok
        assert await code(signed(claims(), keys.rsa_other, "RS256", kid="2025")) == ok
        assert await code(signed(claims(), keys.ec, "ES256", kid="ec-1")) == ok
        # A kid selects that key alone: another key's signature does not count.
        assert await code(signed(claims(), keys.rsa_other, "RS256", kid="2024")) == refused
        assert await code(signed(claims(), keys.rsa, "RS256", kid="ec-1")) == refused
        # No kid (or one the JWKS does not know): every key fitting the algorithm is tried.
        assert await code(signed(claims(), keys.rsa_other, "RS256")) == ok
        assert await code(signed(claims(), keys.rsa, "RS256", kid="unknown")) == ok
        assert await code(signed(claims(), keys.ed, "EdDSA", kid="unknown")) == refused


async def test_kid_rotation_drops_the_removed_key(keys: Keys, tmp_path: Path) -> None:
    old = {**_to_jwk(keys.rsa.public_key()), "kid": "old"}
    new = {**_to_jwk(keys.rsa_other.public_key()), "kid": "new"}
    token = signed(claims(), keys.rsa, "RS256", kid="old")
    before = verifier(jwt_secret=None, jwt_jwks_file=write_jwks(tmp_path, [old, new]))
    assert before.verify(token).subject == str(ACTIVE_USER)
    after = verifier(jwt_secret=None, jwt_jwks_file=write_jwks(tmp_path, [new]))
    with pytest.raises(InvalidToken):
        after.verify(token)


# --- dates and claims ---------------------------------------------------------------------


# Payloads are built when each test runs, not at collection: times must be relative to now.
@pytest.mark.parametrize(
    ("make_payload", "accepted"),
    [
        (lambda: claims(ttl=-60), False),  # expired beyond the 10 s leeway
        (lambda: claims(ttl=-3), True),  # expired, within the leeway
        (lambda: claims(nbf=int(time.time()) + 3600), False),  # not valid yet
        (lambda: claims(nbf=int(time.time()) + 3), True),  # not valid yet, within the leeway
        (lambda: claims(nbf=int(time.time()) - 60), True),
        (lambda: claims(sub=None), False),  # no sub
        (lambda: claims(sub=""), False),
        (lambda: {"sub": "7", "iat": int(time.time())}, False),  # no exp
        (lambda: claims(exp="tomorrow"), False),
        (lambda: claims(sub=7), False),  # sub must be a string
    ],
)
async def test_dates_and_required_claims(
    make_payload: Callable[[], dict[str, Any]], accepted: bool
) -> None:
    async with serving() as client:
        outcome = await client.call(SEARCH, hs256(make_payload()))
    if accepted:
        assert outcome.code == grpc.StatusCode.OK
    else:
        assert_unauthenticated(outcome)


async def test_issuer_and_audience_when_configured() -> None:
    checked = verifier(jwt_issuer="https://id.umbra.example", jwt_audience="umbra-connections")
    right: dict[str, Any] = {"iss": "https://id.umbra.example", "aud": "umbra-connections"}
    async with serving(checked) as client:
        assert (await client.call(SEARCH, hs256(claims(**right)))).code == grpc.StatusCode.OK
        both = claims(iss=right["iss"], aud=["other", "umbra-connections"])
        assert (await client.call(SEARCH, hs256(both))).code == grpc.StatusCode.OK
        for wrong in (
            {"iss": "https://evil.example", "aud": right["aud"]},
            {"iss": "https://id.umbra.example.evil", "aud": right["aud"]},
            {"iss": right["iss"], "aud": "umbra-accounts"},
            {"aud": right["aud"]},  # missing iss
            {"iss": right["iss"]},  # missing aud
        ):
            assert_unauthenticated(await client.call(SEARCH, hs256(claims(**wrong))))


async def test_issuer_and_audience_unchecked_unless_configured() -> None:
    async with serving() as client:
        assert (await client.call(SEARCH, hs256(claims(iss="anyone")))).code == (grpc.StatusCode.OK)
        # A token addressed to some audience is not for a service that expects none.
        assert_unauthenticated(await client.call(SEARCH, hs256(claims(aud="elsewhere"))))


@pytest.mark.parametrize(
    "subject", ["0", "-1", "007", "+7", "7.0", " 7", "abc", "\uff11", "99999999999999999999"]
)
async def test_user_token_subject_must_be_a_user_id(subject: str) -> None:
    users = Users({int(subject) if subject.isascii() and subject.isdigit() else 1: True})
    async with serving(users=users) as client:
        assert_unauthenticated(await client.call(SEARCH, hs256(claims(sub=subject))))
    assert users.asked == []


async def test_largest_user_id_is_accepted() -> None:
    largest = 2**63 - 1
    async with serving(users=Users({largest: True})) as client:
        outcome = await client.call(SEARCH, hs256(claims(sub=str(largest))))
    assert outcome.code == grpc.StatusCode.OK
    assert outcome.principal is not None
    assert outcome.principal["user_id"] == largest


@pytest.mark.parametrize(
    ("scope_claims", "expected"),
    [
        ({"scope": "a b  c"}, ["a", "b", "c"]),
        ({"scp": ["a", "b"]}, ["a", "b"]),
        ({"scopes": ["c"], "scope": "a"}, ["a", "c"]),
        ({"scp": "a b"}, ["a", "b"]),
        ({"scp": [1, "a"]}, ["a"]),
        ({}, []),
    ],
)
async def test_scopes_from_scope_scp_or_scopes(
    scope_claims: dict[str, Any], expected: list[str]
) -> None:
    async with serving() as client:
        outcome = await client.call(SEARCH, hs256(claims(**scope_claims)))
    assert outcome.principal is not None
    assert outcome.principal["scopes"] == expected


# --- users and services -------------------------------------------------------------------


async def test_unknown_and_inactive_users_get_the_same_answer() -> None:
    users = Users()
    async with serving(users=users) as client:
        unknown = await client.call(SEARCH, hs256(claims(sub=str(UNKNOWN_USER))))
        inactive = await client.call(SEARCH, hs256(claims(sub=str(INACTIVE_USER))))
    assert unknown == inactive
    assert (unknown.code, unknown.reason, unknown.message) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        NOT_ACTIVE_MESSAGE,
    )
    assert users.asked == [UNKNOWN_USER, INACTIVE_USER]


async def test_account_service_needs_the_admin_scope() -> None:
    users = Users()
    async with serving(users=users) as client:
        outcome = await client.call(GET_USER, hs256(claims(scope="umbra.read")))
    assert (outcome.code, outcome.reason, outcome.message) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_SCOPE_REQUIRED",
        ADMIN_SCOPE_MESSAGE,
    )
    assert users.asked == []


@pytest.mark.parametrize(
    "scope_claims", [{"scope": f"other {ADMIN_SCOPE}"}, {"scp": [ADMIN_SCOPE]}]
)
async def test_service_token_calls_account_service_without_a_user_lookup(
    scope_claims: dict[str, Any],
) -> None:
    users = Users()
    async with serving(users=users) as client:
        outcome = await client.call(GET_USER, hs256(claims(sub="billing-backend", **scope_claims)))
    assert outcome.code == grpc.StatusCode.OK
    assert outcome.principal is not None
    assert outcome.principal["subject"] == "billing-backend"
    assert outcome.principal["user_id"] is None
    assert ADMIN_SCOPE in outcome.principal["scopes"]
    assert users.asked == []


async def test_service_token_may_not_call_connection_service() -> None:
    users = Users()
    async with serving(users=users) as client:
        # Even with a subject that happens to be an active user's id.
        for subject in ("billing-backend", str(ACTIVE_USER)):
            outcome = await client.call(SEARCH, hs256(claims(sub=subject, scope=ADMIN_SCOPE)))
            assert (outcome.code, outcome.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "USER_TOKEN_REQUIRED",
            )
    assert users.asked == []


async def test_store_down_is_unavailable_when_listed() -> None:
    class StoreDown(Exception):
        pass

    users = Users(error=StoreDown("connection refused to 10.0.0.5"))
    async with serving(users=users, unavailable=(StoreDown,)) as client:
        outcome = await client.call(SEARCH, hs256(claims()))
    assert (outcome.code, outcome.reason) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
    assert outcome.message is not None
    assert "10.0.0.5" not in outcome.message


# --- the principal while the call runs ----------------------------------------------------


async def test_principal_is_set_during_the_call_and_reset_after() -> None:
    probe = Probe()
    async with serving(probe=probe) as client:
        outcome = await client.call(SEARCH, hs256(claims()))
        assert outcome.principal is not None
        assert outcome.principal["subject"] == str(ACTIVE_USER)
        events = await client.watch(hs256(claims()))
    assert [event["user_id"] for event in events] == [ACTIVE_USER] * 3
    assert probe.after == [None, None]


async def test_caller_is_written_into_the_call_record() -> None:
    probe = Probe()
    async with serving(probe=probe) as client:
        await client.call(SEARCH, hs256(claims()))
        await client.call(SEARCH, hs256(claims(sub=str(INACTIVE_USER))))
        await client.call(GET_USER, hs256(claims(sub="billing-backend", scope=ADMIN_SCOPE)))
        await client.call(SEARCH)
        await client.call(HEALTH)
    assert [record.caller for record in probe.records] == [
        str(ACTIVE_USER),
        str(INACTIVE_USER),
        "billing-backend",
        None,
        None,
    ]


async def test_no_token_text_in_the_server_log(
    keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    files = (write_pem(tmp_path, "rsa", keys.rsa.public_key()),)
    tokens = [
        hs256(claims()),
        hs256(claims(ttl=-3600)),
        hs256(claims(), OTHER_SECRET),
        hs256(claims(sub=str(INACTIVE_USER))),
        hs256(claims(sub="not-a-user")),
        signed(claims(), keys.rsa_other, "RS256"),
        forged({"alg": "none"}, claims(), None),
        "not.a.token",
    ]
    async with serving(verifier(jwt_public_key_files=files)) as client:
        for token in tokens:
            await client.call(SEARCH, token)
    assert "ExpiredSignatureError" in caplog.text  # the reason is logged...
    for token in tokens:
        for part in token.split("."):
            if len(part) > 8:
                assert part not in caplog.text  # ...never the token
        assert token not in caplog.text


# --- the verifier on its own --------------------------------------------------------------


def test_cached_tokens_still_expire() -> None:
    now = [time.time()]
    cached = TokenVerifier(secret=SECRET, leeway=10, clock=lambda: now[0])
    token = hs256(claims(ttl=60))
    first = cached.verify(token)
    assert cached.verify(token) is first  # served from the cache
    now[0] = first.expires_at + 9
    assert cached.verify(token) is first
    now[0] = first.expires_at + 11
    with pytest.raises(InvalidToken, match="expired"):
        cached.verify(token)


def test_oversized_token_is_refused() -> None:
    with pytest.raises(InvalidToken, match="longer"):
        verifier().verify(hs256(claims(padding="x" * 9000)))


def test_mint_token_round_trip() -> None:
    token = mint_token(
        SECRET,
        subject="billing-backend",
        scopes=[ADMIN_SCOPE, "other"],
        ttl_seconds=120,
        issuer="umbra",
        audience="umbra-connections",
        now=time.time(),
    )
    checked = verifier(jwt_issuer="umbra", jwt_audience="umbra-connections")
    verified = checked.verify(token)
    assert verified.subject == "billing-backend"
    assert verified.scopes == {ADMIN_SCOPE, "other"}
    assert verified.expires_at - time.time() == pytest.approx(120, abs=2)
    user_token = jwt.decode(mint_token(SECRET, subject="7"), SECRET, algorithms=["HS256"])
    assert set(user_token) == {"sub", "iat", "exp"}


def test_mint_token_refuses_a_short_secret() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        mint_token("short", subject="7")


def test_expired_minted_token_is_refused() -> None:
    token = mint_token(SECRET, subject="7", ttl_seconds=60, now=time.time() - 3600)
    with pytest.raises(InvalidToken, match="expired"):
        verifier().verify(token)


# --- configuration ------------------------------------------------------------------------


def test_config_needs_some_key() -> None:
    with pytest.raises(ConfigError, match="no JWT key"):
        TokenVerifier.from_config(Config())


def test_config_refuses_a_short_secret() -> None:
    with pytest.raises(ConfigError, match="UMBRA_JWT_SECRET"):
        TokenVerifier.from_config(Config(jwt_secret="too-short"))


def test_config_refuses_weak_or_wrong_key_files(tmp_path: Path, keys: Keys) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (refused)
    private = tmp_path / "private.pem"
    private.write_bytes(
        keys.ec.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    for path, message in [
        (write_pem(tmp_path, "weak", weak.public_key()), "2048 bits"),
        (write_pem(tmp_path, "p384", p384), "P-256"),
        (private, "PEM public key"),
        (tmp_path / "missing.pem", "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=message) as raised:
            TokenVerifier.from_config(Config(jwt_public_key_files=(path,)))
        assert "UMBRA_JWT_PUBLIC_KEY_FILES" in str(raised.value)


def test_config_refuses_bad_jwks(tmp_path: Path, keys: Keys) -> None:
    private = jwt.algorithms.ECAlgorithm.to_jwk(keys.ec, as_dict=True)
    cases: list[tuple[Any, str]] = [
        ({"keys": [{"kty": "oct", "k": b64(SECRET.encode()), "kid": "s"}]}, "symmetric"),
        ({"keys": [{**private, "kid": "p"}]}, "private key"),
        ({"keys": []}, "no usable"),
        ({"keys": [{**_to_jwk(keys.rsa.public_key()), "alg": "RS512"}]}, "no usable"),
        ({"nokeys": 1}, "keys"),
        (
            {
                "keys": [
                    {**_to_jwk(keys.rsa.public_key()), "kid": "same"},
                    {**_to_jwk(keys.rsa_other.public_key()), "kid": "same"},
                ]
            },
            "twice",
        ),
    ]
    for document, message in cases:
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps(document))
        with pytest.raises(ConfigError, match=message):
            TokenVerifier.from_config(Config(jwt_jwks_file=path))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="UMBRA_JWT_JWKS_FILE"):
        TokenVerifier.from_config(Config(jwt_jwks_file=path))


def test_jwks_skips_encryption_keys(keys: Keys) -> None:
    parsed = parse_jwks(
        {
            "keys": [
                {**_to_jwk(keys.rsa.public_key()), "kid": "enc", "use": "enc"},
                {**_to_jwk(keys.ed.public_key()), "kid": "sig"},
            ]
        }
    )
    assert [(key.kid, key.algorithm) for key in parsed] == [("sig", "EdDSA")]


def test_load_public_key_accepts_a_certificate(keys: Keys) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(keys.ec.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(keys.ec, hashes.SHA256())
    )
    key = load_public_key(certificate.public_bytes(serialization.Encoding.PEM))
    assert pem(key) == pem(keys.ec.public_key())


# --- an abandoned stream ------------------------------------------------------------------


class FakeContext:
    """Just enough of a servicer context for a stream that is never aborted."""

    def code(self) -> None:
        return None


class Details:
    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata: tuple[tuple[str, str | bytes], ...] = metadata


async def test_abandoned_stream_is_closed_from_another_context() -> None:
    """grpc.aio leaves a stream suspended when its client goes away mid-write; the event loop
    closes it later from another task. The principal reset must not blow up there, and the
    handler's own generator must be closed too."""
    closed: list[bool] = []

    async def events(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            while True:
                yield _principal_body()
        finally:
            closed.append(True)

    async def continuation(details: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_stream_rpc_method_handler(events)

    auth = AuthInterceptor(verifier(), Users().is_active)
    metadata = (("authorization", f"Bearer {hs256(claims())}"),)
    handler = await auth.intercept_service(continuation, Details(WATCH, metadata))
    assert handler is not None
    stream = aio_unary_stream(handler)(b"", FakeContext())

    async def first() -> dict[str, Any]:
        return dict(json.loads(await anext(stream)))

    assert (await asyncio.create_task(first()))["user_id"] == ACTIVE_USER
    await asyncio.create_task(stream.aclose(), context=contextvars.Context())
    assert closed == [True]
    assert current_principal.get() is None
