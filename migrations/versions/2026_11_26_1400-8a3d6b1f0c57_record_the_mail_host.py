"""Record the mail host: which server's daemon saw each login.

Revision ID: 8a3d6b1f0c57
Revises: 5e7f0c2a91d4
Create Date: 2026-11-26 14:00:00+00:00

Large sites run one daemon per mail host against one database.

- login_events.host: the host_name setting of the daemon that saw the login
  (NULL for logins stored before this revision, and for imported history).
- last_logins.last_host: the host of the last allowed login of that user
  and protocol.
- v_last_login shows last_host (v_inactive_users reads v_last_login, so it
  is made again); v_refused_logins shows host.

No index on host: reports filter by host together with a user or a time
range, which the existing indexes already narrow.
"""

import sqlalchemy as sa
from alembic import op

revision = "8a3d6b1f0c57"
down_revision = "5e7f0c2a91d4"
branch_labels = None
depends_on = None

VIEWS = ("v_refused_logins", "v_inactive_users", "v_last_login")


def _idle() -> str:
    if op.get_bind().dialect.name == "postgresql":
        return "(EXTRACT(EPOCH FROM (now() - last_seen)) / 86400)::bigint"
    return "CAST(julianday('now') - julianday(last_seen) AS INTEGER)"


def _views(with_host: bool) -> list[str]:
    last_host = ", last_host" if with_host else ""
    refused = (", e.host" if with_host else "")
    return [
        f"""
        CREATE VIEW v_last_login AS
        SELECT username, protocol AS last_protocol, last_seen, last_remote_ip,
               first_seen, logins{last_host}
        FROM (SELECT username, protocol, last_seen, last_remote_ip{last_host},
                     min(first_seen) OVER (PARTITION BY username) AS first_seen,
                     sum(login_count) OVER (PARTITION BY username) AS logins,
                     row_number() OVER (PARTITION BY username
                                        ORDER BY last_seen DESC, protocol) AS rn
              FROM last_logins) ranked
        WHERE rn = 1""",
        f"""
        CREATE VIEW v_inactive_users AS
        SELECT username, last_seen, last_protocol, {_idle()} AS idle_days
        FROM v_last_login""",
        f"""
        CREATE VIEW v_refused_logins AS
        SELECT e.occurred_at, e.username, e.protocol, e.remote_ip, e.local_ip,
               e.rule_id, e.message, r.comment, e.policy_applied{refused}
        FROM login_events e LEFT JOIN access_rules r ON r.id = e.rule_id
        WHERE e.outcome = 'denied'""",
    ]


def upgrade():
    for view in VIEWS:
        op.execute(f"DROP VIEW {view}")
    # Plain ADD COLUMN on both backends: a rebuilt login_events (batch mode)
    # would break the views that read it.
    op.add_column("login_events", sa.Column(
        "host", sa.Text, comment="the mail host whose daemon saw the login (host_name)"))
    op.add_column("last_logins", sa.Column(
        "last_host", sa.Text, comment="the mail host of the last allowed login"))
    for ddl in _views(with_host=True):
        op.execute(ddl)


def downgrade():
    for view in VIEWS:
        op.execute(f"DROP VIEW {view}")
    # Native DROP COLUMN (SQLite 3.35+): a rebuilt table would break the
    # views that read it.
    op.execute("ALTER TABLE last_logins DROP COLUMN last_host")
    op.execute("ALTER TABLE login_events DROP COLUMN host")
    for ddl in _views(with_host=False):
        op.execute(ddl)
