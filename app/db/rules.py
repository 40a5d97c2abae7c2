"""Access rules in the database: validated writes, and loading for the daemon."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

import sqlalchemy as sa

from ..config import PROTOCOLS
from ..errors import InvalidInput, NotFound
from ..policy import Rule, order
from .schema import access_rules, config_version

RULE_FIELDS = ("action", "priority", "enabled", "username", "domain", "remote_network",
               "local_network", "protocol", "valid_from", "valid_until", "message",
               "comment", "created_by")


def _network(field: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise InvalidInput(field, f"not an IPv4 or IPv6 network: {value!r}") from None


def validate_rule(values: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise a rule's fields; raises InvalidInput naming the field."""
    out = dict(values)
    if out.get("action") not in ("allow", "deny"):
        raise InvalidInput("ACTION", f"must be allow or deny, got {out.get('action')!r}")
    if out.get("protocol") is not None and out["protocol"] not in PROTOCOLS:
        raise InvalidInput("--protocol", f"unknown protocol {out['protocol']!r} "
                           f"(known: {', '.join(PROTOCOLS)})")
    out["remote_network"] = _network("--network", out.get("remote_network"))
    out["local_network"] = _network("--local-network", out.get("local_network"))
    for key in ("username", "domain"):
        if out.get(key) is not None and not out[key].strip():
            raise InvalidInput("--" + ("user" if key == "username" else key), "must not be empty")
    if out.get("domain"):
        out["domain"] = out["domain"].strip().lower().lstrip("@")
    start, end = out.get("valid_from"), out.get("valid_until")
    for key in ("valid_from", "valid_until"):
        if out.get(key) is not None and out[key].tzinfo is None:
            raise InvalidInput(key, "needs a time zone")
    if start and end and end <= start:
        raise InvalidInput("--until", f"the window ends ({end.isoformat()}) before it "
                           f"starts ({start.isoformat()})")
    if "priority" in out and not isinstance(out["priority"], int):
        raise InvalidInput("--priority", "must be an integer")
    return out


def add_rule(conn: sa.Connection, **values: Any) -> int:
    unknown = set(values) - set(RULE_FIELDS)
    if unknown:
        raise TypeError(f"unknown rule fields: {sorted(unknown)}")
    row = validate_rule(values)
    return conn.execute(access_rules.insert().values(**row)
                        .returning(access_rules.c.id)).scalar_one()


def list_rules(conn: sa.Connection) -> list[sa.RowMapping]:
    t = access_rules
    return list(conn.execute(sa.select(t).order_by(t.c.priority, t.c.id)).mappings())


def get_rule(conn: sa.Connection, rule_id: int) -> sa.RowMapping:
    row = conn.execute(sa.select(access_rules).where(access_rules.c.id == rule_id)
                       ).mappings().one_or_none()
    if row is None:
        raise NotFound(f"no rule with id {rule_id}")
    return row


def remove_rule(conn: sa.Connection, rule_id: int) -> None:
    if conn.execute(access_rules.delete().where(access_rules.c.id == rule_id)).rowcount == 0:
        raise NotFound(f"no rule with id {rule_id}")


def set_enabled(conn: sa.Connection, rule_id: int, enabled: bool) -> None:
    res = conn.execute(access_rules.update().where(access_rules.c.id == rule_id)
                       .values(enabled=enabled))
    if res.rowcount == 0:
        raise NotFound(f"no rule with id {rule_id}")


def rule_of(row: sa.RowMapping) -> Rule:
    net = row["remote_network"]
    lnet = row["local_network"]
    return Rule(
        id=row["id"], action=row["action"], priority=row["priority"],
        enabled=row["enabled"], username=row["username"], domain=row["domain"],
        remote_network=ipaddress.ip_network(net) if net else None,
        local_network=ipaddress.ip_network(lnet) if lnet else None,
        protocol=row["protocol"], valid_from=row["valid_from"],
        valid_until=row["valid_until"], message=row["message"])


def load_rules(conn: sa.Connection) -> tuple[Rule, ...]:
    """Every enabled rule, in evaluation order."""
    rows = conn.execute(sa.select(access_rules).where(access_rules.c.enabled)).mappings()
    return order(rule_of(r) for r in rows)


def config_version_of(conn: sa.Connection) -> int:
    return conn.execute(sa.select(config_version.c.version)
                        .where(config_version.c.id == 1)).scalar_one()


def utc(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else value.astimezone(dt.timezone.utc)
