"""Remember which show-once alerts each user has seen.

Revision ID: 10193d525acb
Revises: d57a64653b99
Create Date: 2026-11-26 07:20:00+00:00

Written in the same transaction as the login that showed the alert. No
trigger (a delivery is not a configuration change) and no foreign key (an
alert deleted while a login shows it must not fail that login's record;
`lastlogin alert remove` deletes the deliveries with the alert).
"""

import sqlalchemy as sa
from alembic import op

revision = "10193d525acb"
down_revision = "d57a64653b99"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "login_alert_deliveries",
        sa.Column("alert_id", sa.Integer, nullable=False),
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("alert_id", "username", name="pk_login_alert_deliveries"),
        comment="Show-once alerts already shown, per user.",
    )


def downgrade():
    op.drop_table("login_alert_deliveries")
