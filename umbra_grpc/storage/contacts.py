"""Contact cards (persons): the caller's own rows only."""

from __future__ import annotations

from umbra_grpc.storage.database import Conn, Query, Row

_CONTACT = Query(
    """
    SELECT id, linked_user_id, is_umbral_contact, display_name, email, phone, mobile, address,
           company, job_title, birthday, created_at, updated_at
    FROM persons WHERE id = :person_id AND owner_user_id = :caller
    """
)


async def contact(conn: Conn, *, caller: int, person_id: int) -> Row | None:
    """One of the caller's contact cards, or None."""
    return await conn.fetchrow(_CONTACT, caller=caller, person_id=person_id)
