"""Keep what happened: the message a client saw, whether rules were applied, no reused ids.

Revision ID: 5e7f0c2a91d4
Revises: b0b2b42900cb
Create Date: 2026-11-26 13:00:00+00:00

- login_events.message: the text a refused client saw (the rule's message at
  the time, or the default), so history does not change when a rule does.
  Existing refusals are filled from their rule's current message, the best
  that is known about them.
- login_events.policy_applied: false when the login was decided without
  rules loaded (rules_unloaded_action), so an auditor can tell.
- SQLite: access_rules, userdb_overrides and login_alerts get AUTOINCREMENT,
  so a removed rule's id is never given to a new one (history and alert
  deliveries keep pointing at what they meant). The sequence starts past
  every id the history has seen. PostgreSQL sequences never reuse ids.
- v_refused_logins shows the stored message.
"""

import sqlalchemy as sa
from alembic import op

revision = "5e7f0c2a91d4"
down_revision = "b0b2b42900cb"
branch_labels = None
depends_on = None

CONFIG_TABLES = ("access_rules", "userdb_overrides", "login_alerts")

REFUSED_OLD = """
    CREATE VIEW v_refused_logins AS
    SELECT e.occurred_at, e.username, e.protocol, e.remote_ip, e.local_ip,
           e.rule_id, r.message, r.comment
    FROM login_events e LEFT JOIN access_rules r ON r.id = e.rule_id
    WHERE e.outcome = 'denied'"""

REFUSED_NEW = """
    CREATE VIEW v_refused_logins AS
    SELECT e.occurred_at, e.username, e.protocol, e.remote_ip, e.local_ip,
           e.rule_id, e.message, r.comment, e.policy_applied
    FROM login_events e LEFT JOIN access_rules r ON r.id = e.rule_id
    WHERE e.outcome = 'denied'"""


def _sqlite_triggers(table: str) -> list[str]:
    return [f"CREATE TRIGGER trg_{table}_{event.lower()} AFTER {event} ON {table} "
            "BEGIN UPDATE config_version SET version = version + 1, "
            "changed_at = CURRENT_TIMESTAMP WHERE id = 1; END"
            for event in ("INSERT", "UPDATE", "DELETE")]


def _sqlite_autoincrement(on: bool) -> None:
    """Recreate the three config tables with (or without) AUTOINCREMENT.

    Recreating a table drops its triggers, so they are made again; the
    config_version bump they would have caused is harmless.
    """
    for table in CONFIG_TABLES:
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_{event}")
        with op.batch_alter_table(table, recreate="always",
                                  table_kwargs={"sqlite_autoincrement": on}) as batch:
            pass
        for ddl in _sqlite_triggers(table):
            op.execute(ddl)
    if on:
        # Past every id ever handed out that history still mentions.
        op.execute("""
            UPDATE sqlite_sequence SET seq = max(seq,
                (SELECT coalesce(max(rule_id), 0) FROM login_events))
            WHERE name = 'access_rules'""")
        # (an aggregate always yields a row: the NOT EXISTS must filter outside it)
        op.execute("""
            INSERT INTO sqlite_sequence (name, seq)
            SELECT 'access_rules', m FROM (SELECT coalesce(max(rule_id), 0) AS m
                                           FROM login_events)
            WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'access_rules')""")
        op.execute("""
            INSERT INTO sqlite_sequence (name, seq)
            SELECT 'login_alerts', m FROM (SELECT coalesce(max(alert_id), 0) AS m
                                           FROM login_alert_deliveries)
            WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'login_alerts')""")
        op.execute("""
            UPDATE sqlite_sequence SET seq = max(seq,
                (SELECT coalesce(max(alert_id), 0) FROM login_alert_deliveries))
            WHERE name = 'login_alerts'""")


def upgrade():
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.execute("DROP VIEW v_refused_logins")
    # Plain ADD COLUMN on both backends: a rebuilt login_events (batch mode)
    # would break the views that read it.
    op.add_column("login_events", sa.Column(
        "message", sa.Text,
        comment="what a refused client was told (the rule's text then, or the default)"))
    op.add_column("login_events", sa.Column(
        "policy_applied", sa.Boolean, nullable=False, server_default=sa.true(),
        comment="false: decided without rules loaded (rules_unloaded_action)"))
    op.execute("""
        UPDATE login_events SET message = (
            SELECT r.message FROM access_rules r WHERE r.id = login_events.rule_id)
        WHERE outcome = 'denied' AND rule_id IS NOT NULL""")
    if sqlite:
        _sqlite_autoincrement(True)
    op.execute(REFUSED_NEW)


def downgrade():
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.execute("DROP VIEW v_refused_logins")
    if sqlite:
        _sqlite_autoincrement(False)
    # Native DROP COLUMN (SQLite 3.35+): a rebuilt login_events would break
    # the views that read it.
    for column in ("policy_applied", "message"):
        op.execute(f"ALTER TABLE login_events DROP COLUMN {column}")
    op.execute(REFUSED_OLD)
