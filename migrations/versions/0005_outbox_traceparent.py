"""Outbox rows keep the trace context of the RPC that wrote them (SPEC 13, issue 13)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 21:00:00.000000

- `outbox.traceparent`: the W3C `traceparent` of the span of the RPC whose transaction wrote
  the row, NULL when tracing is off (or the RPC's trace was not sampled). The worker's
  `outbox push` span links to it (docs/TRACING.md).
- It is filled by the column's default from the transaction-local setting
  `umbra.traceparent`, which the service sets at the start of a transaction while tracing
  (`Database.tag_transactions`). So no writer changes: `umbra_send_request`, Respond and
  the note pushes insert as before, and a replica not yet upgraded (or tracing off) writes
  NULL. An unset custom setting reads as NULL, and as '' once a transaction of the session
  has set it locally: NULLIF makes both NULL.

Safe on a big table: ADD COLUMN without a default is a catalog change only (no rewrite, no
scan); SET DEFAULT afterwards applies to rows inserted from then on, never to existing ones.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT = "NULLIF(current_setting('umbra.traceparent', true), '')"


def upgrade() -> None:
    op.add_column("outbox", sa.Column("traceparent", sa.Text(), nullable=True))
    op.alter_column("outbox", "traceparent", server_default=sa.text(DEFAULT))


def downgrade() -> None:
    op.drop_column("outbox", "traceparent")
