"""The NOTIFY contract: every channel the service sends on, and what its payloads hold.

A NOTIFY sent inside a writing transaction reaches every process's listener
(`umbra_grpc.storage.listener`) when that transaction commits. Payloads carry ids only
(PostgreSQL caps them below 8,000 bytes), and no process trusts one (SPEC 10.10): any role
connected to the database may NOTIFY any channel, so readers parse defensively and look the
facts up again.

- `umbra_requests`: something happened to a connection request. JSON
  `{"kind", "request_id", "receiver_id", "sender_id"}`, kind one of `EventKind`. Written by
  the statements of Respond and CancelRequest (`storage.requests`), BlockUser's sweep
  (`storage.relationships`), all through `request_event`, and by the `umbra_send_request`
  function of the migrations (kind `received`). Migrations are history and keep their SQL:
  a change here must be matched by a new migration that redefines the function.
- `umbra_users`: a user changed (the caller cache drops them, their streams re-check that
  they are active). Payload: the user id in decimal (`user_changed_payload`).
- `umbra_outbox`: a push is due; the worker wakes. Empty payload (`WAKE_OUTBOX`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal, get_args

REQUESTS_CHANNEL = "umbra_requests"
USERS_CHANNEL = "umbra_users"
OUTBOX_CHANNEL = "umbra_outbox"

EventKind = Literal["received", "cancelled", "resolved"]
_KINDS: frozenset[str] = frozenset(get_args(EventKind))

# SQL: wakes the outbox worker (one NOTIFY a statement, whatever the number of rows).
WAKE_OUTBOX = f"pg_notify('{OUTBOX_CHANNEL}', '')"


def request_event(kind: str, source: str) -> str:
    """SQL: the `umbra_requests` NOTIFY for the request row `source` (an alias with id,
    receiver_id and sender_id); `kind` is SQL too, a quoted kind or an expression."""
    return (
        f"pg_notify('{REQUESTS_CHANNEL}', json_build_object("
        f"'kind', {kind}, 'request_id', {source}.id, 'receiver_id', {source}.receiver_id, "
        f"'sender_id', {source}.sender_id)::text)"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class RequestNotice:
    """An `umbra_requests` payload, parsed. Its receiver is a hint for skipping, never who
    is told: the request's row says that."""

    kind: EventKind
    request_id: int
    receiver_hint: int


def parse_request_notice(payload: str) -> RequestNotice | None:
    """The notice in an `umbra_requests` payload; None when it is malformed."""
    try:
        data = json.loads(payload)
        kind = data["kind"]
        if kind not in _KINDS:
            return None
        return RequestNotice(kind, int(data["request_id"]), int(data["receiver_id"]))
    except (ValueError, KeyError, TypeError):
        return None


def user_changed_payload(user_id: int) -> str:
    """The `umbra_users` payload naming a user."""
    return str(user_id)


def parse_user_changed(payload: str) -> int:
    """The user an `umbra_users` payload names (ValueError when it names none)."""
    return int(payload)
