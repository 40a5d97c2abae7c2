"""Access rules in the database: validated writes, and loading for the daemon.

The loader reads rule by rule: a row it cannot use (written with plain SQL:
a network with host bits set, an unknown protocol, a broken time) is skipped
with a log line naming its id and why; every other rule still applies.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import sqlalchemy as sa

from ..errors import InvalidInput, NotFound
from ..login import (PROTOCOLS, asn_number, check_text, country_code, normalize_domain,
                     normalize_user, normalized_name, parse_network)
from ..policy import AUTO, Rule, order, rule_state
from .loading import Skipped, raw_columns, skip, strict_bool, when
from .schema import access_rules, config_version

RULE_FIELDS = ("action", "priority", "enabled", "username", "domain", "remote_network",
               "local_network", "protocol", "valid_from", "valid_until", "message",
               "comment", "created_by", "countries", "asns")
MATCH_FIELDS = ("username", "domain", "remote_network", "local_network", "protocol",
                "countries", "asns")
PLACE_FIELDS = ("countries", "asns")


def _items(field: str, value: Any) -> list[str]:
    if isinstance(value, str):
        items = [p for p in value.split(",")]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = [str(p) for p in value]
    else:
        raise InvalidInput(field, f"must be a comma-separated list, got {value!r}")
    items = [p.strip(" \t") for p in items]
    if not items or any(not p for p in items):
        raise InvalidInput(field, f"has an empty item: {value!r}")
    return items


def place_list(field: str, value: Any) -> str | None:
    """countries / asns as stored: sorted, unique, comma-separated ('AT,DE'); None: any."""
    if value is None:
        return None
    items = _items(field, value)
    if field == "countries":
        return ",".join(sorted({country_code(p, field) for p in items}))
    return ",".join(str(n) for n in sorted({asn_number(p, field) for p in items}))


def _network(field: str, value: Any) -> str | None:
    """A network as stored: canonical text; host bits set are an error."""
    if value is None:
        return None
    text = str(value)
    try:
        return str(parse_network(text, strict=True))
    except ValueError:
        pass
    try:
        loose = parse_network(text, strict=False)
    except ValueError:
        raise InvalidInput(field, f"not an IPv4 or IPv6 network: {text!r}") from None
    host = text.strip().split("/", 1)[0]
    raise InvalidInput(field, f"{text!r} has host bits set: write {loose} for the network "
                              f"or {host}/{loose.max_prefixlen} for the one address")


def _scope_text(field: str, value: Any, normalise) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be text, got {value!r}")
    return normalized_name(field, value, normalise)


def validate_rule(values: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise a rule's fields; raises InvalidInput naming the field.

    The same checks for a new rule and for a row the loader reads.
    """
    out = dict(values)
    if out.get("action") not in ("allow", "deny"):
        raise InvalidInput("action", f"must be allow or deny, got {out.get('action')!r}")
    proto = out.get("protocol")
    if proto is not None:
        proto = out["protocol"] = str(proto).strip().lower()
        if proto not in PROTOCOLS:
            raise InvalidInput("protocol", f"unknown protocol {values['protocol']!r} "
                               f"(known: {', '.join(PROTOCOLS)})")
    out["remote_network"] = _network("remote_network", out.get("remote_network"))
    out["local_network"] = _network("local_network", out.get("local_network"))
    out["username"] = _scope_text("username", out.get("username"), normalize_user)
    out["domain"] = _scope_text("domain", out.get("domain"), normalize_domain)
    for key in PLACE_FIELDS:
        if key in out:
            out[key] = place_list(key, out[key])
    start, end = out.get("valid_from"), out.get("valid_until")
    for key in ("valid_from", "valid_until"):
        if out.get(key) is not None and out[key].tzinfo is None:
            raise InvalidInput(key, "needs a time zone")
    if start and end and end <= start:
        raise InvalidInput("valid_until", f"the window ends ({end.isoformat()}) before it "
                           f"starts ({start.isoformat()})")
    if "priority" in out and (not isinstance(out["priority"], int)
                              or isinstance(out["priority"], bool)):
        raise InvalidInput("priority", "must be an integer")
    return out


def add_rule(conn: sa.Connection, *, everyone: bool = False, now: dt.datetime | None = None,
             **values: Any) -> int:
    """A new rule, with the guard rails of the CLI.

    A rule that matches every login needs ``everyone``; a window that has
    already ended is an error; messages and comments are one line of text.
    """
    unknown = set(values) - set(RULE_FIELDS)
    if unknown:
        raise TypeError(f"unknown rule fields: {sorted(unknown)}")
    row = validate_rule(values)
    check_text("message", row.get("message"))
    check_text("comment", row.get("comment"))
    has_match = any(row.get(k) is not None for k in MATCH_FIELDS)
    if not has_match and not everyone:
        raise InvalidInput("everyone", "a rule with no user, domain, network, local "
                                       "network, protocol, country or ASN to match would "
                                       "match every login: say so explicitly if that is "
                                       "meant")
    if has_match and everyone:
        raise InvalidInput("everyone", "cannot be combined with match options")
    now = now or dt.datetime.now(dt.timezone.utc)
    end = row.get("valid_until")
    if end is not None and end <= now:
        raise InvalidInput("valid_until", f"the window has already ended ({end.isoformat()})")
    return conn.execute(access_rules.insert().values(**row)
                        .returning(access_rules.c.id)).scalar_one()


def add_auto_block(conn: sa.Connection, *, valid_until: dt.datetime, comment: str,
                   priority: int, now: dt.datetime, username: str | None = None,
                   remote_network: str | None = None) -> int:
    """An automatic block (``created_by auto``) for one address or name: the
    one already in force is extended to ``valid_until`` instead of a second
    being added, so daemons on several mail hosts sharing the database that
    reach the threshold for the same address leave one rule, not one each.

    On PostgreSQL the look-and-add is serialised by a transaction-scoped
    advisory lock on the key (released at commit); SQLite writes one at a
    time anyway.
    """
    t = access_rules
    if conn.dialect.name == "postgresql":
        key = f"{username}\0{remote_network}".encode("utf-8", "surrogatepass")
        lock = int.from_bytes(hashlib.blake2b(b"lastlogin auto block\0" + key,
                                              digest_size=8).digest(), "big", signed=True)
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock)))
    # Only one in force: one an operator disabled stays as they left it, and a
    # new burst of failures gets a new block.
    same = [t.c.created_by == AUTO, t.c.enabled.is_(True), t.c.valid_until > now,
            t.c.username.is_(None) if username is None else t.c.username == username,
            (t.c.remote_network.is_(None) if remote_network is None
             else t.c.remote_network == remote_network)]
    found = conn.execute(sa.select(t.c.id, t.c.valid_until).where(*same)
                         .order_by(t.c.id).limit(1)).first()
    if found is None:
        return add_rule(conn, action="deny", priority=priority, username=username,
                        remote_network=remote_network, valid_until=valid_until,
                        comment=comment, created_by=AUTO, now=now)
    if found.valid_until < valid_until:
        conn.execute(t.update().where(t.c.id == found.id)
                     .values(valid_until=valid_until, comment=comment))
    return found.id


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


def purge_expired_auto(conn: sa.Connection, now: dt.datetime) -> int:
    """Delete automatic blocks (created_by 'auto') whose window has ended; how many."""
    t = access_rules
    return conn.execute(t.delete().where(t.c.created_by == AUTO,
                                         t.c.valid_until.is_not(None),
                                         t.c.valid_until <= now)).rowcount


def set_enabled(conn: sa.Connection, rule_id: int, enabled: bool) -> None:
    res = conn.execute(access_rules.update().where(access_rules.c.id == rule_id)
                       .values(enabled=enabled))
    if res.rowcount == 0:
        raise NotFound(f"no rule with id {rule_id}")


def rule_of(row: sa.RowMapping, dialect: sa.Dialect | None = None) -> Rule:
    """A stored row as a Rule; InvalidInput or ValueError if it cannot be one."""
    dialect = dialect or sa.dialects.sqlite.dialect()
    values = {k: row[k] for k in ("action", "priority", "username", "domain", "protocol",
                                  "remote_network", "local_network", "countries", "asns")}
    values["valid_from"] = when(row["valid_from"], dialect)
    values["valid_until"] = when(row["valid_until"], dialect)
    if isinstance(values["priority"], str):
        values["priority"] = int(values["priority"])
    v = validate_rule(values)
    return Rule(
        id=row["id"], action=v["action"], priority=v["priority"], enabled=bool(row["enabled"]),
        username=v["username"], domain=v["domain"],
        remote_network=parse_network(v["remote_network"]) if v["remote_network"] else None,
        local_network=parse_network(v["local_network"]) if v["local_network"] else None,
        protocol=v["protocol"], valid_from=v["valid_from"], valid_until=v["valid_until"],
        message=row["message"], created_by=row["created_by"],
        countries=frozenset(v["countries"].split(",")) if v["countries"] else None,
        asns=frozenset(int(n) for n in v["asns"].split(",")) if v["asns"] else None)


def load_rules(conn: sa.Connection, skipped: Skipped | None = None) -> tuple[Rule, ...]:
    """Every enabled rule that can be read, in evaluation order; others are skipped."""
    skipped = [] if skipped is None else skipped
    rules = []
    for row_id, rule, reason in _read_rules(conn):
        if reason is not None:
            skip(skipped, "access_rules", row_id, reason)
        elif rule is not None:
            rules.append(rule)
    return order(rules)


def rule_states(conn: sa.Connection, now: dt.datetime | None = None) -> dict[int, str]:
    """What the daemon makes of each row now: on, off, expired, scheduled or 'skipped: why'.

    `rule list` shows this beside the row, so a row the daemon does not apply
    (say enabled='true' written with SQL on SQLite) never looks like a rule in
    force.
    """
    states = {}
    now = now or dt.datetime.now(dt.timezone.utc)
    for row_id, rule, reason in _read_rules(conn):
        if reason is not None:
            skipped: Skipped = []
            skip(skipped, "access_rules", row_id, reason)
            states[row_id] = f"skipped: {skipped[0][2]}"
        elif rule is None:
            states[row_id] = "off"
        else:
            states[row_id] = rule_state(True, rule.valid_from, rule.valid_until, now)
    return states


def _read_rules(conn: sa.Connection):
    """(id, Rule or None when switched off, the reason it cannot be read or None) per row."""
    cols = raw_columns(access_rules, ("remote_network", "local_network", "valid_from",
                                      "valid_until", "enabled"))
    # Every row, enabled or not: a value of `enabled` that is not a boolean
    # (SQLite keeps 'true' as text, and reads it as false) is reported, not
    # silently taken for "off".
    for row in conn.execute(sa.select(*cols)).mappings():
        try:
            if not strict_bool("enabled", row["enabled"]):
                yield row["id"], None, None
                continue
            yield row["id"], rule_of(row, conn.dialect), None
        except (InvalidInput, ValueError, TypeError) as exc:
            yield row["id"], None, exc


def config_version_of(conn: sa.Connection) -> int | None:
    """The version of rules, overrides and alerts; None unless exactly one row holds it."""
    rows = conn.execute(sa.select(config_version.c.version).limit(2)).all()
    return int(rows[0][0]) if len(rows) == 1 else None


def config_version_rows(conn: sa.Connection) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(config_version)).scalar_one()


