"""Drop ix_login_events_username_country: nothing reads it any more.

Revision ID: 0c86145f3b85
Revises: 6b1e2f4a9d30
Create Date: 2026-11-27 09:00:00+00:00

The index (username, country) answered "has this user logged in from this
country before" for the new-location test. Since login_places
(6b1e2f4a9d30) that question is a primary-key lookup in login_places, and
no query of the daemon, the CLI, the reports, the views or the dashboard
filters login_events by username and country. Every login still paid for
the index: one more B-tree insertion of the username in every allowed or
refused login's statement, and its pages in every monthly partition
(docs/performance.md, session 9, has what it cost).

Dropping it is quick on both backends (no rewrite of the table), but on
PostgreSQL it takes an exclusive lock on login_events for that moment:
commits of running daemons wait for it, within the migration's lock_timeout.
The downgrade builds it again, which reads the whole history.
"""

from alembic import op

revision = "0c86145f3b85"
down_revision = "6b1e2f4a9d30"
branch_labels = None
depends_on = None


def upgrade():
    op.drop_index("ix_login_events_username_country", "login_events")


def downgrade():
    op.create_index("ix_login_events_username_country", "login_events",
                    ["username", "country"])
