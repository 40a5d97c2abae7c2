"""Create schema v1: login history, last logins, rules, overrides, alerts.

Revision ID: 2c9f35efd15a
Revises:
Create Date: 2026-11-26 06:40:00+00:00

Written by hand (reviewed against app/db/schema.py; `lastlogin db check`
proves they agree). Stands alone: no application imports.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "2c9f35efd15a"
down_revision = None
branch_labels = None
depends_on = None

PROTOCOL_CHECK = "protocol IN ('imap', 'pop3', 'submission', 'managesieve')"
SCOPE_CHECK = ("(scope = 'global' AND scope_value = '') OR "
               "(scope IN ('domain', 'user') AND scope_value <> '')")
WINDOW_CHECK = "valid_until IS NULL OR valid_from IS NULL OR valid_until > valid_from"
NOW = sa.text("CURRENT_TIMESTAMP")


def inet():
    return sa.String(64).with_variant(postgresql.INET(), "postgresql")


def cidr():
    return sa.String(64).with_variant(postgresql.CIDR(), "postgresql")


def ts():
    return sa.DateTime(timezone=True)


def upgrade():
    op.create_table(
        "access_rules",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("action", sa.String(8), nullable=False, comment="allow or deny"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="100",
                  comment="lower runs first; the first matching rule decides"),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("username", sa.Text, comment="exact username to match; NULL: any"),
        sa.Column("domain", sa.Text, comment="domain part to match; NULL: any"),
        sa.Column("remote_network", cidr(), comment="client network (CIDR); NULL: any"),
        sa.Column("local_network", cidr(), comment="server address (CIDR); NULL: any"),
        sa.Column("protocol", sa.String(16), comment="protocol to match; NULL: any"),
        sa.Column("valid_from", ts(), comment="rule applies from; NULL: always"),
        sa.Column("valid_until", ts(), comment="rule applies until; NULL: forever"),
        sa.Column("message", sa.Text, comment="text shown to a refused client"),
        sa.Column("comment", sa.Text, comment="why the rule exists"),
        sa.Column("created_by", sa.Text),
        sa.Column("created_at", ts(), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="pk_access_rules"),
        sa.CheckConstraint("action IN ('allow', 'deny')", name=op.f("ck_access_rules_action")),
        sa.CheckConstraint(f"protocol IS NULL OR {PROTOCOL_CHECK}",
                           name=op.f("ck_access_rules_protocol")),
        sa.CheckConstraint(WINDOW_CHECK, name=op.f("ck_access_rules_window")),
        comment="Allow/deny rules checked at every login (first match by priority wins).",
    )

    op.create_table(
        "login_events",
        sa.Column("event_id", sa.Uuid, nullable=False,
                  comment="made by the daemon, so a replayed record is not stored twice"),
        sa.Column("occurred_at", ts(), nullable=False),
        sa.Column("username", sa.Text, nullable=False,
                  comment="the username; bytes that are not UTF-8 shown as \\xNN"),
        sa.Column("username_raw", sa.LargeBinary,
                  comment="the exact username bytes, only when they are not UTF-8 text"),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("remote_ip", inet(), comment="client address; NULL when unknown"),
        sa.Column("local_ip", inet(), comment="server address; NULL when unknown"),
        sa.Column("outcome", sa.String(16), nullable=False, comment="allowed or denied"),
        # No foreign key: history keeps the id of a rule deleted since, and a
        # rule deleted between decision and commit cannot fail the batch.
        sa.Column("rule_id", sa.Integer, comment="id of the access rule that decided, if any"),
        sa.Column("auth_mech", sa.Text, comment="SASL mechanism, e.g. PLAIN"),
        sa.Column("master_user", sa.Text, comment="master user who logged in as this user"),
        sa.Column("auth_user", sa.Text, comment="login name, when it differs from username"),
        sa.PrimaryKeyConstraint("event_id", name="pk_login_events"),
        sa.CheckConstraint(PROTOCOL_CHECK, name=op.f("ck_login_events_protocol")),
        sa.CheckConstraint("outcome IN ('allowed', 'denied')", name=op.f("ck_login_events_outcome")),
        comment="Every login the daemon saw, allowed or refused (append-only).",
    )
    # "history of a user", "logins from an IP", time ranges (reports, retention)
    op.create_index("ix_login_events_username_occurred_at", "login_events",
                    ["username", "occurred_at"])
    op.create_index("ix_login_events_remote_ip_occurred_at", "login_events",
                    ["remote_ip", "occurred_at"])
    op.create_index("ix_login_events_occurred_at", "login_events", ["occurred_at"])

    op.create_table(
        "last_logins",
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("username_raw", sa.LargeBinary,
                  comment="the exact username bytes, only when they are not UTF-8 text"),
        sa.Column("first_seen", ts(), nullable=False),
        sa.Column("last_seen", ts(), nullable=False),
        sa.Column("last_remote_ip", inet()),
        sa.Column("last_local_ip", inet()),
        sa.Column("login_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("username", "protocol", name="pk_last_logins"),
        sa.CheckConstraint(PROTOCOL_CHECK, name=op.f("ck_last_logins_protocol")),
        comment="One row per user and protocol: the last allowed login.",
    )
    # "inactive since"
    op.create_index("ix_last_logins_last_seen", "last_logins", ["last_seen"])

    op.create_table(
        "userdb_overrides",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("scope", sa.String(8), nullable=False, comment="global, domain or user"),
        sa.Column("scope_value", sa.Text, nullable=False, server_default="",
                  comment="the domain or username; empty for global"),
        sa.Column("key", sa.Text, nullable=False, comment="userdb field name"),
        sa.Column("value", sa.Text, nullable=False, comment="userdb field value, verbatim"),
        sa.Column("created_at", ts(), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="pk_userdb_overrides"),
        sa.CheckConstraint(SCOPE_CHECK, name=op.f("ck_userdb_overrides_scope")),
        sa.UniqueConstraint("scope", "scope_value", "key",
                            name="uq_userdb_overrides_scope_key"),
        comment="Userdb fields set per login: user beats domain beats global.",
    )

    op.create_table(
        "login_alerts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("scope", sa.String(8), nullable=False, comment="global, domain or user"),
        sa.Column("scope_value", sa.Text, nullable=False, server_default=""),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("valid_from", ts()),
        sa.Column("valid_until", ts()),
        sa.Column("show_once", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", ts(), nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("id", name="pk_login_alerts"),
        sa.CheckConstraint(SCOPE_CHECK, name=op.f("ck_login_alerts_scope")),
        sa.CheckConstraint(WINDOW_CHECK, name=op.f("ck_login_alerts_window")),
        comment="IMAP [ALERT] messages shown at login.",
    )
    op.create_index("ix_login_alerts_scope", "login_alerts", ["scope", "scope_value"])


def downgrade():
    op.drop_table("login_alerts")
    op.drop_table("userdb_overrides")
    op.drop_table("last_logins")
    op.drop_table("login_events")
    op.drop_table("access_rules")
