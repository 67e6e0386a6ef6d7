"""Idempotent writes (SPEC 11): a retry with the same key gets the first call's outcome.

A write RPC called with an idempotency key runs inside `Database.enclosing`: the domain
call's own unit of work joins that transaction, and when the call is done its outcome (the
serialized response, or the serialized status of the domain error it ended with) is
recorded under the key by ONE more statement in the same transaction. So:
- the key commits with the write or not at all: a crash or a lost response can never make a
  retry write twice (the retry finds the key);
- a retry of a call that committed runs its work again, finds the key taken, rolls its own
  work back and answers with the recorded outcome (the same response, or the same error);
- a concurrent duplicate's INSERT of the key waits on the key's primary-key entry until the
  first call's transaction ends, then finds it taken: it rolls back and returns the first
  call's outcome;
- the same key with a different request (another fingerprint) is IDEMPOTENCY_KEY_REUSED,
  and that call writes nothing either.
A domain error that ended the call's own unit of work (it raised inside it, e.g. a unique
violation mapped to ALREADY_EXISTS) means that transaction must roll back: the error is then
recorded by a statement of its own. Errors the domain did not decide (the database away or
busy, the rate limit, authentication) are not recorded: nothing was decided, retry them.

Statements: a call with a key sends what it sends without one, plus the recording INSERT
(and BEGIN/COMMIT when the call itself sends none, e.g. MarkNotificationsRead with no ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from umbra_grpc.domain.errors import DomainError, IdempotencyKeyReused
from umbra_grpc.storage import idempotency as store
from umbra_grpc.storage.database import Conn, Database, StorageBusy

# How many times a key that vanished between "taken" and "read" (pruned at the very end of
# its 24 hours) is tried again before the call gives up as busy.
_ATTEMPTS = 2


@dataclasses.dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """Who sent which key to which method, and the fingerprint of the request it came with."""

    caller: str
    method: str
    key: str
    fingerprint: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """A call's outcome: a serialized response (`ok`) or a serialized error status."""

    ok: bool
    payload: bytes


class _Taken(Exception):
    """Another call holds the key: roll this one back and answer with the stored outcome."""


class _Aborted(Exception):
    """The call's own unit of work failed: roll back, then record the error by itself."""

    def __init__(self, error: DomainError) -> None:
        super().__init__(error.reason)
        self.error = error


class IdempotentWrites:
    """Runs write calls under idempotency keys."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def run(
        self,
        key: IdempotencyKey,
        call: Callable[[], Awaitable[bytes]],
        describe: Callable[[DomainError], bytes],
    ) -> Outcome:
        """The outcome of `call` (its serialized response, or `describe(error)` for the
        domain error it raised), recorded under `key`; or the outcome recorded before."""
        for _ in range(_ATTEMPTS):
            try:
                return await self._db.enclosing(
                    lambda conn: self._attempt(conn, key, call, describe)
                )
            except _Aborted as aborted:
                failed = Outcome(False, describe(aborted.error))
                if await self._record_alone(key, failed):
                    return failed
            except _Taken:
                pass
            stored = await self._db.read(
                lambda conn: store.stored(conn, caller=key.caller, method=key.method, key=key.key)
            )
            if stored is not None:
                if stored.fingerprint != key.fingerprint:
                    raise IdempotencyKeyReused
                return Outcome(stored.ok, stored.outcome)
        raise StorageBusy("idempotency key expired while it was read")

    async def _record_alone(self, key: IdempotencyKey, outcome: Outcome) -> bool:
        return await self._db.transaction(lambda conn: _record(conn, key, outcome))

    @staticmethod
    async def _attempt(
        conn: Conn,
        key: IdempotencyKey,
        call: Callable[[], Awaitable[bytes]],
        describe: Callable[[DomainError], bytes],
    ) -> Outcome:
        try:
            outcome = Outcome(True, await call())
        except DomainError as error:
            if conn.aborted:
                raise _Aborted(error) from error
            outcome = Outcome(False, describe(error))
        if not await _record(conn, key, outcome):
            raise _Taken
        return outcome


async def _record(conn: Conn, key: IdempotencyKey, outcome: Outcome) -> bool:
    return await store.record(
        conn,
        caller=key.caller,
        method=key.method,
        key=key.key,
        fingerprint=key.fingerprint,
        ok=outcome.ok,
        outcome=outcome.payload,
    )
