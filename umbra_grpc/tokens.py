"""Bearer tokens: verifying them (`TokenVerifier`), and minting HS256 ones for the CLI's
`token` command and for tests (`mint_token`).

A user token's subject is the user id; a token with the `umbra.admin` scope stands for a
backend service and its subject is the service's name. What a verified token may call is
the auth interceptor's business (`umbra_grpc.interceptors.auth`).

Tokens (`TokenVerifier`):

- Algorithms are an allow-list: HS256 with the shared secret (UMBRA_JWT_SECRET), RS256, ES256
  (P-256) and EdDSA with public keys from PEM files (UMBRA_JWT_PUBLIC_KEY_FILES) or a JWKS file
  (UMBRA_JWT_JWKS_FILE). Anything else, `none` included, is refused.
- No algorithm confusion: an HS256 token is only ever checked against the configured secret,
  and an asymmetric token only against public keys whose type fits its algorithm. A public key
  is never used as an HMAC secret; a secret that looks like a PEM key is refused at start-up.
- Key choice: a `kid` naming a JWKS key selects that key alone (rotation: publish the new key
  beside the old one). Without a `kid`, or with one the JWKS does not know, every configured
  public key fitting the algorithm is tried (PEM files carry no `kid`).
- Claims: `exp` and `sub` are required, `nbf` is checked whenever present, `iss` and `aud`
  when configured, with UMBRA_JWT_LEEWAY_SECONDS of leeway. A token carrying `aud` when no
  audience is configured is refused (PyJWT's rule): it was meant for someone else.
- Verified tokens are cached by their exact text until they expire, since checking a signature
  costs more than a trivial RPC and callers reuse one token for many calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import HMACAlgorithm

from umbra_grpc.config import Config, ConfigError

logger = logging.getLogger(__name__)

HMAC_ALGORITHM: Final = "HS256"
ASYMMETRIC_ALGORITHMS: Final = frozenset({"RS256", "ES256", "EdDSA"})
MIN_SECRET_BYTES: Final = 32
MIN_RSA_BITS: Final = 2048
MAX_TOKEN_CHARS: Final = 8192
DEFAULT_CACHE_SIZE: Final = 10_000

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


class InvalidToken(Exception):
    """A bearer token was refused; the message says why, for the server log only."""


@dataclasses.dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The claims this service uses from a token whose signature and dates checked out."""

    subject: str
    scopes: frozenset[str]
    expires_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class JsonWebKey:
    """One signing key of a JWKS: its `kid` (if any), its algorithm and the public key."""

    kid: str | None
    algorithm: str
    key: PublicKey


class TokenVerifier:
    """Checks bearer JWTs against the configured secret and public keys (see module doc).

    `clock` (wall-clock seconds) only decides when a cached token expires; PyJWT checks the
    dates of a fresh token against the real time.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_keys: Iterable[PublicKey] = (),
        jwks: Iterable[JsonWebKey] = (),
        issuer: str | None = None,
        audience: str | None = None,
        leeway: float = 10.0,
        clock: Callable[[], float] = time.time,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._secret = _checked_secret(secret) if secret is not None else None
        self._by_algorithm: dict[str, list[PublicKey]] = {}
        self._by_kid: dict[str, JsonWebKey] = {}
        for key in public_keys:
            self._by_algorithm.setdefault(algorithm_for(key), []).append(key)
        for entry in jwks:
            if algorithm_for(entry.key) != entry.algorithm:
                raise ValueError(
                    f"UMBRA_JWT_JWKS_FILE: key {entry.kid!r} does not fit {entry.algorithm}"
                )
            if entry.kid is not None:
                if entry.kid in self._by_kid:
                    raise ValueError(f"UMBRA_JWT_JWKS_FILE: key id {entry.kid!r} appears twice")
                self._by_kid[entry.kid] = entry
            self._by_algorithm.setdefault(entry.algorithm, []).append(entry.key)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._clock = clock
        self._cache_size = cache_size
        self._cache: dict[str, VerifiedToken] = {}

    @classmethod
    def from_config(
        cls, config: Config, *, clock: Callable[[], float] = time.time
    ) -> TokenVerifier:
        """The verifier for `UMBRA_JWT_*`; `ConfigError` naming the variable if unusable."""
        public_keys: list[PublicKey] = []
        for path in config.jwt_public_key_files:
            try:
                public_keys.append(load_public_key(path.read_bytes()))
            except OSError as error:
                raise ConfigError(
                    f"UMBRA_JWT_PUBLIC_KEY_FILES: cannot read {path}: {error.strerror}"
                ) from None
            except ValueError as error:
                raise ConfigError(f"UMBRA_JWT_PUBLIC_KEY_FILES: {path}: {error}") from None
        jwks: tuple[JsonWebKey, ...] = ()
        if config.jwt_jwks_file is not None:
            path = config.jwt_jwks_file
            try:
                jwks = parse_jwks(json.loads(path.read_bytes()))
            except OSError as error:
                raise ConfigError(
                    f"UMBRA_JWT_JWKS_FILE: cannot read {path}: {error.strerror}"
                ) from None
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ConfigError(f"UMBRA_JWT_JWKS_FILE: {path}: {error}") from None
        if config.jwt_secret is None and not public_keys and not jwks:
            raise ConfigError(
                "no JWT key configured: set UMBRA_JWT_SECRET, UMBRA_JWT_PUBLIC_KEY_FILES "
                "or UMBRA_JWT_JWKS_FILE"
            )
        try:
            return cls(
                secret=config.jwt_secret,
                public_keys=public_keys,
                jwks=jwks,
                issuer=config.jwt_issuer,
                audience=config.jwt_audience,
                leeway=config.jwt_leeway_seconds,
                clock=clock,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def verify(self, token: str) -> VerifiedToken:
        """The token's subject, scopes and expiry; `InvalidToken` if it is refused."""
        cached = self._cache.get(token)
        if cached is not None:
            if self._clock() < cached.expires_at + self._leeway:
                return cached
            del self._cache[token]
            raise InvalidToken("ExpiredSignatureError: Signature has expired")
        verified = self._decode(token)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[token] = verified
        return verified

    def _decode(self, token: str) -> VerifiedToken:
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken(f"token longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidToken(_describe(error)) from None
        algorithm = header.get("alg")
        keys = self._keys_for(algorithm, header.get("kid"))
        if not keys:
            raise InvalidToken(f"no key configured for algorithm {_short(algorithm)}")
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[cast(str, algorithm)],
                    options={"require": ["exp", "sub"], "enforce_minimum_key_length": True},
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=self._leeway,
                )
            except jwt.InvalidSignatureError:
                continue  # the next key may be the one (rotation)
            except (jwt.PyJWTError, ValueError, TypeError) as error:
                raise InvalidToken(_describe(error)) from None
            return _verified(claims)
        raise InvalidToken(
            f"InvalidSignatureError: no configured {algorithm} key verifies the signature "
            f"({len(keys)} tried)"
        )

    def _keys_for(self, algorithm: object, kid: object) -> list[Any]:
        if algorithm == HMAC_ALGORITHM:
            return [self._secret] if self._secret is not None else []
        if not isinstance(algorithm, str) or algorithm not in ASYMMETRIC_ALGORITHMS:
            raise InvalidToken(f"algorithm {_short(algorithm)} is not allowed")
        named = self._by_kid.get(kid) if isinstance(kid, str) else None
        if named is not None:
            return [named.key] if named.algorithm == algorithm else []
        return list(self._by_algorithm.get(algorithm, ()))


def load_public_key(data: bytes) -> PublicKey:
    """A PEM public key (or the key of a PEM certificate) of a type this service accepts."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ValueError(f"not a PEM public key or certificate ({error})") from None
    algorithm_for(key)
    return cast(PublicKey, key)


def parse_jwks(document: object) -> tuple[JsonWebKey, ...]:
    """The signing keys of a JWKS document (RFC 7517); ValueError if none is usable.

    Keys for algorithms outside the allow-list and keys marked `use: enc` are skipped with a
    warning; symmetric (`oct`) and private keys are refused outright.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('expected a JSON object with a "keys" list')
    keys: list[JsonWebKey] = []
    for index, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict):
            raise ValueError(f"key {index} is not a JSON object")
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"key {index}: kid must be a string")
        if entry.get("kty") == "oct":
            raise ValueError(f"key {index}: symmetric keys are not accepted from a JWKS")
        if entry.get("use", "sig") != "sig":
            logger.warning("JWKS key %d (kid %r) is not for signatures; skipped", index, kid)
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError as error:
            raise ValueError(f"key {index}: {error}") from None
        if jwk.algorithm_name not in ASYMMETRIC_ALGORITHMS:
            logger.warning(
                "JWKS key %d (kid %r) uses %s, which is not allowed; skipped",
                index,
                kid,
                jwk.algorithm_name,
            )
            continue
        key = jwk.key
        try:
            algorithm = algorithm_for(key)
        except ValueError as error:
            raise ValueError(f"key {index}: {error}") from None
        if algorithm != jwk.algorithm_name:
            raise ValueError(f"key {index}: a {algorithm} key marked {jwk.algorithm_name}")
        keys.append(JsonWebKey(kid, algorithm, cast(PublicKey, key)))
    if not keys:
        raise ValueError("the JWKS holds no usable signing key")
    return tuple(keys)


def algorithm_for(key: object) -> str:
    """The one algorithm a public key may verify; ValueError for keys this service refuses."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits, got {key.key_size}")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"EC keys must be on P-256 (ES256), got {key.curve.name}")
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "EdDSA"
    if isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise ValueError("a private key where a public key belongs; publish only public keys")
    raise ValueError(f"unsupported key type {type(key).__name__}")


def _checked_secret(secret: str) -> bytes:
    data = secret.encode()
    if len(data) < MIN_SECRET_BYTES:
        raise ValueError(f"UMBRA_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
    try:
        # Refuses PEM and SSH public keys: such a "secret" is public, and the classic
        # algorithm-confusion attack signs HS256 tokens with exactly that text.
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(data)
    except jwt.InvalidKeyError:
        raise ValueError("UMBRA_JWT_SECRET looks like a public key; use a random secret") from None
    return data


def _verified(claims: dict[str, Any]) -> VerifiedToken:
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("the subject (sub) is empty")
    return VerifiedToken(subject, _scopes(claims), float(claims["exp"]))


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Scopes from `scope` (space-separated, RFC 8693) or the `scp` / `scopes` lists."""
    found: set[str] = set()
    for name in ("scope", "scp", "scopes"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(item for item in value if isinstance(item, str))
    return frozenset(found)


def _describe(error: Exception) -> str:
    # PyJWT's messages name the check that failed, never the token itself.
    return f"{type(error).__name__}: {error}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def mint_token(
    secret: str,
    *,
    subject: str,
    scopes: Iterable[str] = (),
    ttl_seconds: float = 3600,
    issuer: str | None = None,
    audience: str | None = None,
    now: float | None = None,
) -> str:
    """A JWT signed with `secret` (HS256): `sub`, `iat`, `exp`, and `scope`/`iss`/`aud` if given."""
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
    if not subject:
        raise ValueError("the subject must not be empty")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": subject,
        "iat": int(issued),
        "exp": int(issued + ttl_seconds),
    }
    scope = " ".join(scopes)
    if scope:
        claims["scope"] = scope
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
