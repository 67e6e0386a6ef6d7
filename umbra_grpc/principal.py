"""Who is calling: set by the auth interceptor, read by whatever runs inside it.

A context variable rather than call metadata, so that inner interceptors and handlers learn
the verified caller without re-reading the token and without knowing the auth interceptor.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar

ADMIN_SCOPE = "umbra.admin"


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """A verified bearer token: an end user (`user_id` set) or a backend service."""

    subject: str
    user_id: int | None
    scopes: frozenset[str]
    expires_at: float

    @property
    def is_service(self) -> bool:
        """A token with the admin scope stands for a backend service, not a user."""
        return ADMIN_SCOPE in self.scopes


current_principal: ContextVar[Principal | None] = ContextVar("umbra_principal", default=None)
