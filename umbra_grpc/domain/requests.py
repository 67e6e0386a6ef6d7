"""Connection request rules: search, send, list, respond, cancel.

The rules are the router's (SPEC 3.1), with its races closed by the database (see
`umbra_grpc.storage.requests`), and SPEC 11's: blocks (a user who blocks the caller is,
to the caller, nobody), expiry after `ttl` (compared at read time by every query), and
the sender's note, which only the receiver's views carry. Each method is one statement
(SPEC 8 budgets): Search and the lists as autocommit reads; SendRequest (one call of a
database function that locks, checks and writes), Respond and CancelRequest in BEGIN ...
COMMIT, 3 on the wire, so that a call cancelled while its statement waits on a lock rolls
back (see `Database.transaction`).
"""

from __future__ import annotations

import datetime as dt

from umbra_grpc.domain.errors import (
    AlreadyConnected,
    ConnectionsDisabled,
    RequestNotPending,
    RequestPending,
    ResendTooSoon,
    SelfRequest,
    SenderInactive,
    TooManyPending,
    UserBlocked,
    UserNotFound,
)
from umbra_grpc.domain.handles import normalize_handle
from umbra_grpc.domain.ids import check_id
from umbra_grpc.domain.pages import Page, PageTokens
from umbra_grpc.domain.text import clean_text
from umbra_grpc.records import ConnectionView, RequestView
from umbra_grpc.storage import requests as store
from umbra_grpc.storage.database import Database

DEFAULT_PAGE_SIZE = 20
MAX_MESSAGE = 280


class Requests:
    """The request half of ConnectionService."""

    def __init__(
        self,
        db: Database,
        pages: PageTokens,
        *,
        cap: int,
        window: dt.timedelta,
        cooldown: dt.timedelta,
        ttl: dt.timedelta,
    ) -> None:
        self._db = db
        self._pages = pages
        self._cap = cap
        self._window = window
        self._cooldown = cooldown
        self._ttl = ttl

    async def search(self, caller: int, umbral_name: str) -> bool:
        """Whether `caller` could send a request to `umbral_name` (one answer for all refusals)."""
        handle = normalize_handle(umbral_name)
        return await self._db.read(lambda conn: store.search(conn, caller=caller, handle=handle))

    async def send(
        self, caller: int, umbral_name: str, message: str, ip: str | None
    ) -> RequestView:
        """Sends a request; refusals in the router's order (SPEC 3.1), except that a caller
        who has not opted in hears only that, whatever the handle (SPEC 10.2). A user who
        blocks the caller is not found; one the caller blocks is USER_BLOCKED (SPEC 11)."""
        handle = normalize_handle(umbral_name)
        note = clean_text(message, "message", limit=MAX_MESSAGE) if message else None

        # The database writes only when every check below would pass; it returns the facts
        # so that the refusal is chosen here.
        facts = await self._db.transaction(
            lambda conn: store.send(
                conn,
                caller=caller,
                handle=handle,
                cap=self._cap,
                window=self._window,
                cooldown=self._cooldown,
                ttl=self._ttl,
                note=note,
                ip=ip,
            ),
            constraint_errors={
                store.PENDING_PAIR_INDEX: RequestPending,
                store.CONNECTION_PAIR: AlreadyConnected,
            },
        )
        if facts is None:
            raise UserNotFound
        if not facts.caller_accepts:
            raise ConnectionsDisabled
        if facts.target_id is None or not facts.target_active:
            raise UserNotFound
        if facts.target_id == caller:
            raise SelfRequest
        if not facts.target_accepts:
            raise UserNotFound
        if facts.blocked:
            raise UserBlocked
        if facts.connected:
            raise AlreadyConnected
        if facts.pending:
            raise RequestPending
        if facts.resend_wait is not None:
            raise ResendTooSoon(retry_after=facts.resend_wait)
        if facts.request is None:
            raise TooManyPending
        return facts.request

    async def pending(
        self, caller: int, *, incoming: bool, size: int, token: str
    ) -> Page[RequestView]:
        """The caller's pending incoming or outgoing requests, newest first."""
        return await self._pages.page(
            "requests.incoming" if incoming else "requests.outgoing",
            caller,
            size=size,
            default=DEFAULT_PAGE_SIZE,
            token=token,
            fetch=lambda after, limit: self._db.read(
                lambda conn: store.pending_page(
                    conn, caller=caller, incoming=incoming, ttl=self._ttl, after=after, limit=limit
                )
            ),
        )

    async def respond(
        self, caller: int, request_id: int, *, accept: bool, ip: str | None
    ) -> tuple[RequestView, ConnectionView | None]:
        """Accepts or rejects a pending request sent to the caller."""
        check_id(request_id, "request_id")
        resolved = await self._db.transaction(
            lambda conn: store.respond(
                conn, caller=caller, request_id=request_id, accept=accept, ttl=self._ttl, ip=ip
            ),
            constraint_errors={store.CONNECTION_PAIR: AlreadyConnected},
        )
        if resolved is None:
            raise RequestNotPending
        request = resolved.request
        if accept and request.status != "accepted":
            raise SenderInactive
        link = resolved.link
        if link is None:
            return request, None
        connection = ConnectionView(
            id=link.id,
            connected_user_id=link.connected_user_id,
            connected_name=request.sender_name,
            connected_preferred=request.sender_preferred,
            person_id=link.person_id,
            create_time=link.created_at,
        )
        return request, connection

    async def cancel(self, caller: int, request_id: int, ip: str | None) -> RequestView:
        """Withdraws a pending request the caller sent, with its notification and unsent push.

        The request keeps counting toward the receiver's cap until its window ends, and the
        caller may not send to the same receiver again for the resend cooldown (SPEC 10.3).
        """
        check_id(request_id, "request_id")
        request = await self._db.transaction(
            lambda conn: store.cancel(
                conn, caller=caller, request_id=request_id, ttl=self._ttl, ip=ip
            )
        )
        if request is None:
            raise RequestNotPending
        return request
