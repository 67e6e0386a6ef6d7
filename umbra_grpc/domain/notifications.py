"""In-app notifications and contact cards: what the service writes, the caller can read."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from umbra_grpc.domain.errors import ContactNotFound, InvalidField
from umbra_grpc.domain.ids import check_id
from umbra_grpc.domain.pages import Page, PageTokens
from umbra_grpc.records import SHAREABLE_FIELDS
from umbra_grpc.storage import contacts as contact_store
from umbra_grpc.storage import notifications as store
from umbra_grpc.storage.database import Database
from umbra_grpc.storage.keyset import Cursor
from umbra_grpc.storage.notifications import NotificationRow

DEFAULT_PAGE_SIZE = 20
MAX_MARK_IDS = 1000


class NotificationView(NamedTuple):
    """One in-app notification (a NamedTuple: see RequestView)."""

    id: int
    type: str
    title: str
    message: str
    data: dict[str, str]
    source_type: str | None
    source_id: int | None
    read: bool
    create_time: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class ContactView:
    """A contact card; `fields` holds the shared values copied in (unset ones absent)."""

    id: int
    linked_user_id: int | None
    is_umbral_contact: bool
    display_name: str
    fields: dict[str, str]
    create_time: dt.datetime
    update_time: dt.datetime


class Notifications:
    """ListNotifications, MarkNotificationsRead and GetContact."""

    def __init__(self, db: Database, pages: PageTokens) -> None:
        self._db = db
        self._pages = pages

    async def page(
        self, caller: int, *, unread_only: bool, size: int, token: str
    ) -> Page[NotificationView]:
        """The caller's notifications, newest first."""

        async def fetch(after: Cursor | None, limit: int) -> list[NotificationView]:
            rows = await self._db.read(
                lambda conn: store.page(
                    conn, caller=caller, unread_only=unread_only, after=after, limit=limit
                )
            )
            return [_view(row) for row in rows]

        return await self._pages.page(
            "notifications.unread" if unread_only else "notifications.all",
            caller,
            size=size,
            default=DEFAULT_PAGE_SIZE,
            token=token,
            fetch=fetch,
        )

    async def mark_read(self, caller: int, ids: Sequence[int], ip: str | None) -> int:
        """Marks some of the caller's notifications read; returns how many changed."""
        if len(ids) > MAX_MARK_IDS:
            raise InvalidField(f"at most {MAX_MARK_IDS} notification_ids at once")
        for notification_id in ids:
            check_id(notification_id, "notification_ids")
        if not ids:
            return 0
        unique = sorted(set(ids))
        return await self._db.transaction(
            lambda conn: store.mark_read(conn, caller=caller, ids=unique, ip=ip)
        )

    async def contact(self, caller: int, person_id: int) -> ContactView:
        """One of the caller's contact cards, or `ContactNotFound`."""
        check_id(person_id, "person_id")
        card = await self._db.read(
            lambda conn: contact_store.contact(conn, caller=caller, person_id=person_id)
        )
        if card is None:
            raise ContactNotFound
        return ContactView(
            id=card.id,
            linked_user_id=card.linked_user_id,
            is_umbral_contact=card.is_umbral_contact,
            display_name=card.display_name,
            fields=_present_fields(card.values),
            create_time=card.created_at,
            update_time=card.updated_at,
        )


def _present_fields(values: Mapping[str, str | dt.date | None]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for field in SHAREABLE_FIELDS:
        value = values[field]
        if value is not None and value != "":
            fields[field] = value.isoformat() if isinstance(value, dt.date) else str(value)
    return fields


def _view(row: NotificationRow) -> NotificationView:
    return NotificationView(
        row.id,
        row.type,
        row.title,
        row.message,
        {key: str(value) for key, value in row.data.items()},
        row.source_type,
        row.source_id,
        row.read,
        row.created_at,
    )
