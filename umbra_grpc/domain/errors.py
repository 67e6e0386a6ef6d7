"""Domain errors: the rules' refusals, knowing nothing of gRPC.

    DomainError                      reason: a stable machine-readable string
    ├── InvalidArgument              the request itself is malformed
    │   ├── InvalidHandle            HANDLE_INVALID
    │   ├── InvalidField             FIELD_INVALID (which field says the message)
    │   ├── NtfyUrlForbidden         NTFY_URL_FORBIDDEN (SSRF rule, SPEC 10.4)
    │   ├── InvalidText              TEXT_INVALID (control, bidi or zero-width characters,
    │   │                            or too long after NFC; which field says the message)
    │   ├── SelfRequest              SELF_REQUEST
    │   ├── SelfBlock                SELF_BLOCK
    │   ├── IdempotencyKeyInvalid    IDEMPOTENCY_KEY_INVALID (the idempotency-key header)
    │   └── IdempotencyKeyReused     IDEMPOTENCY_KEY_REUSED (same key, different request)
    ├── NotFound                     the thing does not exist *for this caller*
    │   ├── UserNotFound             USER_NOT_FOUND
    │   ├── ConnectionNotFound       CONNECTION_NOT_FOUND
    │   └── ContactNotFound          CONTACT_NOT_FOUND
    ├── AlreadyExists
    │   ├── HandleTaken              HANDLE_TAKEN
    │   ├── AlreadyConnected         ALREADY_CONNECTED
    │   └── RequestPending           REQUEST_PENDING
    ├── FailedPrecondition
    │   ├── ConnectionsDisabled      CONNECTIONS_DISABLED
    │   ├── RequestNotPending        REQUEST_NOT_PENDING
    │   ├── SenderInactive           SENDER_INACTIVE
    │   └── UserBlocked              USER_BLOCKED
    ├── ResourceExhausted
    │   ├── TooManyPending           TOO_MANY_PENDING
    │   ├── ResendTooSoon            RESEND_TOO_SOON (with the seconds left: RetryInfo)
    │   ├── TooManyStreams           TOO_MANY_STREAMS
    │   └── StreamTooSlow            STREAM_TOO_SLOW
    ├── PermissionDenied
    │   └── CallerInactive           PERMISSION_DENIED (the auth interceptor's answer too)
    ├── Unavailable                  retry later, perhaps on another replica
    │   ├── FeedUnavailable          FEED_UNAVAILABLE
    │   └── ShuttingDown             SHUTTING_DOWN
    └── Unauthenticated
        └── TokenExpired             TOKEN_EXPIRED

Every reason of a branch has the branch's status code, in `umbra_grpc.rpc_errors.STATUS_CODES`
(the one table of reasons and codes). Messages are public: they never name another user's
data or echo a secret.

Reasons sent outside this tree, at the service edge (in the same table): RATE_LIMITED (with
RetryInfo), TOO_MANY_CALLS, TOO_MANY_ANONYMOUS_STREAMS, MALFORMED_REQUEST and UNAUTHENTICATED;
PERMISSION_DENIED, ADMIN_SCOPE_REQUIRED and USER_TOKEN_REQUIRED from the interceptors;
STORAGE_UNAVAILABLE (the database cannot be reached) and STORAGE_BUSY (a lock or statement
timeout, or a deadlock or serialization failure that outlasted the retries), both retryable,
from `umbra_grpc.storage.database`; INTERNAL (with a correlation id) for anything unexpected.
"""

from __future__ import annotations

from typing import ClassVar


class DomainError(Exception):
    """A rule refused the operation; `reason` is stable, the message is for people."""

    reason: ClassVar[str] = "DOMAIN_ERROR"
    default_message: ClassVar[str] = "the operation was refused"
    retry_after: float | None = None
    """Seconds after which the same call may succeed, when the rule knows (RetryInfo)."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        """The public, human-readable explanation."""
        return str(self.args[0])


class InvalidArgument(DomainError):
    """The request is malformed; nothing was changed."""

    reason = "INVALID_ARGUMENT"


class InvalidHandle(InvalidArgument):
    """A handle that is not 3-50 characters of a-z 0-9 _ . - after lower-casing."""

    reason = "HANDLE_INVALID"
    default_message = "umbral_name must be 3-50 characters of a-z, 0-9, '_', '.' or '-'"


class InvalidField(InvalidArgument):
    """One field of the request has a value the service cannot accept."""

    reason = "FIELD_INVALID"


class NtfyUrlForbidden(InvalidArgument):
    """An ntfy server URL of a form, or pointing at addresses, pushes may not go to."""

    reason = "NTFY_URL_FORBIDDEN"


class InvalidText(InvalidArgument):
    """Text shown to other people that could hide or reorder what is around it, or is too
    long (see `umbra_grpc.domain.text`)."""

    reason = "TEXT_INVALID"


class SelfRequest(InvalidArgument):
    """A user asked to connect with themselves."""

    reason = "SELF_REQUEST"
    default_message = "you cannot send a connection request to yourself"


class SelfBlock(InvalidArgument):
    """A user asked to block themselves."""

    reason = "SELF_BLOCK"
    default_message = "you cannot block yourself"


class IdempotencyKeyInvalid(InvalidArgument):
    """The idempotency-key header is not 1-64 characters of A-Z a-z 0-9 _ -, or is repeated."""

    reason = "IDEMPOTENCY_KEY_INVALID"
    default_message = (
        "the idempotency-key header must be sent once, as 1-64 characters of A-Z a-z 0-9 _ -"
    )


class IdempotencyKeyReused(InvalidArgument):
    """The idempotency key was used for a different request to the same method."""

    reason = "IDEMPOTENCY_KEY_REUSED"
    default_message = "this idempotency key was used for a different request within 24 hours"


class NotFound(DomainError):
    """The thing does not exist, or is not the caller's (one answer for both)."""

    reason = "NOT_FOUND"


class UserNotFound(NotFound):
    """No active, accepting user has that handle or id."""

    reason = "USER_NOT_FOUND"
    default_message = "user not found"


class ConnectionNotFound(NotFound):
    """The caller has no connection with that id."""

    reason = "CONNECTION_NOT_FOUND"
    default_message = "connection not found"


class ContactNotFound(NotFound):
    """The caller has no contact card with that id."""

    reason = "CONTACT_NOT_FOUND"
    default_message = "contact not found"


class AlreadyExists(DomainError):
    """The thing to create exists already."""

    reason = "ALREADY_EXISTS"


class HandleTaken(AlreadyExists):
    """Another user has that handle (compared case-insensitively)."""

    reason = "HANDLE_TAKEN"
    default_message = "that umbral_name is taken"


class AlreadyConnected(AlreadyExists):
    """The two users are connected already."""

    reason = "ALREADY_CONNECTED"
    default_message = "you are already connected"


class RequestPending(AlreadyExists):
    """A request between the two users is pending, in either direction."""

    reason = "REQUEST_PENDING"
    default_message = "a pending request already exists between you"


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the operation."""

    reason = "FAILED_PRECONDITION"


class ConnectionsDisabled(FailedPrecondition):
    """The caller has not opted in to connections."""

    reason = "CONNECTIONS_DISABLED"
    default_message = "enable accept_connections in your settings before sending requests"


class RequestNotPending(FailedPrecondition):
    """The request does not exist, is not the caller's, or is resolved (one answer)."""

    reason = "REQUEST_NOT_PENDING"
    default_message = "no pending request with that id"


class SenderInactive(FailedPrecondition):
    """Accepting a request whose sender has been deactivated; the request was rejected."""

    reason = "SENDER_INACTIVE"
    default_message = "the sender's account is no longer active; the request was rejected"


class UserBlocked(FailedPrecondition):
    """The caller blocks the user they tried to send a request to."""

    reason = "USER_BLOCKED"
    default_message = "you block this user; unblock them before sending a request"


class ResourceExhausted(DomainError):
    """A limit was reached."""

    reason = "RESOURCE_EXHAUSTED"


class TooManyPending(ResourceExhausted):
    """The receiver has too many recent pending requests."""

    reason = "TOO_MANY_PENDING"
    default_message = "this user has too many pending requests; try again later"


class ResendTooSoon(ResourceExhausted):
    """The caller cancelled a request to this receiver too recently to send another."""

    reason = "RESEND_TOO_SOON"
    default_message = "you withdrew a request to this user recently; try again later"

    def __init__(self, retry_after: float) -> None:
        super().__init__()
        self.retry_after = max(0.0, retry_after)


class TooManyStreams(ResourceExhausted):
    """The caller (or this process) holds as many watch streams as allowed."""

    reason = "TOO_MANY_STREAMS"
    default_message = "too many open watch streams; close one and retry"


class StreamTooSlow(ResourceExhausted):
    """The client read its watch stream too slowly; events would have been lost."""

    reason = "STREAM_TOO_SLOW"
    default_message = "the stream was read too slowly; reconnect to get a fresh snapshot"


class PermissionDenied(DomainError):
    """The caller may not do this."""

    reason = "PERMISSION_DENIED"


class CallerInactive(PermissionDenied):
    """The caller's user is unknown or deactivated (one answer for both)."""

    reason = "PERMISSION_DENIED"
    default_message = "the caller is not an active user"


class Unavailable(DomainError):
    """The service cannot do this right now; retrying (elsewhere) may work."""

    reason = "UNAVAILABLE"


class FeedUnavailable(Unavailable):
    """The event feed (the LISTEN connection) is down; events could be missed."""

    reason = "FEED_UNAVAILABLE"
    default_message = "the event feed is unavailable; reconnect to get a fresh snapshot"


class ShuttingDown(Unavailable):
    """This server is shutting down."""

    reason = "SHUTTING_DOWN"
    default_message = "the server is shutting down; reconnect"


class Unauthenticated(DomainError):
    """The caller's credentials no longer hold."""

    reason = "UNAUTHENTICATED"


class TokenExpired(Unauthenticated):
    """The bearer token expired while its stream was open."""

    reason = "TOKEN_EXPIRED"
    default_message = "the bearer token expired"
