"""Track changes to rules, overrides and alerts, so the daemon reloads them.

Revision ID: d57a64653b99
Revises: 2c9f35efd15a
Create Date: 2026-11-26 07:00:00+00:00

A one-row table `config_version` is bumped by triggers on every change to
access_rules, userdb_overrides and login_alerts -- by the CLI or by plain
SQL alike. The daemon compares the number with the one it loaded (a cheap
query) and, on PostgreSQL, is also woken at once by NOTIFY lastlogin_config.
"""

import sqlalchemy as sa
from alembic import op

revision = "d57a64653b99"
down_revision = "2c9f35efd15a"
branch_labels = None
depends_on = None

TABLES = ("access_rules", "userdb_overrides", "login_alerts")

PG_FUNCTION = """
CREATE FUNCTION lastlogin_config_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE config_version SET version = version + 1, changed_at = now() WHERE id = 1;
    PERFORM pg_notify('lastlogin_config', TG_TABLE_NAME);
    RETURN NULL;
END
$$
"""


def upgrade():
    op.create_table(
        "config_version",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="1",
                  comment="bumped by triggers on every change to rules, overrides, alerts"),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("CURRENT_TIMESTAMP")),
        sa.PrimaryKeyConstraint("id", name="pk_config_version"),
        sa.CheckConstraint("id = 1", name=op.f("ck_config_version_single_row")),
        comment="One row: the version of what the daemon holds in memory.",
    )
    op.execute("INSERT INTO config_version (id, version) VALUES (1, 1)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        for table in TABLES:
            op.execute(f"CREATE TRIGGER trg_{table}_changed "
                       f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION lastlogin_config_changed()")
        return
    for table in TABLES:
        for event in ("INSERT", "UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER trg_{table}_{event.lower()} AFTER {event} ON {table} "
                "BEGIN UPDATE config_version SET version = version + 1, "
                "changed_at = CURRENT_TIMESTAMP WHERE id = 1; END")


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER trg_{table}_changed ON {table}")
        op.execute("DROP FUNCTION lastlogin_config_changed()")
    else:
        for table in TABLES:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER trg_{table}_{event}")
    op.drop_table("config_version")
