"""Userdb overrides and login alerts: what an allowed login gets. Pure, no I/O.

``plan`` is the planning step of a login: the overrides that apply (user
beats domain beats global), expanded for this login, merged into Dovecot's
fields, system groups added to acl_groups, and the alerts to show.
"""

from __future__ import annotations

import dataclasses

import datetime as dt
import re
from dataclasses import dataclass, field

from .errors import InvalidInput
from .login import control_char, domain_of, normalize_domain, scope_key, scope_value, user_key
from .protocol import alert_line, field_key, field_value, LoginRequest
from .templates import LoginVars, check_template, expand, expand_fields

SCOPES = ("global", "domain", "user")

# Fields that say who the session is: Dovecot must get them back exactly as
# it sent them (protocol spec §7.1), so no override may touch them.
PROTECTED_KEYS = frozenset({"auth_mech", "auth_token", "auth_user", "auth_token_session_pid",
                            "local_name", "master_user", "user", "username", "orig_user",
                            "session", "session_pid"})
# Who the session runs as, or which ids and groups it may use: only with an
# explicit flag, never root (0), never a template, a plain id or name each.
ID_KEYS = frozenset({"uid", "gid", "mail_uid", "mail_gid", "mail_access_groups",
                     "mail_privileged_group", "system_groups_user", "first_valid_uid",
                     "last_valid_uid", "first_valid_gid", "last_valid_gid"})
_ID = re.compile(r"[0-9]+|[A-Za-z_][A-Za-z0-9_.-]*")      # an id, or a name

# Keys one Dovecot version reads and the other ignores (spec §7.2, §7.3).
IGNORED_BY = {
    "2.4": {"mail": "2.4 ignores it: use mail_driver and mail_path",
            "mail_location": "2.4 has no mail_location: use mail_driver and mail_path",
            "quota_rule": "2.4 replaced quota rules: use quota_storage_size and friends"},
    "2.3": {"mail_driver": "2.3 does not know it (a plugin setting there): use mail",
            "mail_path": "2.3 does not know it (a plugin setting there): use mail",
            "quota_storage_size": "2.3 does not know it: use quota_rule=*:storage=..."},
}


def validate_key(key: str, allow_ids: bool = False) -> str:
    if not key:
        raise InvalidInput("key", "must not be empty")
    if "=" in key:
        raise InvalidInput("key", f"must not contain '=': {key!r}")
    bad = control_char(key)
    if bad:
        raise InvalidInput("key", f"must not contain {bad}: {key!r}")
    if any(ch.isspace() for ch in key):
        raise InvalidInput("key", f"must not contain white space: {key!r}")
    base = key.lower().rsplit("/", 1)[-1]     # 2.4: set/mail_uid, namespace/x/...
    if base in PROTECTED_KEYS:
        raise InvalidInput("key", f"{key} must reach Dovecot unchanged; it cannot be overridden")
    if base in ID_KEYS and not allow_ids:
        raise InvalidInput("key", f"{key} changes who the session runs as; "
                                  f"give --allow-uid-gid to set it")
    return key


def validate_value(key: str, value: str) -> str:
    """A value Dovecot gets intact and the operator's terminal shows safely: no
    control character at all (NUL, TAB, CR, LF, ESC ...), known variables only."""
    bad = control_char(value)
    if bad:
        raise InvalidInput("value", f"must not contain {bad}")
    if key.lower().rsplit("/", 1)[-1] in ID_KEYS:
        _check_ids(key, value)
    return check_template("value", value)


def _check_ids(key: str, value: str) -> None:
    """An id key: plain decimal ids or names (a comma list for groups), none root."""
    items = [v.strip() for v in value.split(",")]
    if not value.strip() or not all(items):
        raise InvalidInput("value", f"{key} must not be empty")
    for item in items:
        if not _ID.fullmatch(item):
            raise InvalidInput("value", f"{key} takes plain ids or names, not {item!r}")
        if item == "root" or (item.isdigit() and int(item) == 0):
            raise InvalidInput("value", f"{key} 0 (root) is never allowed")


def validate_override(key: str, value: str, allow_ids: bool = False) -> None:
    """Every check an override passes, from the CLI or from a row in the table."""
    validate_key(key, allow_ids)
    validate_value(key, value)


def version_warning(key: str, dovecot_version: str) -> str | None:
    base = key.rstrip("0123456789") if key.startswith("quota_rule") else key
    return IGNORED_BY.get(dovecot_version, {}).get(base)


def validate_scope(scope: str, value: str | None) -> tuple[str, str]:
    """(scope, its value as stored), through the one scope normaliser."""
    if scope not in SCOPES:
        raise InvalidInput("scope", f"must be one of {', '.join(SCOPES)}")
    return scope, scope_value(scope, value)


@dataclass(frozen=True)
class Overrides:
    """Every override, by scope: global, per domain, per user."""

    global_: dict[str, str] = field(default_factory=dict)
    domains: dict[str, dict[str, str]] = field(default_factory=dict)
    users: dict[str, dict[str, str]] = field(default_factory=dict)

    def count(self) -> int:
        return (len(self.global_) + sum(map(len, self.domains.values()))
                + sum(map(len, self.users.values())))

    def for_login(self, username: str, domain: str | None = None) -> dict[str, str]:
        """user beats domain beats global (keys: ``names.scope_key``)."""
        merged = dict(self.global_)
        domain = domain_of(username) if domain is None else normalize_domain(domain)
        if domain:
            merged.update(self.domains.get(domain, {}))
        merged.update(self.users.get(user_key(username), {}))
        return merged


def merge_fields(fields: list[bytes], overrides: dict[str, str]) -> list[bytes]:
    """Dovecot's fields with overrides applied: a key never appears twice.

    An overridden field keeps its place; a new one is added at the end.
    """
    if not overrides:
        return fields
    wanted = {k.encode(): v.encode() for k, v in overrides.items()}
    out: list[bytes] = []
    done: set[bytes] = set()
    for f in fields:
        key = field_key(f)
        if key in wanted:
            if key not in done:
                out.append(key + b"=" + wanted[key])
                done.add(key)
            continue
        out.append(f)
    out += [k + b"=" + v for k, v in wanted.items() if k not in done]
    return out


def union_list(current: str | None, extra: list[str]) -> str:
    """A comma-separated list with ``extra`` appended, without repeats."""
    items = [x.strip() for x in (current or "").split(",") if x.strip()]
    for x in extra:
        if x not in items:
            items.append(x)
    return ",".join(items)


@dataclass(frozen=True)
class Alert:
    id: int
    scope: str
    scope_value: str
    message: str
    valid_from: dt.datetime | None = None
    valid_until: dt.datetime | None = None
    show_once: bool = False

    def applies(self, username: str, domain: str | None, now: dt.datetime) -> bool:
        if self.valid_from is not None and now < self.valid_from:
            return False
        if self.valid_until is not None and now >= self.valid_until:
            return False
        if self.scope == "global":
            return True
        if self.scope == "domain":
            return domain is not None and normalize_domain(domain) == scope_key(
                "domain", self.scope_value)
        return user_key(username) == scope_key("user", self.scope_value)


def alerts_for(alerts: tuple[Alert, ...], delivered: set[tuple[int, str]], username: str,
               domain: str | None, now: dt.datetime) -> list[Alert]:
    return [a for a in alerts if a.applies(username, domain, now)
            and not (a.show_once and (a.id, username) in delivered)]


@dataclass(frozen=True)
class Plan:
    """What an allowed login gets: the fields to send and the alerts to show."""

    fields: list[bytes]
    alerts: list[int]               # show-once alerts it displays (remembered)
    alert_bytes: bytes
    shown: int = 0                  # alerts it displays, all of them


def plan(overrides: "Overrides | None", alerts: tuple[Alert, ...],
         delivered: set[tuple[int, str]], protocol: str, req: LoginRequest, user: str,
         now: dt.datetime, system_groups: tuple[str, ...] = (),
         last_login: tuple[str, str, str] | None = None) -> Plan:
    """Fields and alerts for an allowed login.

    Override values and alert texts are expanded for this login; an unsafe
    expansion raises ExpansionRefused (the login must be refused).
    """
    domain = domain_of(user)
    wanted = overrides.for_login(user, domain) if overrides is not None else {}
    # IMAP only: elsewhere an unsolicited line would break the session.
    shown = alerts_for(alerts, delivered, user, domain, now) if protocol == "imap" else []
    if wanted or shown:             # most logins have nothing to expand
        tvars = LoginVars.of(req.username, protocol, req.remote_ip, req.local_ip)
        if last_login is not None:
            tvars = dataclasses.replace(tvars, last_login_time=last_login[0],
                                        last_login_ip=last_login[1],
                                        last_login_country=last_login[2])
        wanted = expand_fields(wanted, tvars)
    if system_groups:
        base = wanted.get("acl_groups")
        if base is None:
            current = field_value(req.fields, b"acl_groups")
            base = current.decode("utf-8", "replace") if current is not None else None
        wanted = {**wanted, "acl_groups": union_list(base, list(system_groups))}
    fields = merge_fields(req.fields, wanted)
    return Plan(fields, [a.id for a in shown if a.show_once],
                b"".join(alert_line(expand(a.message, tvars)) for a in shown), len(shown))
