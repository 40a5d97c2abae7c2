"""Userdb overrides and login alerts in the database.

Writes are checked here; the loader applies the same checks to every row,
so a row written with plain SQL that the CLI would refuse is skipped (and
reported) instead of reaching Dovecot.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from ..errors import InvalidInput, NotFound
from ..login import check_text, scope_key
from ..overrides import Alert, Overrides, validate_override, validate_scope
from ..sysgroups import root_name
from ..templates import check_template
from .engine import dialect_insert
from .loading import Skipped, raw_columns, skip, strict_bool, when
from .schema import login_alert_deliveries, login_alerts, userdb_overrides


def checked_for_root(key: str, value: str, allow_ids: bool) -> None:
    """validate_override, and no name that is root on this host (uid/gid keys)."""
    validate_override(key, value, allow_ids)
    name = root_name(key, value)
    if name is not None:
        raise InvalidInput("value", f"{key} {name} is root (id 0) on this host; "
                                    "root is never allowed")


def _same_user_rows(conn: sa.Connection, scope: str, scope_value: str, key: str) -> list[int]:
    """Ids of rows for this scope and key, whatever the username's case."""
    t = userdb_overrides
    rows = conn.execute(sa.select(t.c.id, t.c.scope_value).where(t.c.scope == scope,
                                                                  t.c.key == key))
    want = scope_key(scope, scope_value)
    return [r.id for r in rows if scope_key(scope, r.scope_value) == want]


def set_override(conn: sa.Connection, scope: str, scope_value: str | None, key: str,
                 value: str, allow_ids: bool = False) -> None:
    scope, scope_value = validate_scope(scope, scope_value)
    checked_for_root(key, value, allow_ids)
    t = userdb_overrides
    if scope == "user":
        # Users match case-insensitively: one row per user and key.
        stale = [i for i in _same_user_rows(conn, scope, scope_value, key)]
        if stale:
            conn.execute(t.delete().where(t.c.id.in_(stale)))
    ins = dialect_insert(conn, t).values(scope=scope, scope_value=scope_value,
                                         key=key, value=value)
    conn.execute(ins.on_conflict_do_update(
        index_elements=["scope", "scope_value", "key"], set_={"value": value}))


def unset_override(conn: sa.Connection, scope: str, scope_value: str | None, key: str) -> None:
    scope, scope_value = validate_scope(scope, scope_value)
    t = userdb_overrides
    ids = _same_user_rows(conn, scope, scope_value, key)
    res = conn.execute(t.delete().where(t.c.id.in_(ids))) if ids else None
    if res is None or res.rowcount == 0:
        where = scope if scope == "global" else f"{scope} {scope_value}"
        raise NotFound(f"no override {key!r} for {where}")


def list_overrides(conn: sa.Connection, scope: str | None = None,
                   scope_value: str | None = None) -> list[sa.RowMapping]:
    t = userdb_overrides
    q = sa.select(t.c.id, t.c.scope, t.c.scope_value, t.c.key, t.c.value)
    order = sa.case({"global": 0, "domain": 1, "user": 2}, value=t.c.scope)
    rows = list(conn.execute(q.order_by(order, t.c.scope_value, t.c.key, t.c.id)).mappings())
    if scope:
        scope, scope_value = validate_scope(scope, scope_value)
        want = scope_key(scope, scope_value)
        rows = [r for r in rows if r["scope"] == scope
                and scope_key(scope, r["scope_value"]) == want]
    return rows


def load_overrides(conn: sa.Connection, skipped: Skipped | None = None) -> Overrides:
    """Every usable override; a row that fails the checks is skipped and reported."""
    skipped = [] if skipped is None else skipped
    out = Overrides()
    # oldest first: of two rows for one user spelled differently, the first
    # written applies and the later one is reported (same on every backend)
    for row in sorted(list_overrides(conn), key=lambda r: r["id"]):
        try:
            scope, value = validate_scope(row["scope"], row["scope_value"])
            # uid/gid rows written with SQL are taken (the flag is the CLI's
            # guard rail); a 0 or a bad key or value is not.
            checked_for_root(row["key"], row["value"], allow_ids=True)
        except InvalidInput as exc:
            skip(skipped, "userdb_overrides", row["id"], exc)
            continue
        if scope == "global":
            bucket = out.global_
        else:
            bucket = (out.domains if scope == "domain" else out.users).setdefault(
                scope_key(scope, value), {})
        if row["key"] in bucket:
            skip(skipped, "userdb_overrides", row["id"],
                 f"{row['key']} is set twice for {scope} {value} (usernames match "
                 "case-insensitively)")
            continue
        bucket[row["key"]] = row["value"]
    return out


def validate_alert(message: str, valid_from: dt.datetime | None,
                   valid_until: dt.datetime | None) -> None:
    if not message or not message.strip():
        raise InvalidInput("alert", "must not be empty")
    check_text("alert", message)
    check_template("alert", message)
    if valid_from and valid_until and valid_until <= valid_from:
        raise InvalidInput("valid_until", "the window ends before it starts")


def add_alert(conn: sa.Connection, scope: str, scope_value: str | None, message: str,
              valid_from: dt.datetime | None = None, valid_until: dt.datetime | None = None,
              show_once: bool = False, now: dt.datetime | None = None) -> int:
    scope, scope_value = validate_scope(scope, scope_value)
    validate_alert(message, valid_from, valid_until)
    now = now or dt.datetime.now(dt.timezone.utc)
    if valid_until is not None and valid_until <= now:
        raise InvalidInput("valid_until", f"the window has already ended "
                                      f"({valid_until.isoformat()})")
    return conn.execute(login_alerts.insert().values(
        scope=scope, scope_value=scope_value, message=message, valid_from=valid_from,
        valid_until=valid_until, show_once=show_once).returning(login_alerts.c.id)).scalar_one()


def list_alerts(conn: sa.Connection) -> list[sa.RowMapping]:
    return list(conn.execute(sa.select(login_alerts).order_by(login_alerts.c.id)).mappings())


def remove_alert(conn: sa.Connection, alert_id: int) -> None:
    if conn.execute(login_alerts.delete().where(login_alerts.c.id == alert_id)).rowcount == 0:
        raise NotFound(f"no alert with id {alert_id}")
    t = login_alert_deliveries
    conn.execute(t.delete().where(t.c.alert_id == alert_id))


def load_alerts(conn: sa.Connection, skipped: Skipped | None = None) -> tuple[Alert, ...]:
    """Every alert that passes the checks; others are skipped and reported."""
    skipped = [] if skipped is None else skipped
    t = login_alerts
    out = []
    for r in conn.execute(sa.select(*raw_columns(t, ("valid_from", "valid_until", "show_once")))
                          .order_by(t.c.id)).mappings():
        try:
            valid_from = when(r["valid_from"], conn.dialect)
            valid_until = when(r["valid_until"], conn.dialect)
            scope, value = validate_scope(r["scope"], r["scope_value"])
            validate_alert(r["message"], valid_from, valid_until)
            show_once = strict_bool("show_once", r["show_once"])
        except (InvalidInput, ValueError, TypeError) as exc:
            skip(skipped, "login_alerts", r["id"], exc)
            continue
        out.append(Alert(id=r["id"], scope=scope, scope_value=value, message=r["message"],
                         valid_from=valid_from, valid_until=valid_until, show_once=show_once))
    return tuple(out)


def load_deliveries(conn: sa.Connection) -> set[tuple[int, str]]:
    t = login_alert_deliveries
    return {(r.alert_id, r.username) for r in conn.execute(sa.select(t.c.alert_id, t.c.username))}
