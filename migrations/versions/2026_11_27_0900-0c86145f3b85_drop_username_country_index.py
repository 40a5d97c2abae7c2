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

A daemon of the release before login_places, still running on another
mail host after the upgrade, does read it: its new-location probe for a
login with a country then goes through each partition's username index
instead, slower for users with a long history (about 15 ms against 0.1 ms
for a user with 40,000 logins); it still stores every login.
docs/geoip.md asks for every host to be upgraded within three days.

Dropping it is quick on both backends (no rewrite of the table; 0.06 s
with 400,000 logins), but on PostgreSQL it needs an exclusive lock on
login_events: it waits for statements that use the table to end, and
commits of running daemons wait behind it, up to the migration's
lock_timeout (4 s, migrations/env.py): then it fails and can be run
again, and logins that waited past record_timeout were spooled. The
downgrade builds the index again, which reads the whole history while
the daemons' commits wait.
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
