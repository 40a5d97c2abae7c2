"""Userdb overrides and login alerts in the database."""

from __future__ import annotations

import datetime as dt


import sqlalchemy as sa

from ..errors import InvalidInput, NotFound
from ..overrides import Alert, Overrides, validate_key, validate_scope
from .engine import dialect_insert
from .schema import login_alert_deliveries, login_alerts, userdb_overrides


def set_override(conn: sa.Connection, scope: str, scope_value: str | None, key: str,
                 value: str) -> None:
    scope, scope_value = validate_scope(scope, scope_value)
    validate_key(key)
    if "\x00" in value:
        raise InvalidInput("VALUE", "must not contain a NUL byte")
    ins = dialect_insert(conn, userdb_overrides).values(scope=scope, scope_value=scope_value,
                                                 key=key, value=value)
    conn.execute(ins.on_conflict_do_update(
        index_elements=["scope", "scope_value", "key"], set_={"value": value}))


def unset_override(conn: sa.Connection, scope: str, scope_value: str | None, key: str) -> None:
    scope, scope_value = validate_scope(scope, scope_value)
    t = userdb_overrides
    res = conn.execute(t.delete().where(t.c.scope == scope, t.c.scope_value == scope_value,
                                        t.c.key == key))
    if res.rowcount == 0:
        where = scope if scope == "global" else f"{scope} {scope_value}"
        raise NotFound(f"no override {key!r} for {where}")


def list_overrides(conn: sa.Connection, scope: str | None = None,
                   scope_value: str | None = None) -> list[sa.RowMapping]:
    t = userdb_overrides
    q = sa.select(t.c.scope, t.c.scope_value, t.c.key, t.c.value)
    if scope:
        scope, scope_value = validate_scope(scope, scope_value)
        q = q.where(t.c.scope == scope, t.c.scope_value == scope_value)
    order = sa.case({"global": 0, "domain": 1, "user": 2}, value=t.c.scope)
    return list(conn.execute(q.order_by(order, t.c.scope_value, t.c.key)).mappings())


def load_overrides(conn: sa.Connection) -> Overrides:
    out = Overrides()
    for row in list_overrides(conn):
        if row["scope"] == "global":
            out.global_[row["key"]] = row["value"]
        else:
            bucket = out.domains if row["scope"] == "domain" else out.users
            bucket.setdefault(row["scope_value"], {})[row["key"]] = row["value"]
    return out


def add_alert(conn: sa.Connection, scope: str, scope_value: str | None, message: str,
              valid_from: dt.datetime | None = None, valid_until: dt.datetime | None = None,
              show_once: bool = False) -> int:
    scope, scope_value = validate_scope(scope, scope_value)
    if not message.strip():
        raise InvalidInput("MESSAGE", "must not be empty")
    if valid_from and valid_until and valid_until <= valid_from:
        raise InvalidInput("--until", "the window ends before it starts")
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


def load_alerts(conn: sa.Connection) -> tuple[Alert, ...]:
    return tuple(Alert(id=r["id"], scope=r["scope"], scope_value=r["scope_value"],
                       message=r["message"], valid_from=r["valid_from"],
                       valid_until=r["valid_until"], show_once=r["show_once"])
                 for r in list_alerts(conn))


def load_deliveries(conn: sa.Connection) -> set[tuple[int, str]]:
    t = login_alert_deliveries
    return {(r.alert_id, r.username) for r in conn.execute(sa.select(t.c.alert_id, t.c.username))}
