"""Access rules and the decision: pure, no I/O.

The first enabled rule that matches, by (priority, id), decides. When none
matches, the default action applies. ``login_decision`` is the one function
the daemon and `lastlogin check` both call; names and addresses are read by
the functions of ``names`` only.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from typing import Iterable

from .login import (IPAddr, IPNet, domain_of, in_network, normalize_domain, normalize_user,
                    parse_ip, user_key)

__all__ = ["ALLOW", "DENY", "Rule", "LoginFacts", "Decision", "decide", "order",
           "login_decision", "parse_ip", "domain_of"]

ALLOW = "allow"
DENY = "deny"


@dataclass(frozen=True)
class Rule:
    id: int
    action: str
    priority: int = 100
    enabled: bool = True
    username: str | None = None
    domain: str | None = None
    remote_network: IPNet | None = None
    local_network: IPNet | None = None
    protocol: str | None = None
    valid_from: dt.datetime | None = None
    valid_until: dt.datetime | None = None
    message: str | None = None
    # Where the client is (GeoIP): any of these countries / AS numbers;
    # None: any place, even an unknown one.
    countries: frozenset[str] | None = None
    asns: frozenset[int] | None = None
    created_by: str | None = None       # "auto": an automatic block (app/authpolicy.py)

    def __post_init__(self) -> None:
        # Held normalised, so matching is a plain comparison.
        if self.username is not None:
            object.__setattr__(self, "username", user_key(self.username))
        if self.domain is not None:
            object.__setattr__(self, "domain", normalize_domain(self.domain))

    def active_at(self, now: dt.datetime) -> bool:
        if self.valid_from is not None and now < self.valid_from:
            return False
        return self.valid_until is None or now < self.valid_until

    def concerns(self, username: str) -> bool:
        """Could this rule match a login of ``username`` (network, protocol
        and time aside)? What the dashboard lists on a user's page."""
        return ((self.username is None or self.username == user_key(username))
                and (self.domain is None or self.domain == domain_of(normalize_user(username))))

    def matches(self, login: "LoginFacts") -> bool:
        return (self.enabled
                and self.active_at(login.now)
                and (self.protocol is None or self.protocol == login.protocol)
                and (self.username is None or self.username == login.user)
                and (self.domain is None or self.domain == login.domain)
                and in_network(login.remote_ip, self.remote_network)
                and in_network(login.local_ip, self.local_network)
                and (self.countries is None or login.country in self.countries)
                and (self.asns is None or login.asn in self.asns))

    @property
    def by_place(self) -> bool:
        return self.countries is not None or self.asns is not None


@dataclass(frozen=True)
class LoginFacts:
    """What a decision looks at (built by ``of``, which normalises)."""

    protocol: str
    username: str           # trimmed, case kept
    remote_ip: IPAddr | None
    local_ip: IPAddr | None
    now: dt.datetime
    country: str | None = None      # GeoIP, from the full client address
    asn: int | None = None

    # computed once per login, not once per rule
    @functools.cached_property
    def user(self) -> str:
        """The username as rules compare it."""
        return user_key(self.username)

    @functools.cached_property
    def domain(self) -> str | None:
        return domain_of(self.username)

    @classmethod
    def of(cls, protocol: str, username: str, remote_ip: str | bytes | None,
           local_ip: str | bytes | None, now: dt.datetime, country: str | None = None,
           asn: int | None = None) -> "LoginFacts":
        return cls(protocol, normalize_user(username), parse_ip(remote_ip), parse_ip(local_ip),
                   now, country, asn)


@dataclass(frozen=True)
class Decision:
    action: str
    rule: Rule | None = None
    reason: str = ""
    # Refused because lastlogin cannot decide properly (no rules loaded):
    # the client gets the protocol's temporary-failure text, not a deny.
    temporary: bool = False

    @property
    def allowed(self) -> bool:
        return self.action == ALLOW

    @property
    def message(self) -> str | None:
        return self.rule.message if self.rule else None


def rule_state(enabled: bool, valid_from: dt.datetime | None, valid_until: dt.datetime | None,
               now: dt.datetime) -> str:
    """What a readable rule is now: on, off, expired or scheduled (`rule list`,
    the dashboard; a row the loader skips is 'skipped: why', app/db/rules)."""
    if not enabled:
        return "off"
    if valid_until is not None and valid_until <= now:
        return "expired"
    if valid_from is not None and valid_from > now:
        return "scheduled"
    return "on"


def order(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """Rules in evaluation order (what decide() expects)."""
    return tuple(sorted(rules, key=lambda r: (r.priority, r.id)))


def decide(rules: tuple[Rule, ...] | None, login: LoginFacts,
           default: str = ALLOW, unloaded: str = ALLOW) -> Decision:
    """``rules`` in evaluation order; None means they were never loaded."""
    if rules is None:
        return Decision(unloaded, None, "no rules loaded yet", temporary=True)
    for rule in rules:
        if rule.matches(login):
            return Decision(rule.action, rule, f"rule {rule.id}")
    return Decision(default, None, "no rule matched")


def login_decision(rules: tuple[Rule, ...] | None, protocol: str, username: str,
                   remote_ip: str | bytes | None, local_ip: str | bytes | None,
                   now: dt.datetime, default: str = ALLOW, unloaded: str = ALLOW,
                   country: str | None = None, asn: int | None = None) -> Decision:
    """The decision for one login: what the daemon enforces and `check` shows.

    ``country``/``asn``: where the client is (GeoIP); a rule by place never
    matches a login whose place is unknown.
    """
    return decide(rules, LoginFacts.of(protocol, username, remote_ip, local_ip, now,
                                       country, asn), default, unloaded)
