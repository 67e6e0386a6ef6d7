"""Contact cards (persons): the caller's own rows only."""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from umbra_grpc.records import SHAREABLE_FIELDS
from umbra_grpc.storage.database import Conn, Query


class ContactRow(NamedTuple):
    """A contact card as stored."""

    id: int
    linked_user_id: int | None
    is_umbral_contact: bool
    display_name: str
    values: dict[str, str | dt.date | None]
    """Each shareable field's value as copied in (None or '' when unset; birthday a date)."""
    created_at: dt.datetime
    updated_at: dt.datetime


_CONTACT = Query(
    """
    SELECT id, linked_user_id, is_umbral_contact, display_name, email, phone, mobile, address,
           company, job_title, birthday, created_at, updated_at
    FROM persons WHERE id = :person_id AND owner_user_id = :caller
    """
)


async def contact(conn: Conn, *, caller: int, person_id: int) -> ContactRow | None:
    """One of the caller's contact cards, or None."""
    row = await conn.fetchrow(_CONTACT, caller=caller, person_id=person_id)
    if row is None:
        return None
    return ContactRow(
        row["id"],
        row["linked_user_id"],
        row["is_umbral_contact"],
        row["display_name"],
        {field: row[field] for field in SHAREABLE_FIELDS},
        row["created_at"],
        row["updated_at"],
    )
