"""ConnectionService servicer: protobuf in, one domain call, protobuf out."""

from __future__ import annotations

from typing import Any

import grpc

from umbra_grpc.api import caller, convert
from umbra_grpc.api.idempotency import idempotent
from umbra_grpc.domain.connections import Connections
from umbra_grpc.domain.errors import InvalidField
from umbra_grpc.domain.idempotency import IdempotentWrites
from umbra_grpc.domain.notifications import Notifications
from umbra_grpc.domain.relationships import Relationships
from umbra_grpc.domain.requests import Requests
from umbra_grpc.domain.watch import Watching
from umbra_grpc.pb import connections_pb2 as pb
from umbra_grpc.pb import connections_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
_ACTIONS = {pb.RespondRequest.ACTION_ACCEPT: True, pb.RespondRequest.ACTION_REJECT: False}


class ConnectionServicer(connections_pb2_grpc.ConnectionServiceServicer):
    """The end users' API; the caller is the token's user (checked by auth). Every write RPC
    honours an `idempotency-key` header (`umbra_grpc.api.idempotency`)."""

    def __init__(
        self,
        requests: Requests,
        connections: Connections,
        notifications: Notifications,
        watching: Watching,
        relationships: Relationships,
        idempotent_writes: IdempotentWrites,
    ) -> None:
        self._requests = requests
        self._connections = connections
        self._notifications = notifications
        self._watching = watching
        self._relationships = relationships
        self.idempotent_writes = idempotent_writes

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        """found=false alike for every reason a request could not be sent."""
        found = await self._requests.search(caller.user_id(), request.umbral_name)
        return pb.SearchResponse(found=found)

    @idempotent(pb.SendRequestResponse)
    async def SendRequest(
        self, request: pb.SendRequestRequest, context: Context
    ) -> pb.SendRequestResponse:
        """Sends a connection request to the user with the given handle."""
        sent = await self._requests.send(
            caller.user_id(), request.umbral_name, request.message, caller.client_ip()
        )
        response = pb.SendRequestResponse()
        convert.fill_request(response.request, sent)
        return response

    async def ListIncomingRequests(
        self, request: pb.ListIncomingRequestsRequest, context: Context
    ) -> pb.ListIncomingRequestsResponse:
        """The caller's pending incoming requests, newest first."""
        page = await self._requests.pending(
            caller.user_id(), incoming=True, size=request.page_size, token=request.page_token
        )
        response = pb.ListIncomingRequestsResponse(next_page_token=page.next_page_token)
        for item in page.items:
            convert.fill_request(response.requests.add(), item)
        return response

    async def ListOutgoingRequests(
        self, request: pb.ListOutgoingRequestsRequest, context: Context
    ) -> pb.ListOutgoingRequestsResponse:
        """The caller's pending outgoing requests, newest first."""
        page = await self._requests.pending(
            caller.user_id(), incoming=False, size=request.page_size, token=request.page_token
        )
        response = pb.ListOutgoingRequestsResponse(next_page_token=page.next_page_token)
        for item in page.items:
            convert.fill_request(response.requests.add(), item)
        return response

    async def WatchIncomingRequests(  # type: ignore[override]
        self, request: pb.WatchIncomingRequestsRequest, context: Context
    ) -> None:
        """Snapshot of pending incoming requests, `synced`, then live events (SPEC 5).

        Written with `context.write` rather than as a generator so that a write the client
        does not take can be timed out and the stream ended RESOURCE_EXHAUSTED.
        """
        principal = caller.principal()
        async with self._watching.open(caller.user_id()) as stream:
            # Headers on their own first: grpc.aio marks them sent only once a write completes,
            # so an abort right after a first write was cut short would send them again and
            # fail in core, leaving the call without a status until the grace period ends.
            await context.send_initial_metadata(())
            async for item in stream.items(principal.expires_at):
                await stream.send(context.write, convert.watch_item_to_pb(item))

    @idempotent(pb.RespondResponse)
    async def Respond(self, request: pb.RespondRequest, context: Context) -> pb.RespondResponse:
        """Accepts or rejects a pending request sent to the caller."""
        accept = _ACTIONS.get(request.action)
        if accept is None:
            raise InvalidField("action must be ACTION_ACCEPT or ACTION_REJECT")
        resolved, connection = await self._requests.respond(
            caller.user_id(), request.request_id, accept=accept, ip=caller.client_ip()
        )
        response = pb.RespondResponse()
        convert.fill_request(response.request, resolved)
        if connection is not None:
            convert.fill_connection(response.connection, connection)
        return response

    @idempotent(pb.CancelRequestResponse)
    async def CancelRequest(
        self, request: pb.CancelRequestRequest, context: Context
    ) -> pb.CancelRequestResponse:
        """Withdraws a pending request the caller sent."""
        cancelled = await self._requests.cancel(
            caller.user_id(), request.request_id, caller.client_ip()
        )
        response = pb.CancelRequestResponse()
        convert.fill_request(response.request, cancelled)
        return response

    async def ListConnections(
        self, request: pb.ListConnectionsRequest, context: Context
    ) -> pb.ListConnectionsResponse:
        """The caller's connections, newest first."""
        page = await self._connections.page(
            caller.user_id(), size=request.page_size, token=request.page_token
        )
        response = pb.ListConnectionsResponse(next_page_token=page.next_page_token)
        for item in page.items:
            convert.fill_connection(response.connections.add(), item)
        return response

    async def GetConnection(
        self, request: pb.GetConnectionRequest, context: Context
    ) -> pb.GetConnectionResponse:
        """One of the caller's connections."""
        connection = await self._connections.get(caller.user_id(), request.connection_id)
        response = pb.GetConnectionResponse()
        convert.fill_connection(response.connection, connection)
        return response

    async def GetSharedProfile(
        self, request: pb.GetSharedProfileRequest, context: Context
    ) -> pb.GetSharedProfileResponse:
        """What the other side of a connection shares with the caller."""
        profile = await self._connections.shared_profile(caller.user_id(), request.connection_id)
        return pb.GetSharedProfileResponse(profile=convert.shared_profile_to_pb(profile))

    @idempotent(pb.UpdateSharingOverridesResponse)
    async def UpdateSharingOverrides(
        self, request: pb.UpdateSharingOverridesRequest, context: Context
    ) -> pb.UpdateSharingOverridesResponse:
        """Sets or clears what the caller shares with one connection."""
        change = convert.overrides_change(request.overrides, request.update_mask)
        overrides = await self._connections.update_overrides(
            caller.user_id(), request.connection_id, change, caller.client_ip()
        )
        return pb.UpdateSharingOverridesResponse(overrides=convert.overrides_to_pb(overrides))

    @idempotent(pb.RemoveConnectionResponse)
    async def RemoveConnection(
        self, request: pb.RemoveConnectionRequest, context: Context
    ) -> pb.RemoveConnectionResponse:
        """Removes a connection on both sides; the contact cards stay, detached."""
        await self._connections.remove(caller.user_id(), request.connection_id, caller.client_ip())
        return pb.RemoveConnectionResponse()

    async def GetContact(
        self, request: pb.GetContactRequest, context: Context
    ) -> pb.GetContactResponse:
        """One of the caller's contact cards."""
        contact = await self._notifications.contact(caller.user_id(), request.person_id)
        return pb.GetContactResponse(contact=convert.contact_to_pb(contact))

    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, context: Context
    ) -> pb.ListNotificationsResponse:
        """The caller's in-app notifications, newest first."""
        page = await self._notifications.page(
            caller.user_id(),
            unread_only=request.unread_only,
            size=request.page_size,
            token=request.page_token,
        )
        response = pb.ListNotificationsResponse(next_page_token=page.next_page_token)
        for item in page.items:
            convert.fill_notification(response.notifications.add(), item)
        return response

    @idempotent(pb.MarkNotificationsReadResponse)
    async def MarkNotificationsRead(
        self, request: pb.MarkNotificationsReadRequest, context: Context
    ) -> pb.MarkNotificationsReadResponse:
        """Marks some of the caller's notifications read."""
        updated = await self._notifications.mark_read(
            caller.user_id(), list(request.notification_ids), caller.client_ip()
        )
        return pb.MarkNotificationsReadResponse(updated_count=updated)

    @idempotent(pb.BlockUserResponse)
    async def BlockUser(
        self, request: pb.BlockUserRequest, context: Context
    ) -> pb.BlockUserResponse:
        """Blocks a handle: the same answer whether or not anyone has it."""
        await self._relationships.block(caller.user_id(), request.umbral_name, caller.client_ip())
        return pb.BlockUserResponse()

    @idempotent(pb.UnblockUserResponse)
    async def UnblockUser(
        self, request: pb.UnblockUserRequest, context: Context
    ) -> pb.UnblockUserResponse:
        """Lifts the caller's block of a handle, if any."""
        await self._relationships.unblock(caller.user_id(), request.umbral_name, caller.client_ip())
        return pb.UnblockUserResponse()

    async def ListBlockedUsers(
        self, request: pb.ListBlockedUsersRequest, context: Context
    ) -> pb.ListBlockedUsersResponse:
        """The users the caller blocks, newest block first."""
        page = await self._relationships.blocked(
            caller.user_id(), size=request.page_size, token=request.page_token
        )
        response = pb.ListBlockedUsersResponse(next_page_token=page.next_page_token)
        for item in page.items:
            convert.fill_blocked_user(response.blocked_users.add(), item)
        return response

    async def GetRelationships(
        self, request: pb.GetRelationshipsRequest, context: Context
    ) -> pb.GetRelationshipsResponse:
        """The caller's relationship with each handle, in the order asked."""
        states = await self._relationships.states(caller.user_id(), request.umbral_names)
        return pb.GetRelationshipsResponse(
            relationships=[convert.relationship_to_pb(item) for item in states]
        )
