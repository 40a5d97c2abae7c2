"""Everything stored about one user: export it, or forget it (GDPR access and erasure).

A user is matched as rules match logins (``login.user_key``: trimmed,
ASCII case-insensitive), so "Alice@Example.org" finds the rows stored as
"alice@example.org" and no one else. The database narrows the candidates
with ``lower()`` (an unindexed scan of login_events: this is a rare
administrative task), then ``user_key`` decides, so the two can never
disagree about who is meant.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..login import scope_key, user_key
from .schema import (access_rules, last_logins, login_alert_deliveries, login_alerts,
                     login_events, login_places, userdb_overrides)
from .store import places_lock

# (name in the export, table, username column) -- the user's own history
HISTORY = (("logins", login_events, "username"),
           ("last_logins", last_logins, "username"),
           ("alert_deliveries", login_alert_deliveries, "username"),
           # last: forget deletes in this order, the order the writers lock in
           ("places", login_places, "username"))


def _names(conn: sa.Connection, username: str) -> list[str]:
    """The stored spellings of ``username`` in the history tables."""
    key = user_key(username)
    found: set[str] = set()
    for _, table, col in HISTORY:
        c = table.c[col]
        rows = conn.execute(sa.select(c).distinct().where(sa.func.lower(c) == sa.func.lower(key)))
        found.update(r[0] for r in rows if user_key(r[0]) == key)
    return sorted(found)


def _config(conn: sa.Connection, username: str) -> dict[str, list[int]]:
    """Ids of the rules, overrides and alerts that name this user."""
    key = user_key(username)
    r = access_rules
    rules = [row.id for row in conn.execute(sa.select(r.c.id, r.c.username)
                                            .where(r.c.username.is_not(None)))
             if user_key(row.username) == key]
    out = {"rules": rules}
    for name, t in (("overrides", userdb_overrides), ("alerts", login_alerts)):
        out[name] = [row.id for row in conn.execute(
            sa.select(t.c.id, t.c.scope_value).where(t.c.scope == "user"))
            if scope_key("user", row.scope_value) == key]
    return out


CONFIG = (("rules", access_rules), ("overrides", userdb_overrides), ("alerts", login_alerts))


def export_user(conn: sa.Connection, username: str) -> dict[str, list[dict[str, Any]]]:
    """Every row stored about ``username``: ``logins`` first, then the rest."""
    names = _names(conn, username)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, table, col in HISTORY:
        order = [table.c.occurred_at] if name == "logins" else list(table.primary_key)
        out[name] = [dict(r) for r in conn.execute(
            sa.select(table).where(table.c[col].in_(names)).order_by(*order)).mappings()]
    ids = _config(conn, username)
    for name, table in CONFIG:
        out[name] = [dict(r) for r in conn.execute(
            sa.select(table).where(table.c.id.in_(ids[name])).order_by(table.c.id)).mappings()]
    return out


def forget_user(conn: sa.Connection, username: str, with_config: bool = False
                ) -> dict[str, int]:
    """Delete the user's history (and, ``with_config``, the rules, overrides and
    alerts naming them) in the caller's transaction; rows removed per table."""
    places_lock(conn)           # not while the daily job adds places
    names = _names(conn, username)
    removed: dict[str, int] = {}
    for _, table, col in HISTORY:
        removed[table.name] = conn.execute(
            table.delete().where(table.c[col].in_(names))).rowcount if names else 0
    if with_config:
        ids = _config(conn, username)
        for name, table in CONFIG:
            removed[table.name] = conn.execute(
                table.delete().where(table.c.id.in_(ids[name]))).rowcount if ids[name] else 0
    return removed
