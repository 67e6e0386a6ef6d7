"""`UmbraClient`: the typed async client of `umbra.connections.v1.ConnectionService`."""

from __future__ import annotations

import copy
import enum
import json
import re
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import grpc
from google.protobuf.message import Message

from umbra_grpc.client.rpc import Rpc, read, rpcs_of, service_config, write
from umbra_grpc.client.watch import IncomingWatch
from umbra_grpc.pb import connections_pb2, connections_pb2_grpc

try:  # the caller's trace travels with each call when OpenTelemetry is there
    from opentelemetry import propagate
except ImportError:  # pragma: no cover - the tracing extra is not installed
    propagate = None  # type: ignore[assignment]

pb = connections_pb2
R = TypeVar("R", bound=Message)
Token = str | Callable[[], str]

IDEMPOTENCY_KEY_HEADER: Final = "idempotency-key"
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_TIMEOUT: Final = 10.0
# Unary retries: gRPC's own backoff between attempts (jittered by gRPC), all within the deadline.
RETRY_INITIAL_BACKOFF: Final = 0.1
RETRY_MAX_BACKOFF: Final = 1.0
WATCH_INITIAL_BACKOFF: Final = 0.1
# Three quiet intervals of the server's default heartbeat (UMBRA_WATCH_HEARTBEAT_SECONDS=15).
DEFAULT_STALL_TIMEOUT: Final = 45.0


class _Keep(enum.Enum):
    """`with_options()` leaves this setting as it is."""

    KEEP = enum.auto()


class UmbraClient:
    """Typed async client of ConnectionService: one method per RPC, in snake_case.

    `token` is the bearer token, or a zero-argument callable returning one, called for every
    call (and every reconnect of a watch), so tokens can rotate. Without `credentials` the
    channel is plaintext. Each method takes the request's fields as keyword arguments and
    returns the response message; errors are `grpc.aio.AioRpcError` (`error_reason(error)`
    reads the service's reason). Every call gets `timeout` seconds (None: no deadline).
    When OpenTelemetry is installed, the current trace context goes with each call (W3C
    `traceparent` metadata), so the server's spans join the caller's trace.

    Retries (by the channel's service config, within the deadline): calls are retried on
    UNAVAILABLE, up to `retry_attempts` attempts. Every write carries an `idempotency-key`
    header (a fresh uuid per call, the same on gRPC's retries of it), which the server honours
    (SPEC 11): a retried write is answered with the first attempt's outcome and never writes
    twice. `write_retries=False` retries reads only (for a server that does not honour
    keys). `max_backoff` caps the channel's reconnect backoff and `watch_incoming()`'s.
    """

    # One line per unary RPC; tests/client/test_client.py fails when ConnectionService has
    # an RPC missing here. WatchIncomingRequests is `watch_incoming()`.
    search = read(pb.SearchRequest, pb.SearchResponse)
    send_request = write(pb.SendRequestRequest, pb.SendRequestResponse)
    list_incoming_requests = read(pb.ListIncomingRequestsRequest, pb.ListIncomingRequestsResponse)
    list_outgoing_requests = read(pb.ListOutgoingRequestsRequest, pb.ListOutgoingRequestsResponse)
    respond = write(pb.RespondRequest, pb.RespondResponse)
    cancel_request = write(pb.CancelRequestRequest, pb.CancelRequestResponse)
    list_connections = read(pb.ListConnectionsRequest, pb.ListConnectionsResponse)
    get_connection = read(pb.GetConnectionRequest, pb.GetConnectionResponse)
    get_shared_profile = read(pb.GetSharedProfileRequest, pb.GetSharedProfileResponse)
    update_sharing_overrides = write(
        pb.UpdateSharingOverridesRequest, pb.UpdateSharingOverridesResponse
    )
    remove_connection = write(pb.RemoveConnectionRequest, pb.RemoveConnectionResponse)
    get_contact = read(pb.GetContactRequest, pb.GetContactResponse)
    list_notifications = read(pb.ListNotificationsRequest, pb.ListNotificationsResponse)
    mark_notifications_read = write(
        pb.MarkNotificationsReadRequest, pb.MarkNotificationsReadResponse
    )
    block_user = write(pb.BlockUserRequest, pb.BlockUserResponse)
    unblock_user = write(pb.UnblockUserRequest, pb.UnblockUserResponse)
    list_blocked_users = read(pb.ListBlockedUsersRequest, pb.ListBlockedUsersResponse)
    get_relationships = read(pb.GetRelationshipsRequest, pb.GetRelationshipsResponse)

    def __init__(
        self,
        target: str,
        token: Token,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        write_retries: bool = True,
        retry_attempts: int = 4,
        max_backoff: float = 10.0,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._token: Callable[[], str] = (lambda: token) if isinstance(token, str) else token
        self._token_renews = not isinstance(token, str)
        self._timeout = timeout
        self._idempotency_key: str | None = None
        self._max_backoff = max_backoff
        config = service_config(
            rpcs_of(UmbraClient),
            write_retries=write_retries,
            attempts=retry_attempts,
            initial_backoff=RETRY_INITIAL_BACKOFF,
            max_backoff=RETRY_MAX_BACKOFF,
        )
        options: list[tuple[str, Any]] = [
            ("grpc.service_config", json.dumps(config)),
            ("grpc.enable_retries", 1),
            # A dead connection under a long watch is noticed (the server allows a ping
            # every 10 s).
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000)),
            *channel_options,
        ]
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._stub = connections_pb2_grpc.ConnectionServiceStub(self._channel)

    def with_options(
        self, *, timeout: float | _Keep | None = _Keep.KEEP, idempotency_key: str | None = None
    ) -> Self:
        """This client (same channel) with another deadline (None: none) and, for ONE write,
        a key of the caller's: retrying that write with the same key (after a crash, say) is then
        answered by the server with the first outcome, for 24 hours.

        Close the original client, not the copy: both hold one channel.
        """
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise ValueError("an idempotency key is 1-64 characters of A-Z a-z 0-9 _ -")
        changed = copy.copy(self)
        if not isinstance(timeout, _Keep):
            changed._timeout = timeout
        changed._idempotency_key = idempotency_key
        return changed

    def watch_incoming(
        self, *, stall_timeout: float | None = DEFAULT_STALL_TIMEOUT
    ) -> IncomingWatch:
        """The caller's incoming requests as they come, across reconnects, each event once
        (see `umbra_grpc.client.watch`). Keep `stall_timeout` above the server's heartbeat
        interval; None waits forever on a silent stream."""

        def open_stream() -> grpc.aio.UnaryStreamCall[
            pb.WatchIncomingRequestsRequest, pb.WatchIncomingRequestsResponse
        ]:
            return self._stub.WatchIncomingRequests(
                pb.WatchIncomingRequestsRequest(), metadata=self._metadata(None)
            )

        return IncomingWatch(
            open_stream,
            token_renews=self._token_renews,
            initial_backoff=WATCH_INITIAL_BACKOFF,
            max_backoff=self._max_backoff,
            stall_timeout=stall_timeout,
        )

    async def close(self) -> None:
        """Closes the channel (calls in progress are cancelled)."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _metadata(self, idempotency_key: str | None) -> tuple[tuple[str, str], ...]:
        metadata = [("authorization", f"Bearer {self._token()}")]
        if idempotency_key is not None:
            metadata.append((IDEMPOTENCY_KEY_HEADER, idempotency_key))
        if propagate is not None:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata.extend(carrier.items())
        return tuple(metadata)

    async def _unary(self, rpc: Rpc[Any, R], request: Message) -> R:
        key = (self._idempotency_key or str(uuid.uuid4())) if rpc.write else None
        method = getattr(self._stub, rpc.name)
        response: R = await method(request, metadata=self._metadata(key), timeout=self._timeout)
        return response
