"""Minting HS256 bearer tokens, for the CLI's `token` command and for tests.

A user token's subject is the user id; a token with the `umbra.admin` scope stands for a
backend service and its subject is the service's name (see `interceptors.auth`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import jwt

MIN_SECRET_BYTES = 32


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
