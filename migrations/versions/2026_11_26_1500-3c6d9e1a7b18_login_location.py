"""Record where logins come from: country, ASN, new locations, rules by place.

Revision ID: 3c6d9e1a7b18
Revises: 8a3d6b1f0c57
Create Date: 2026-11-26 15:00:00+00:00

- login_events.country (ISO 3166-1 alpha-2) and login_events.asn, looked up
  in local GeoIP databases from the full client address (NULL when unknown,
  private, or no database is configured, and for every older row).
- login_events.new_location: NOT NULL DEFAULT false. A flag, not a
  three-valued fact: "where unknown" is already country/asn IS NULL, reports
  filter with a plain ``WHERE new_location``, and on PostgreSQL 11+ a
  constant default is metadata only (no rewrite of the partitions).
- ix_login_events_username_country: "has this user logged in from this
  country before" -- asked by the writer for every located login -- is one
  index probe instead of a walk through the user's history.
- last_logins.last_country: the country of the last allowed login.
- access_rules.countries / access_rules.asns: text, comma-separated
  ('DE,AT', '3320,8881'), NULL for any, so a rule by place can be written
  and read in plain SQL; the daemon's loader validates them (a bad row is
  skipped and reported, like any other).
- Views: v_last_login gains last_country (v_inactive_users reads it, so it
  is made again), v_refused_logins gains country and asn, and a new
  v_new_locations lists the flagged logins.
"""

import sqlalchemy as sa
from alembic import op

revision = "3c6d9e1a7b18"
down_revision = "8a3d6b1f0c57"
branch_labels = None
depends_on = None

VIEWS = ("v_refused_logins", "v_inactive_users", "v_last_login")


def _idle() -> str:
    if op.get_bind().dialect.name == "postgresql":
        return "(EXTRACT(EPOCH FROM (now() - last_seen)) / 86400)::bigint"
    return "CAST(julianday('now') - julianday(last_seen) AS INTEGER)"


def _views(with_place: bool) -> list[str]:
    """The three views as 8a3d6b1f0c57 made them, plus the place columns."""
    last_country = ", last_country" if with_place else ""
    refused = ", e.country, e.asn" if with_place else ""
    return [
        f"""
        CREATE VIEW v_last_login AS
        SELECT username, protocol AS last_protocol, last_seen, last_remote_ip,
               first_seen, logins, last_host{last_country}
        FROM (SELECT username, protocol, last_seen, last_remote_ip, last_host{last_country},
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
               e.rule_id, e.message, r.comment, e.policy_applied, e.host{refused}
        FROM login_events e LEFT JOIN access_rules r ON r.id = e.rule_id
        WHERE e.outcome = 'denied'""",
    ]


NEW_LOCATIONS = """
    CREATE VIEW v_new_locations AS
    SELECT occurred_at, username, protocol, remote_ip, country, asn, host
    FROM login_events
    WHERE new_location"""


def upgrade():
    for view in VIEWS:
        op.execute(f"DROP VIEW {view}")
    # Plain ADD COLUMN on both backends (a rebuilt table would break the
    # views that read it); on PostgreSQL the partitions inherit them.
    op.add_column("login_events", sa.Column(
        "country", sa.String(2),
        comment="client country (ISO 3166-1 alpha-2, GeoIP); NULL: unknown"))
    op.add_column("login_events", sa.Column(
        "asn", sa.BigInteger, comment="client autonomous system number (GeoIP)"))
    op.add_column("login_events", sa.Column(
        "new_location", sa.Boolean, nullable=False, server_default=sa.false(),
        comment="allowed login from a country (or, without one, an ASN) this user "
                "had not logged in from before"))
    op.create_index("ix_login_events_username_country", "login_events",
                    ["username", "country"])
    # the dashboard's and `report new-locations`' recent flagged logins
    op.create_index("ix_login_events_new_location_occurred_at", "login_events",
                    ["occurred_at"], postgresql_where=sa.text("new_location"),
                    sqlite_where=sa.text("new_location"))
    op.add_column("last_logins", sa.Column(
        "last_country", sa.String(2), comment="the country of the last allowed login"))
    op.add_column("access_rules", sa.Column(
        "countries", sa.Text,
        comment="client countries to match, ISO codes separated by commas "
                "('DE,AT'); NULL: any"))
    op.add_column("access_rules", sa.Column(
        "asns", sa.Text,
        comment="client AS numbers to match, separated by commas ('3320,8881'); "
                "NULL: any"))
    for ddl in _views(with_place=True):
        op.execute(ddl)
    op.execute(NEW_LOCATIONS)


def downgrade():
    op.execute("DROP VIEW v_new_locations")
    for view in VIEWS:
        op.execute(f"DROP VIEW {view}")
    op.drop_index("ix_login_events_new_location_occurred_at", "login_events")
    op.drop_index("ix_login_events_username_country", "login_events")
    # Native DROP COLUMN (SQLite 3.35+): a rebuilt table would break the
    # views that read it (and, for access_rules, drop its triggers).
    for table, column in (("access_rules", "asns"), ("access_rules", "countries"),
                          ("last_logins", "last_country"), ("login_events", "new_location"),
                          ("login_events", "asn"), ("login_events", "country")):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    for ddl in _views(with_place=False):
        op.execute(ddl)
