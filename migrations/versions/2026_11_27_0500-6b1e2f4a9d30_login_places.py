"""login_places: the countries and AS numbers each user logged in from.

Revision ID: 6b1e2f4a9d30
Revises: 4d7e0f2b8c19
Create Date: 2026-11-27 05:00:00+00:00

The new-location test asked login_events, for every allowed login with a
place, whether the user had logged in from that country (or AS) before. On
PostgreSQL that probed every monthly partition's index, so each located
login cost more every month (docs/performance.md, session 7). login_places
holds one row per user and place with the earliest allowed login from it:
the test is one primary-key lookup, and the writers add a row
in the same transaction as the login that first shows a place. "Did this
user log in before at all" is now asked of last_logins (first_seen), which
every allowed login already updates. Like last_logins, the table is a
summary that retention leaves alone: a place stays known after the logins
that showed it were pruned (`lastlogin user forget` removes it).

The upgrade fills the table from the stored history: one pass over the
allowed logins with a place (on a large history this is the long part of
the upgrade). A daemon of the release before, still running on another
mail host after the upgrade, stores logins without their places; the
daemon's daily job of this release adds those of the last three days
(app.db.store.catch_up_places, logged as event=places_caught_up), and until
it has, the user's next login from such a place is flagged new. The
downgrade drops the table; nothing else reads it.
"""

import sqlalchemy as sa
from alembic import op

revision = "6b1e2f4a9d30"
down_revision = "4d7e0f2b8c19"
branch_labels = None
depends_on = None

# Written out, not built from the application: migrations stand alone.
BACKFILL = """
    INSERT INTO login_places (username, kind, place, first_seen)
    SELECT username, 'country', country, min(occurred_at) FROM login_events
    WHERE outcome = 'allowed' AND country IS NOT NULL
    GROUP BY username, country
    UNION ALL
    SELECT username, 'asn', CAST(asn AS TEXT), min(occurred_at) FROM login_events
    WHERE outcome = 'allowed' AND asn IS NOT NULL
    GROUP BY username, asn
"""


def upgrade():
    op.create_table(
        "login_places",
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False, comment="country or asn"),
        sa.Column("place", sa.Text, nullable=False,
                  comment="the country code, or the AS number in decimal"),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False,
                  comment="the earliest allowed login of the user from this place"),
        sa.CheckConstraint("kind IN ('country', 'asn')", name=op.f("ck_login_places_kind")),
        sa.PrimaryKeyConstraint("username", "kind", "place", name="pk_login_places"),
        comment="Every country and AS each user logged in from (allowed logins), for the "
                "new-location test: kept with login_events, in the same transactions; like "
                "last_logins, not pruned by retention.",
    )
    op.execute(BACKFILL)


def downgrade():
    op.drop_table("login_places")
