"""Failed logins: authentications Dovecot's policy client reports as failed.

Revision ID: 4d7e0f2b8c19
Revises: 3c6d9e1a7b18
Create Date: 2026-11-26 15:10:00+00:00

lastlogin serves Dovecot's authentication policy protocol (docs/policy-server.md):
a failed authentication becomes a login_events row with outcome 'failed'.

- ck_login_events_outcome allows 'failed'. PostgreSQL changes the constraint
  on the partitioned table (it reaches every partition); SQLite keeps CHECK
  constraints only in the CREATE TABLE text, so the table is rebuilt with
  that text changed (what batch mode does, done by hand so that the
  statement, its indexes and the views around it come back exactly: views
  reading the table are dropped first and made again afterwards).
- login_events.session_id: Dovecot's session id (%{session}), so a failed
  attempt and the post-login record of the same session can be put together.
  The reason Dovecot gives for a failure goes to the existing ``message``.
- ix_login_events_failed_occurred_at: "failed since ..." reads only failures.
- v_failed_logins: per user, failed_logins (count), first_failure,
  last_failure and the address of the last failure.
- v_daily_logins gains ``failed``; v_user_ips counts failures apart
  (``logins`` stays allowed + refused, ``failed`` is new). last_logins and
  v_last_login are unchanged: a failure is not a login.

The downgrade deletes the failed rows (the old constraint cannot hold them)
and restores the previous definitions.
"""

import sqlalchemy as sa
from alembic import op

revision = "4d7e0f2b8c19"
down_revision = "3c6d9e1a7b18"
branch_labels = None
depends_on = None

OLD_CHECK = "outcome IN ('allowed', 'denied')"
NEW_CHECK = "outcome IN ('allowed', 'denied', 'failed')"
FAILED_INDEX = "ix_login_events_failed_occurred_at"


def _day() -> str:
    if op.get_bind().dialect.name == "postgresql":
        return "(occurred_at AT TIME ZONE 'UTC')::date"
    return "date(occurred_at)"


def _daily(with_failed: bool) -> str:
    failed = (",\n               sum(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) AS failed"
              if with_failed else "")
    return f"""
        CREATE VIEW v_daily_logins AS
        SELECT {_day()} AS day, protocol,
               sum(CASE WHEN outcome = 'allowed' THEN 1 ELSE 0 END) AS allowed,
               sum(CASE WHEN outcome = 'denied' THEN 1 ELSE 0 END) AS denied{failed}
        FROM login_events
        GROUP BY {_day()}, protocol"""


USER_IPS_OLD = """
        CREATE VIEW v_user_ips AS
        SELECT username, remote_ip, min(occurred_at) AS first_seen,
               max(occurred_at) AS last_seen, count(*) AS logins,
               sum(CASE WHEN outcome = 'denied' THEN 1 ELSE 0 END) AS refused
        FROM login_events
        WHERE remote_ip IS NOT NULL
        GROUP BY username, remote_ip"""

USER_IPS_NEW = """
        CREATE VIEW v_user_ips AS
        SELECT username, remote_ip, min(occurred_at) AS first_seen,
               max(occurred_at) AS last_seen,
               sum(CASE WHEN outcome <> 'failed' THEN 1 ELSE 0 END) AS logins,
               sum(CASE WHEN outcome = 'denied' THEN 1 ELSE 0 END) AS refused,
               sum(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) AS failed
        FROM login_events
        WHERE remote_ip IS NOT NULL
        GROUP BY username, remote_ip"""

FAILED_VIEW = """
        CREATE VIEW v_failed_logins AS
        SELECT username, failed_logins, first_failure, last_failure, last_remote_ip
        FROM (SELECT username, occurred_at AS last_failure, remote_ip AS last_remote_ip,
                     count(*) OVER (PARTITION BY username) AS failed_logins,
                     min(occurred_at) OVER (PARTITION BY username) AS first_failure,
                     row_number() OVER (PARTITION BY username
                                        ORDER BY occurred_at DESC) AS rn
              FROM login_events
              WHERE outcome = 'failed') ranked
        WHERE rn = 1"""

CHANGED = ("v_daily_logins", "v_user_ips")


def _sqlite_rebuild(old: str, new: str) -> None:
    """Rebuild login_events with ``old`` replaced by ``new`` in its CREATE
    TABLE text; indexes and every view come back as they were."""
    conn = op.get_bind()
    table_sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'login_events'"
    ).scalar_one()
    if old not in table_sql:
        raise RuntimeError(f"login_events has no CHECK ({old}) to change")
    indexes = [r[0] for r in conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'login_events' "
        "AND sql IS NOT NULL ORDER BY name")]
    views = conn.exec_driver_sql(
        "SELECT name, sql FROM sqlite_master WHERE type = 'view' ORDER BY name").all()
    for name, _ in views:
        op.execute(f'DROP VIEW "{name}"')
    # The table's own CREATE text from sqlite_master (our schema, no user
    # data), under a new name and with the one CHECK changed.
    head, _, tail = table_sql.partition("login_events")
    rebuilt = head + "login_events_rebuilt" + tail.replace(old, new)
    op.execute(rebuilt)
    op.execute("INSERT INTO login_events_rebuilt SELECT * FROM login_events")
    op.execute("DROP TABLE login_events")
    op.execute("ALTER TABLE login_events_rebuilt RENAME TO login_events")
    for ddl in indexes:
        op.execute(ddl)
    for name, ddl in views:
        if name not in CHANGED:
            op.execute(ddl)


def _pg_check(check: str) -> None:
    op.execute("ALTER TABLE login_events DROP CONSTRAINT ck_login_events_outcome")
    op.execute(f"ALTER TABLE login_events ADD CONSTRAINT ck_login_events_outcome "
               f"CHECK ({check})")


def upgrade():
    sqlite = op.get_bind().dialect.name == "sqlite"
    for view in CHANGED:
        op.execute(f"DROP VIEW {view}")
    if sqlite:
        _sqlite_rebuild(OLD_CHECK, NEW_CHECK)
    else:
        _pg_check(NEW_CHECK)
    op.add_column("login_events", sa.Column(
        "session_id", sa.Text, comment="Dovecot's session id, when known"))
    op.create_index(FAILED_INDEX, "login_events", ["occurred_at"],
                    postgresql_where=sa.text("outcome = 'failed'"),
                    sqlite_where=sa.text("outcome = 'failed'"))
    op.execute(_daily(with_failed=True))
    op.execute(USER_IPS_NEW)
    op.execute(FAILED_VIEW)


def downgrade():
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.execute("DROP VIEW v_failed_logins")
    for view in CHANGED:
        op.execute(f"DROP VIEW {view}")
    op.drop_index(FAILED_INDEX, "login_events")
    op.execute("DELETE FROM login_events WHERE outcome = 'failed'")
    # Native DROP COLUMN (SQLite 3.35+), before the rebuild copies the table.
    op.execute("ALTER TABLE login_events DROP COLUMN session_id")
    if sqlite:
        _sqlite_rebuild(NEW_CHECK, OLD_CHECK)
    else:
        _pg_check(OLD_CHECK)
    op.execute(_daily(with_failed=False))
    op.execute(USER_IPS_OLD)
