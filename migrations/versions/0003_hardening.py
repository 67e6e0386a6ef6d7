"""Hardening (SPEC 10): SendRequest without an oracle, cancel without churn, retention indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 09:00:00.000000

- `umbra_send_request` is replaced (its arguments and result change):
  - it checks the caller's own opt-in before it looks at the target (10.2), and reads the
    target's flags without a lock, so a refusal (NOT_FOUND) never waits on the target's
    row lock; only a send that may go through queues on it;
  - cancelled requests count toward the receiver's cap within the window, and a sender who
    cancelled a request to this receiver less than `resend_cooldown` ago is refused, with
    the seconds left in `resend_wait` (10.3);
  - its outbox row names its request (`outbox.request_id`), so a cancel can skip it;
  - it pins its search_path to the schema it was created in (10.12): a session's own
    search_path (a schema of its own first, or pg_temp) cannot redirect its table names.
    The schema is read when migrating, not written here, so the revision works in any schema.
- Indexes, so that neither the new checks nor the retention job (10.9) scans a table:
  connection_requests: the cap count (receiver, created_at; pending or cancelled), the
  cooldown (sender, receiver, resolved_at; cancelled), resolved ones by resolved_at;
  notifications: a request's notification (source_id; source_type connection_request),
  read ones by created_at; audit_log by created_at; outbox: pending by request_id,
  completed ones by (status, completed_at).
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURE = "umbra_send_request(bigint, text, integer, interval, interval, inet)"

# Output columns are PL/pgSQL variables inside the body, so none is named like a column the
# body reads (`request_id`, not `id`), and CTE columns are always qualified (`flags.pending`).
# `{search_path}` is filled in when migrating (see `upgrade`).
CREATE = """
CREATE FUNCTION umbra_send_request(
    caller bigint, handle text, cap integer, pending_window interval,
    resend_cooldown interval, client_ip inet
)
RETURNS TABLE (
    caller_name text, caller_preferred text, caller_accepts boolean,
    target_id bigint, target_name text, target_preferred text,
    target_active boolean, target_accepts boolean,
    connected boolean, pending boolean, recent bigint, resend_wait double precision,
    request_id bigint, request_created_at timestamptz
)
LANGUAGE plpgsql VOLATILE  -- VOLATILE: each statement below takes its own snapshot
SET search_path = {search_path}
AS $$
DECLARE
    sender_display text;
    reachable boolean;
BEGIN
    -- The caller first: one who has not opted in learns nothing about the handle.
    SELECT c.umbral_name, cs.preferred_name, cs.accept_connections
    INTO caller_name, caller_preferred, caller_accepts
    FROM users c JOIN settings cs ON cs.user_id = c.id
    WHERE c.id = caller;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF NOT caller_accepts THEN
        RETURN NEXT;
        RETURN;
    END IF;

    -- The target's flags, without a lock: a refusal never waits on another writer.
    SELECT u.id, u.umbral_name, s.preferred_name, u.is_active, s.accept_connections
    INTO target_id, target_name, target_preferred, target_active, target_accepts
    FROM users u JOIN settings s ON s.user_id = u.id
    WHERE lower(u.umbral_name) = handle;
    IF target_id IS NULL OR NOT target_active OR target_id = caller OR NOT target_accepts THEN
        RETURN NEXT;
        RETURN;
    END IF;

    -- Racing senders queue on the receiver's row here, until the holder commits.
    PERFORM 1 FROM users u WHERE u.id = target_id FOR NO KEY UPDATE;

    -- A new snapshot, taken with the lock held: every request of a sender that queued
    -- ahead of this one is committed and counted, and the flags read above are read again
    -- (the receiver may have stopped accepting while this one waited).
    sender_display := coalesce(nullif(caller_preferred, ''), caller_name);
    WITH flags AS (
        SELECT
            EXISTS (SELECT 1 FROM users u JOIN settings s ON s.user_id = u.id
                    WHERE u.id = target_id AND u.is_active AND s.accept_connections
                   ) AS reachable,
            EXISTS (SELECT 1 FROM user_connections uc
                    WHERE uc.user_id = caller AND uc.connected_user_id = target_id) AS connected,
            EXISTS (SELECT 1 FROM connection_requests r
                    WHERE r.status = 'pending'
                      AND least(r.sender_id, r.receiver_id) = least(caller, target_id)
                      AND greatest(r.sender_id, r.receiver_id) = greatest(caller, target_id)
                   ) AS pending,
            (SELECT extract(epoch FROM max(r.resolved_at) + resend_cooldown - now())::float8
             FROM connection_requests r
             WHERE r.sender_id = caller AND r.receiver_id = target_id
               AND r.status = 'cancelled' AND r.resolved_at > now() - resend_cooldown
            ) AS resend_wait,
            -- A cancelled request keeps its place in the cap until its window ends.
            (SELECT count(*) FROM connection_requests r
             WHERE r.receiver_id = target_id AND r.status IN ('pending', 'cancelled')
               AND r.created_at >= now() - pending_window) AS recent
    ),
    req AS (
        INSERT INTO connection_requests (sender_id, receiver_id)
        SELECT caller, target_id FROM flags
        WHERE flags.reachable AND NOT flags.connected AND NOT flags.pending
          AND flags.resend_wait IS NULL AND flags.recent < cap
        RETURNING connection_requests.id, connection_requests.created_at
    ),
    note AS (
        INSERT INTO notifications (user_id, type, title, message, data, source_type, source_id)
        SELECT target_id, 'connection_request', 'New Connection Request',
               sender_display || ' wants to connect with you',
               jsonb_build_object('sender_umbral_name', caller_name),
               'connection_request', req.id
        FROM req
    ),
    audit AS (
        INSERT INTO audit_log (action, actor_id, target_id, detail, ip)
        SELECT 'connection.request_sent', caller, target_id,
               jsonb_build_object('request_id', req.id, 'receiver_umbral_name', target_name),
               client_ip
        FROM req
    ),
    push AS (
        INSERT INTO outbox (user_id, kind, display_name, request_id)
        SELECT target_id, 'request_received', sender_display, req.id FROM req
    )
    SELECT flags.reachable, flags.connected, flags.pending, flags.recent, flags.resend_wait,
           req.id, req.created_at
    INTO reachable, connected, pending, recent, resend_wait, request_id, request_created_at
    FROM flags LEFT JOIN req ON true;
    target_accepts := reachable;

    IF request_id IS NOT NULL THEN
        PERFORM pg_notify('umbra_requests', json_build_object(
            'kind', 'received', 'request_id', request_id, 'receiver_id', target_id,
            'sender_id', caller)::text);
        PERFORM pg_notify('umbra_outbox', '');
    END IF;
    RETURN NEXT;
END
$$
"""

# (name, table, columns, WHERE of the partial index or None)
INDEXES: tuple[tuple[str, str, list[str], str | None], ...] = (
    (
        "ix_connection_requests_recent",
        "connection_requests",
        ["receiver_id", "created_at"],
        "status IN ('pending', 'cancelled')",
    ),
    (
        "ix_connection_requests_cancelled",
        "connection_requests",
        ["sender_id", "receiver_id", "resolved_at"],
        "status = 'cancelled'",
    ),
    (
        "ix_connection_requests_resolved",
        "connection_requests",
        ["resolved_at"],
        "status <> 'pending'",
    ),
    (
        "ix_notifications_request",
        "notifications",
        ["source_id"],
        "source_type = 'connection_request'",
    ),
    ("ix_notifications_read", "notifications", ["created_at"], "read"),
    ("ix_audit_log_created_at", "audit_log", ["created_at"], None),
    ("ix_outbox_request", "outbox", ["request_id"], "status = 'pending'"),
    (
        "ix_outbox_completed",
        "outbox",
        ["status", "completed_at"],
        "status IN ('sent', 'skipped', 'failed')",
    ),
)


def _revision_0002() -> ModuleType:
    """Revision 0002's module: its function is what a downgrade puts back."""
    path = Path(__file__).with_name("0002_send_request_function.py")
    spec = importlib.util.spec_from_file_location("umbra_revision_0002", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    bind = op.get_bind()
    schema = bind.execute(sa.text("SELECT current_schema()")).scalar_one()
    search_path = f"{bind.dialect.identifier_preparer.quote(schema)}, pg_temp"
    op.add_column("outbox", sa.Column("request_id", sa.BigInteger(), nullable=True))
    for name, table, columns, where in INDEXES:
        op.create_index(
            name,
            table,
            columns,
            unique=False,
            postgresql_where=sa.text(where) if where else None,
            # An operator may have built it CONCURRENTLY beforehand (see the README).
            if_not_exists=True,
        )
    op.execute(f"DROP FUNCTION {_revision_0002().SIGNATURE}")
    op.execute(CREATE.replace("{search_path}", search_path))


def downgrade() -> None:
    previous = _revision_0002()
    op.execute(f"DROP FUNCTION {SIGNATURE}")
    op.execute(previous.CREATE)
    for name, table, _columns, where in reversed(INDEXES):
        op.drop_index(name, table_name=table, postgresql_where=sa.text(where) if where else None)
    op.drop_column("outbox", "request_id")
