"""SendRequest in one statement: the umbra_send_request function

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 09:00:00.000000

Under READ COMMITTED one statement cannot both wait for the lock on the receiver's row and
count the receiver's pending requests after it (its snapshot is taken before it waits), so
SendRequest needed two statements in BEGIN ... COMMIT. A VOLATILE PL/pgSQL function takes a
fresh snapshot for each of its statements: statement 1 locks the receiver and reads the facts,
statement 2 re-checks connected / pending / cap in a snapshot taken after the lock and writes.
The function only gates the write: the caller decides which refusal the facts mean.

The NOTIFY channel names are `umbra_grpc.storage.notify.REQUESTS_CHANNEL` and
`OUTBOX_CHANNEL`, written out here because a revision must not change when the code does.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURE = "umbra_send_request(bigint, text, integer, interval, inet)"

# Output columns are PL/pgSQL variables inside the body, so none is named like a column the
# body reads (`request_id`, not `id`), and CTE columns are always qualified (`flags.pending`).
CREATE = """
CREATE FUNCTION umbra_send_request(
    caller bigint, handle text, cap integer, pending_window interval, client_ip inet
)
RETURNS TABLE (
    caller_name text, caller_preferred text, caller_accepts boolean,
    target_id bigint, target_name text, target_preferred text,
    target_active boolean, target_accepts boolean,
    connected boolean, pending boolean, recent bigint,
    request_id bigint, request_created_at timestamptz
)
LANGUAGE plpgsql VOLATILE  -- VOLATILE: each statement below takes its own snapshot
AS $$
DECLARE
    sender_display text;
BEGIN
    -- Racing senders queue on the receiver's row here, until the holder commits.
    WITH target AS (
        SELECT u.id, u.umbral_name, u.is_active, s.accept_connections, s.preferred_name
        FROM users u JOIN settings s ON s.user_id = u.id
        WHERE lower(u.umbral_name) = handle
        FOR NO KEY UPDATE OF u
    )
    SELECT c.umbral_name, cs.preferred_name, cs.accept_connections,
           t.id, t.umbral_name, t.preferred_name, t.is_active, t.accept_connections
    INTO caller_name, caller_preferred, caller_accepts,
         target_id, target_name, target_preferred, target_active, target_accepts
    FROM users c JOIN settings cs ON cs.user_id = c.id
    LEFT JOIN target t ON true
    WHERE c.id = caller;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF target_id IS NULL OR NOT target_active OR target_id = caller
       OR NOT caller_accepts OR NOT target_accepts THEN
        RETURN NEXT;
        RETURN;
    END IF;

    -- A new snapshot, taken with the lock held: every request of a sender that queued
    -- ahead of this one is committed and counted.
    sender_display := coalesce(nullif(caller_preferred, ''), caller_name);
    WITH flags AS (
        SELECT
            EXISTS (SELECT 1 FROM user_connections uc
                    WHERE uc.user_id = caller AND uc.connected_user_id = target_id) AS connected,
            EXISTS (SELECT 1 FROM connection_requests r
                    WHERE r.status = 'pending'
                      AND least(r.sender_id, r.receiver_id) = least(caller, target_id)
                      AND greatest(r.sender_id, r.receiver_id) = greatest(caller, target_id)
                   ) AS pending,
            (SELECT count(*) FROM connection_requests r
             WHERE r.receiver_id = target_id AND r.status = 'pending'
               AND r.created_at >= now() - pending_window) AS recent
    ),
    req AS (
        INSERT INTO connection_requests (sender_id, receiver_id)
        SELECT caller, target_id FROM flags
        WHERE NOT flags.connected AND NOT flags.pending AND flags.recent < cap
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
        INSERT INTO outbox (user_id, kind, display_name)
        SELECT target_id, 'request_received', sender_display FROM req
    )
    SELECT flags.connected, flags.pending, flags.recent, req.id, req.created_at
    INTO connected, pending, recent, request_id, request_created_at
    FROM flags LEFT JOIN req ON true;

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


def upgrade() -> None:
    op.execute(CREATE)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {SIGNATURE}")
