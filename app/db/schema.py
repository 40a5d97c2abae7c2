"""Tables. Every change here needs a migration in migrations/versions/.

The migrations do not import this module; ``lastlogin db check`` (and the
test suite) proves the two agree.
"""

from __future__ import annotations

import sqlalchemy as sa

from ..login import OUTCOMES, PROTOCOLS
from .types import IPAddress, IPNetwork, UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

PROTOCOL_CHECK = "protocol IN (" + ", ".join(f"'{p}'" for p in PROTOCOLS) + ")"
OUTCOME_CHECK = "outcome IN (" + ", ".join(f"'{o}'" for o in OUTCOMES) + ")"
SCOPE_CHECK = ("(scope = 'global' AND scope_value = '') OR "
               "(scope IN ('domain', 'user') AND scope_value <> '')")
NOW = sa.text("CURRENT_TIMESTAMP")

access_rules = sa.Table(
    "access_rules", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("action", sa.String(8), nullable=False, comment="allow or deny"),
    sa.Column("priority", sa.Integer, nullable=False, server_default="100",
              comment="lower runs first; the first matching rule decides"),
    sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("username", sa.Text, comment="exact username to match; NULL: any"),
    sa.Column("domain", sa.Text, comment="domain part to match; NULL: any"),
    sa.Column("remote_network", IPNetwork, comment="client network (CIDR); NULL: any"),
    sa.Column("local_network", IPNetwork, comment="server address (CIDR); NULL: any"),
    sa.Column("protocol", sa.String(16), comment="protocol to match; NULL: any"),
    sa.Column("valid_from", UTCDateTime, comment="rule applies from; NULL: always"),
    sa.Column("valid_until", UTCDateTime, comment="rule applies until; NULL: forever"),
    sa.Column("message", sa.Text, comment="text shown to a refused client"),
    sa.Column("comment", sa.Text, comment="why the rule exists"),
    sa.Column("countries", sa.Text,
              comment="client countries to match, ISO codes separated by commas "
                      "('DE,AT'); NULL: any"),
    sa.Column("asns", sa.Text,
              comment="client AS numbers to match, separated by commas ('3320,8881'); "
                      "NULL: any"),
    sa.Column("created_by", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=NOW),
    sa.CheckConstraint("action IN ('allow', 'deny')", name="action"),
    sa.CheckConstraint(f"protocol IS NULL OR {PROTOCOL_CHECK}", name="protocol"),
    sa.CheckConstraint("valid_until IS NULL OR valid_from IS NULL OR valid_until > valid_from",
                       name="window"),
    comment="Allow/deny rules checked at every login (first match by priority wins).",
    sqlite_autoincrement=True,      # a removed rule's id is never reused
)

login_events = sa.Table(
    "login_events", metadata,
    sa.Column("event_id", sa.Uuid, primary_key=True,
              comment="made by the daemon, so a replayed record is not stored twice"),
    # in the key because PostgreSQL partitions the table by it (by month)
    sa.Column("occurred_at", UTCDateTime, primary_key=True),
    sa.Column("username", sa.Text, nullable=False,
              comment="the username; bytes that are not UTF-8 shown as \\xNN"),
    sa.Column("username_raw", sa.LargeBinary,
              comment="the exact username bytes, only when they are not UTF-8 text"),
    sa.Column("protocol", sa.String(16), nullable=False),
    sa.Column("remote_ip", IPAddress, comment="client address; NULL when unknown"),
    sa.Column("local_ip", IPAddress, comment="server address; NULL when unknown"),
    sa.Column("outcome", sa.String(16), nullable=False, comment="allowed or denied"),
    sa.Column("rule_id", sa.Integer, comment="id of the access rule that decided, if any"),
    sa.Column("auth_mech", sa.Text, comment="SASL mechanism, e.g. PLAIN"),
    sa.Column("master_user", sa.Text, comment="master user who logged in as this user"),
    sa.Column("auth_user", sa.Text, comment="login name, when it differs from username"),
    sa.Column("message", sa.Text,
              comment="what a refused client was told (the rule's text then, or the default)"),
    sa.Column("policy_applied", sa.Boolean, nullable=False, server_default=sa.true(),
              comment="false: decided without rules loaded (rules_unloaded_action)"),
    sa.Column("host", sa.Text, comment="the mail host whose daemon saw the login (host_name)"),
    sa.Column("country", sa.String(2),
              comment="client country (ISO 3166-1 alpha-2, GeoIP); NULL: unknown"),
    sa.Column("asn", sa.BigInteger, comment="client autonomous system number (GeoIP)"),
    sa.Column("new_location", sa.Boolean, nullable=False, server_default=sa.false(),
              comment="allowed login from a country (or, without one, an ASN) this user "
                      "had not logged in from before"),
    sa.Column("session_id", sa.Text, comment="Dovecot's session id, when known"),
    sa.CheckConstraint(PROTOCOL_CHECK, name="protocol"),
    sa.CheckConstraint(OUTCOME_CHECK, name="outcome"),
    sa.Index("ix_login_events_username_occurred_at", "username", "occurred_at"),
    sa.Index("ix_login_events_remote_ip_occurred_at", "remote_ip", "occurred_at"),
    sa.Index("ix_login_events_occurred_at", "occurred_at"),
    sa.Index("ix_login_events_new_location_occurred_at", "occurred_at",
             postgresql_where=sa.text("new_location"), sqlite_where=sa.text("new_location")),
    sa.Index("ix_login_events_denied_occurred_at", "occurred_at",
             postgresql_where=sa.text("outcome = 'denied'"),
             sqlite_where=sa.text("outcome = 'denied'")),
    sa.Index("ix_login_events_failed_occurred_at", "occurred_at",
             postgresql_where=sa.text("outcome = 'failed'"),
             sqlite_where=sa.text("outcome = 'failed'")),
    comment="Every login the daemon saw, allowed or refused (append-only).",
    postgresql_partition_by="RANGE (occurred_at)",
)

last_logins = sa.Table(
    "last_logins", metadata,
    sa.Column("username", sa.Text, primary_key=True),
    sa.Column("protocol", sa.String(16), primary_key=True),
    sa.Column("username_raw", sa.LargeBinary,
              comment="the exact username bytes, only when they are not UTF-8 text"),
    sa.Column("first_seen", UTCDateTime, nullable=False),
    sa.Column("last_seen", UTCDateTime, nullable=False),
    sa.Column("last_remote_ip", IPAddress),
    sa.Column("last_local_ip", IPAddress),
    sa.Column("login_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_host", sa.Text, comment="the mail host of the last allowed login"),
    sa.Column("last_country", sa.String(2), comment="the country of the last allowed login"),
    sa.CheckConstraint(PROTOCOL_CHECK, name="protocol"),
    sa.Index("ix_last_logins_last_seen", "last_seen"),
    comment="One row per user and protocol: the last allowed login.",
)

PLACE_KINDS = ("country", "asn")
PLACE_KIND_CHECK = "kind IN (" + ", ".join(f"'{k}'" for k in PLACE_KINDS) + ")"

login_places = sa.Table(
    "login_places", metadata,
    sa.Column("username", sa.Text, primary_key=True),
    sa.Column("kind", sa.String(8), primary_key=True, comment="country or asn"),
    sa.Column("place", sa.Text, primary_key=True,
              comment="the country code, or the AS number in decimal"),
    sa.Column("first_seen", UTCDateTime, nullable=False,
              comment="the earliest allowed login of the user from this place"),
    sa.CheckConstraint(PLACE_KIND_CHECK, name="kind"),
    comment="Every country and AS each user logged in from (allowed logins), for the "
            "new-location test: kept with login_events, in the same transactions; like "
            "last_logins, not pruned by retention.",
)

userdb_overrides = sa.Table(
    "userdb_overrides", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("scope", sa.String(8), nullable=False, comment="global, domain or user"),
    sa.Column("scope_value", sa.Text, nullable=False, server_default="",
              comment="the domain or username; empty for global"),
    sa.Column("key", sa.Text, nullable=False, comment="userdb field name"),
    sa.Column("value", sa.Text, nullable=False, comment="userdb field value, verbatim"),
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=NOW),
    sa.CheckConstraint(SCOPE_CHECK, name="scope"),
    sa.UniqueConstraint("scope", "scope_value", "key",
                        name="uq_userdb_overrides_scope_key"),
    comment="Userdb fields set per login: user beats domain beats global.",
    sqlite_autoincrement=True,
)

login_alerts = sa.Table(
    "login_alerts", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("scope", sa.String(8), nullable=False, comment="global, domain or user"),
    sa.Column("scope_value", sa.Text, nullable=False, server_default=""),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("valid_from", UTCDateTime),
    sa.Column("valid_until", UTCDateTime),
    sa.Column("show_once", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UTCDateTime, nullable=False, server_default=NOW),
    sa.CheckConstraint(SCOPE_CHECK, name="scope"),
    sa.CheckConstraint("valid_until IS NULL OR valid_from IS NULL OR valid_until > valid_from",
                       name="window"),
    sa.Index("ix_login_alerts_scope", "scope", "scope_value"),
    comment="IMAP [ALERT] messages shown at login.",
    sqlite_autoincrement=True,      # deliveries of a removed alert never hide a new one
)

config_version = sa.Table(
    "config_version", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False, server_default="1",
              comment="bumped by triggers on every change to rules, overrides, alerts"),
    sa.Column("changed_at", UTCDateTime, nullable=False, server_default=NOW),
    sa.CheckConstraint("id = 1", name="single_row"),
    comment="One row: the version of what the daemon holds in memory.",
)

login_alert_deliveries = sa.Table(
    "login_alert_deliveries", metadata,
    sa.Column("alert_id", sa.Integer, primary_key=True),
    sa.Column("username", sa.Text, primary_key=True),
    sa.Column("delivered_at", UTCDateTime, nullable=False),
    comment="Show-once alerts already shown, per user.",
)


def is_partition(name: str | None) -> bool:
    """A monthly partition of login_events (PostgreSQL): not a table of its own."""
    return bool(name) and name.startswith("login_events_p") and (
        name[len("login_events_p"):].isdigit() or name == "login_events_pdefault")


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic hook: compare the models with the tables, partitions aside."""
    return not (type_ == "table" and is_partition(name))
