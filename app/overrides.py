"""Userdb overrides and login alerts: pure merging and selection, no I/O."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from .errors import InvalidInput
from .protocol import field_key

SCOPES = ("global", "domain", "user")

# Fields Dovecot must get back exactly as it sent them (protocol spec §7.1).
PROTECTED_KEYS = frozenset({"auth_mech", "auth_token", "auth_user", "auth_token_session_pid",
                            "local_name", "master_user"})

# Keys one Dovecot version reads and the other ignores (spec §7.2, §7.3).
IGNORED_BY = {
    "2.4": {"mail": "2.4 ignores it: use mail_driver and mail_path",
            "mail_location": "2.4 has no mail_location: use mail_driver and mail_path",
            "quota_rule": "2.4 replaced quota rules: use quota_storage_size and friends"},
    "2.3": {"mail_driver": "2.3 does not know it (a plugin setting there): use mail",
            "mail_path": "2.3 does not know it (a plugin setting there): use mail",
            "quota_storage_size": "2.3 does not know it: use quota_rule=*:storage=..."},
}


def validate_key(key: str) -> str:
    if not key:
        raise InvalidInput("KEY", "must not be empty")
    for bad, name in (("=", "'='"), ("\t", "a TAB"), ("\n", "a line feed"), ("\r", "a CR"),
                      ("\x01", "byte 0x01"), ("\x00", "a NUL byte")):
        if bad in key:
            raise InvalidInput("KEY", f"must not contain {name}: {key!r}")
    if key in PROTECTED_KEYS:
        raise InvalidInput("KEY", f"{key} must reach Dovecot unchanged; it cannot be overridden")
    return key


def version_warning(key: str, dovecot_version: str) -> str | None:
    base = key.rstrip("0123456789") if key.startswith("quota_rule") else key
    return IGNORED_BY.get(dovecot_version, {}).get(base)


def validate_scope(scope: str, value: str | None) -> tuple[str, str]:
    if scope == "global":
        return scope, ""
    if scope not in SCOPES:
        raise InvalidInput("scope", f"must be one of {', '.join(SCOPES)}")
    if not value or not value.strip():
        raise InvalidInput(f"--{scope}", "must not be empty")
    return scope, value.strip().lower().lstrip("@") if scope == "domain" else value


@dataclass(frozen=True)
class Overrides:
    """Every override, by scope: global, per domain, per user."""

    global_: dict[str, str] = field(default_factory=dict)
    domains: dict[str, dict[str, str]] = field(default_factory=dict)
    users: dict[str, dict[str, str]] = field(default_factory=dict)

    def count(self) -> int:
        return (len(self.global_) + sum(map(len, self.domains.values()))
                + sum(map(len, self.users.values())))

    def for_login(self, username: str, domain: str | None) -> dict[str, str]:
        """user beats domain beats global."""
        merged = dict(self.global_)
        if domain:
            merged.update(self.domains.get(domain, {}))
        merged.update(self.users.get(username, {}))
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
            return domain == self.scope_value
        return username == self.scope_value


def alerts_for(alerts: tuple[Alert, ...], delivered: set[tuple[int, str]], username: str,
               domain: str | None, now: dt.datetime) -> list[Alert]:
    return [a for a in alerts if a.applies(username, domain, now)
            and not (a.show_once and (a.id, username) in delivered)]
