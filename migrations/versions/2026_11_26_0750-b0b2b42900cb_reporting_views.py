"""Reporting views for dashboards and plain SQL; an index for refused logins.

Revision ID: b0b2b42900cb
Revises: d465d1bab693
Create Date: 2026-11-26 07:50:00+00:00

v_last_login       one row per user: last login over all protocols
v_inactive_users   v_last_login with idle_days (WHERE idle_days > 90 ...)
v_daily_logins     logins per UTC day, protocol: allowed, denied
v_user_ips         per user and client address: first/last seen, logins, refused
v_refused_logins   refused logins with the rule's message and comment
"""

import sqlalchemy as sa
from alembic import op

revision = "b0b2b42900cb"
down_revision = "d465d1bab693"
branch_labels = None
depends_on = None

VIEWS = ("v_refused_logins", "v_user_ips", "v_daily_logins", "v_inactive_users", "v_last_login")


def upgrade():
    pg = op.get_bind().dialect.name == "postgresql"
    idle = ("(EXTRACT(EPOCH FROM (now() - last_seen)) / 86400)::bigint" if pg
            else "CAST(julianday('now') - julianday(last_seen) AS INTEGER)")
    day = "(occurred_at AT TIME ZONE 'UTC')::date" if pg else "date(occurred_at)"
    op.execute("""
        CREATE VIEW v_last_login AS
        SELECT username, protocol AS last_protocol, last_seen, last_remote_ip,
               first_seen, logins
        FROM (SELECT username, protocol, last_seen, last_remote_ip,
                     min(first_seen) OVER (PARTITION BY username) AS first_seen,
                     sum(login_count) OVER (PARTITION BY username) AS logins,
                     row_number() OVER (PARTITION BY username
                                        ORDER BY last_seen DESC, protocol) AS rn
              FROM last_logins) ranked
        WHERE rn = 1""")
    op.execute(f"""
        CREATE VIEW v_inactive_users AS
        SELECT username, last_seen, last_protocol, {idle} AS idle_days
        FROM v_last_login""")
    op.execute(f"""
        CREATE VIEW v_daily_logins AS
        SELECT {day} AS day, protocol,
               sum(CASE WHEN outcome = 'allowed' THEN 1 ELSE 0 END) AS allowed,
               sum(CASE WHEN outcome = 'denied' THEN 1 ELSE 0 END) AS denied
        FROM login_events
        GROUP BY {day}, protocol""")
    op.execute("""
        CREATE VIEW v_user_ips AS
        SELECT username, remote_ip, min(occurred_at) AS first_seen,
               max(occurred_at) AS last_seen, count(*) AS logins,
               sum(CASE WHEN outcome = 'denied' THEN 1 ELSE 0 END) AS refused
        FROM login_events
        WHERE remote_ip IS NOT NULL
        GROUP BY username, remote_ip""")
    op.execute("""
        CREATE VIEW v_refused_logins AS
        SELECT e.occurred_at, e.username, e.protocol, e.remote_ip, e.local_ip,
               e.rule_id, r.message, r.comment
        FROM login_events e LEFT JOIN access_rules r ON r.id = e.rule_id
        WHERE e.outcome = 'denied'""")
    # "refused since ..." must not read every login of the period
    op.create_index("ix_login_events_denied_occurred_at", "login_events", ["occurred_at"],
                    postgresql_where=sa.text("outcome = 'denied'"),
                    sqlite_where=sa.text("outcome = 'denied'"))


def downgrade():
    op.drop_index("ix_login_events_denied_occurred_at", "login_events")
    for view in VIEWS:
        op.execute(f"DROP VIEW {view}")
