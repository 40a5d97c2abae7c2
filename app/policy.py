"""Access rules and the decision: pure, no I/O.

The first enabled rule that matches, by (priority, id), decides. When none
matches, the default action applies.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Union

IPNet = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

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

    def active_at(self, now: dt.datetime) -> bool:
        if self.valid_from is not None and now < self.valid_from:
            return False
        return self.valid_until is None or now < self.valid_until

    def matches(self, login: "LoginFacts") -> bool:
        return (self.enabled
                and self.active_at(login.now)
                and (self.protocol is None or self.protocol == login.protocol)
                and (self.username is None or self.username == login.username)
                and (self.domain is None or self.domain.lower() == login.domain)
                and _in(login.remote_ip, self.remote_network)
                and _in(login.local_ip, self.local_network))


def _in(addr: IPAddr | None, net: IPNet | None) -> bool:
    if net is None:
        return True
    if addr is None or addr.version != net.version:
        return False
    return addr in net


@functools.lru_cache(maxsize=65536)      # addresses repeat; parsing them is not cheap
def parse_ip(text: str | None) -> IPAddr | None:
    """An address for matching; an IPv4-mapped IPv6 address counts as IPv4."""
    if not text:
        return None
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def domain_of(username: str) -> str | None:
    if "@" not in username:
        return None
    return username.rsplit("@", 1)[1].lower() or None


@dataclass(frozen=True)
class LoginFacts:
    """What a decision looks at."""

    protocol: str
    username: str
    remote_ip: IPAddr | None
    local_ip: IPAddr | None
    now: dt.datetime

    @property
    def domain(self) -> str | None:
        return domain_of(self.username)

    @classmethod
    def of(cls, protocol: str, username: str, remote_ip: str | None,
           local_ip: str | None, now: dt.datetime) -> "LoginFacts":
        return cls(protocol, username, parse_ip(remote_ip), parse_ip(local_ip), now)


@dataclass(frozen=True)
class Decision:
    action: str
    rule: Rule | None = None
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.action == ALLOW

    @property
    def message(self) -> str | None:
        return self.rule.message if self.rule else None


def order(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """Rules in evaluation order (what decide() expects)."""
    return tuple(sorted(rules, key=lambda r: (r.priority, r.id)))


def decide(rules: tuple[Rule, ...] | None, login: LoginFacts,
           default: str = ALLOW, unloaded: str = ALLOW) -> Decision:
    """``rules`` in evaluation order; None means they were never loaded."""
    if rules is None:
        return Decision(unloaded, None, "no rules loaded yet")
    for rule in rules:
        if rule.matches(login):
            return Decision(rule.action, rule, f"rule {rule.id}")
    return Decision(default, None, "no rule matched")
