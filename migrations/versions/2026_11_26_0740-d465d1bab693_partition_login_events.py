"""Partition login_events by month on PostgreSQL; key it by (event_id, occurred_at).

Revision ID: d465d1bab693
Revises: 10193d525acb
Create Date: 2026-11-26 07:40:00+00:00

Retention then drops whole months instead of deleting rows. A partitioned
table's primary key must hold the partition column, so the key becomes
(event_id, occurred_at) on both backends (the daemon makes both, so a
replayed record still meets its twin). PostgreSQL gets one partition per
month of existing data, the current month and the next three, plus a
DEFAULT partition so that an insert never fails for want of a partition;
the daemon adds months ahead as time goes on. SQLite keeps one table.
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "d465d1bab693"
down_revision = "10193d525acb"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_login_events_username_occurred_at": ["username", "occurred_at"],
    "ix_login_events_remote_ip_occurred_at": ["remote_ip", "occurred_at"],
    "ix_login_events_occurred_at": ["occurred_at"],
}
COLUMNS = ("event_id, occurred_at, username, username_raw, protocol, remote_ip, local_ip, "
           "outcome, rule_id, auth_mech, master_user, auth_user")


def _months_ahead(n: int):
    today = dt.date.today().replace(day=1)
    y, m = today.year, today.month
    for _ in range(n):
        yield y, m
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)


def _partition_sql(y: int, m: int) -> str:
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return (f"CREATE TABLE IF NOT EXISTS login_events_p{y:04d}{m:02d} PARTITION OF login_events "
            f"FOR VALUES FROM ('{y:04d}-{m:02d}-01 00:00:00+00') "
            f"TO ('{ny:04d}-{nm:02d}-01 00:00:00+00')")


def upgrade():
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("login_events", recreate="always") as batch:
            batch.drop_constraint("pk_login_events", type_="primary")
            batch.create_primary_key("pk_login_events", ["event_id", "occurred_at"])
        return
    op.execute("ALTER TABLE login_events RENAME TO login_events_old")
    op.execute("ALTER TABLE login_events_old RENAME CONSTRAINT pk_login_events "
               "TO pk_login_events_old")
    for name in INDEXES:
        op.execute(f"DROP INDEX {name}")
    op.execute("""
        CREATE TABLE login_events (
            event_id uuid NOT NULL,
            occurred_at timestamptz NOT NULL,
            username text NOT NULL,
            username_raw bytea,
            protocol varchar(16) NOT NULL,
            remote_ip inet,
            local_ip inet,
            outcome varchar(16) NOT NULL,
            rule_id integer,
            auth_mech text,
            master_user text,
            auth_user text,
            CONSTRAINT pk_login_events PRIMARY KEY (event_id, occurred_at),
            CONSTRAINT ck_login_events_protocol
                CHECK (protocol IN ('imap', 'pop3', 'submission', 'managesieve')),
            CONSTRAINT ck_login_events_outcome CHECK (outcome IN ('allowed', 'denied'))
        ) PARTITION BY RANGE (occurred_at)""")
    op.execute("COMMENT ON TABLE login_events IS "
               "'Every login the daemon saw, allowed or refused (append-only).'")
    for column, text in (
            ("event_id", "made by the daemon, so a replayed record is not stored twice"),
            ("username", "the username; bytes that are not UTF-8 shown as \\xNN"),
            ("username_raw", "the exact username bytes, only when they are not UTF-8 text"),
            ("remote_ip", "client address; NULL when unknown"),
            ("local_ip", "server address; NULL when unknown"),
            ("outcome", "allowed or denied"),
            ("rule_id", "id of the access rule that decided, if any"),
            ("auth_mech", "SASL mechanism, e.g. PLAIN"),
            ("master_user", "master user who logged in as this user"),
            ("auth_user", "login name, when it differs from username")):
        op.execute(f"COMMENT ON COLUMN login_events.{column} IS '{text}'")
    months = set(_months_ahead(4))
    rows = op.get_bind().execute(sa.text(
        "SELECT DISTINCT EXTRACT(YEAR FROM occurred_at AT TIME ZONE 'UTC')::int, "
        "EXTRACT(MONTH FROM occurred_at AT TIME ZONE 'UTC')::int FROM login_events_old"))
    months |= {(int(y), int(m)) for y, m in rows}
    for y, m in sorted(months):
        op.execute(_partition_sql(y, m))
    op.execute("CREATE TABLE login_events_pdefault PARTITION OF login_events DEFAULT")
    op.execute(f"INSERT INTO login_events ({COLUMNS}) SELECT {COLUMNS} FROM login_events_old")
    op.execute("DROP TABLE login_events_old")
    for name, cols in INDEXES.items():
        op.create_index(name, "login_events", cols)


def downgrade():
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("login_events", recreate="always") as batch:
            batch.drop_constraint("pk_login_events", type_="primary")
            batch.create_primary_key("pk_login_events", ["event_id"])
        return
    op.execute("ALTER TABLE login_events RENAME TO login_events_part")
    op.execute("ALTER TABLE login_events_part RENAME CONSTRAINT pk_login_events "
               "TO pk_login_events_part")
    for name in INDEXES:
        op.execute(f"DROP INDEX {name}")
    op.execute("CREATE TABLE login_events (LIKE login_events_part INCLUDING DEFAULTS "
               "INCLUDING CONSTRAINTS INCLUDING COMMENTS)")
    op.execute("ALTER TABLE login_events ADD CONSTRAINT pk_login_events PRIMARY KEY (event_id)")
    op.execute(f"INSERT INTO login_events ({COLUMNS}) SELECT {COLUMNS} FROM login_events_part")
    op.execute("DROP TABLE login_events_part")   # drops its partitions too
    for name, cols in INDEXES.items():
        op.create_index(name, "login_events", cols)
