"""Access rules and the decision: pure, no I/O.

The first enabled rule that matches, by (priority, id), decides. When none
matches, the default action applies. ``login_decision`` is the one function
the daemon and `lastlogin check` both call; names and addresses are read by
the functions of ``names`` only.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .login import (IPAddr, IPNet, domain_of, in_network, normalize_domain, normalize_user,
                    parse_ip, user_key)

__all__ = ["ALLOW", "DENY", "AUTO", "Rule", "LoginFacts", "Decision", "AutoBlocks", "decide",
           "order", "login_decision", "parse_ip", "domain_of"]

ALLOW = "allow"
DENY = "deny"
AUTO = "auto"           # created_by of an automatic block (app/authpolicy.py)


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


def block_key(addr: IPAddr, v6_prefix: int) -> IPNet:
    """The network an automatic block by address covers: the address itself
    (IPv4), its /``v6_prefix`` (IPv6: one client usually holds a whole /64)."""
    if addr.version == 4:
        return ipaddress.ip_network(f"{addr}/32")
    return ipaddress.ip_network(f"{addr}/{v6_prefix}", strict=False)


def net_key(net: IPNet) -> tuple[int, int, int]:
    """A cheap dict key for a network: (version, first address, prefix length)."""
    return net.version, int(net.network_address), net.prefixlen


def addr_key(addr: IPAddr, prefixlen: int) -> tuple[int, int, int]:
    """``net_key`` of the /``prefixlen`` holding ``addr``, without building it."""
    bits = 32 if addr.version == 4 else 128
    return addr.version, int(addr) >> (bits - prefixlen) << (bits - prefixlen), prefixlen


@dataclass(frozen=True)
class AutoBlocks:
    """Automatic blocks (rules created_by ``auto``), looked up in O(1).

    Each is an ordinary deny rule held in a dict keyed by its network or its
    normalised username instead of in the ordered rule list, so the check
    costs the same with 10 blocks or 100,000. ``exempt``: networks an
    automatic block never applies to (block_exempt_networks), before
    authentication and at post-login alike.
    """

    by_net: dict = field(default_factory=dict)      # net_key(IPNet) -> Rule
    by_user: dict = field(default_factory=dict)     # user_key -> Rule
    exempt: tuple = ()

    @classmethod
    def of(cls, rules: Iterable[Rule], exempt: tuple = ()) -> "AutoBlocks":
        out = cls(exempt=exempt)
        for rule in rules:
            out.put(rule)
        return out

    def put(self, rule: Rule) -> None:
        if rule.remote_network is not None:
            self.by_net[net_key(rule.remote_network)] = rule
        elif rule.username is not None:
            self.by_user[rule.username] = rule

    def __len__(self) -> int:
        return len(self.by_net) + len(self.by_user)

    def with_exempt(self, exempt: tuple) -> "AutoBlocks":
        return AutoBlocks(self.by_net, self.by_user, exempt) if exempt != self.exempt else self

    def exempted(self, login: "LoginFacts") -> bool:
        ip = login.remote_ip
        return ip is not None and any(in_network(ip, n) for n in self.exempt)

    def of_address(self, ip: IPAddr) -> list[Rule]:
        """The blocks whose network holds ``ip`` (an IPv4 address, or an IPv6
        address and its /64, /56, /48), in force or not."""
        if not self.by_net:
            return []
        prefixes = (32,) if ip.version == 4 else (128, 64, 56, 48)
        return [r for r in (self.by_net.get(addr_key(ip, p)) for p in prefixes)
                if r is not None]

    def find(self, login: "LoginFacts") -> Rule | None:
        """The automatic block in force for this login, if any."""
        if not self.by_net and not self.by_user:
            return None
        if self.exempted(login):
            return None
        ip = login.remote_ip
        if ip is not None:
            for rule in self.of_address(ip):
                if rule.matches(login):
                    return rule
        if self.by_user:
            rule = self.by_user.get(login.user)
            if rule is not None and rule.matches(login):
                return rule
        return None


# Up to this many rules are simply scanned; past it the index below picks
# the ones that can match, which costs about the same as scanning ~10 rules.
INDEX_FROM = 16


class RuleIndex:
    """The rules that can match a login, in evaluation order, without testing
    each: a rule with a remote network can only match an address inside it
    (looked up by prefix, one dict per prefix length in use), one with a
    username (and no network) only that user, one with a domain only that
    domain; the rest are always candidates. Every candidate is still tested
    with ``Rule.matches``, so the decision is the scan's, only cheaper: with
    200 network rules ~10x less work per check.
    """

    __slots__ = ("rules", "always", "by_user", "by_domain", "nets")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.always: list[int] = []
        self.by_user: dict[str, list[int]] = {}
        self.by_domain: dict[str, list[int]] = {}
        nets: dict[int, dict[int, dict[int, list[int]]]] = {4: {}, 6: {}}
        for pos, rule in enumerate(rules):
            net = rule.remote_network
            if net is not None:
                shift = (32 if net.version == 4 else 128) - net.prefixlen
                nets[net.version].setdefault(shift, {}).setdefault(
                    int(net.network_address) >> shift, []).append(pos)
            elif rule.username is not None:
                self.by_user.setdefault(rule.username, []).append(pos)
            elif rule.domain is not None:
                self.by_domain.setdefault(rule.domain, []).append(pos)
            else:
                self.always.append(pos)
        self.nets = {v: tuple(t.items()) for v, t in nets.items()}

    def candidates(self, login: "LoginFacts") -> Iterable[Rule]:
        """In order, lazily: the hits for this login (few) are sorted, the
        ``always`` positions (any number) are walked and merged with them,
        so decide() stops at the first match without having built or sorted
        the rest (many ``always`` rules, an early match: as cheap as the scan)."""
        hits: list[int] = []
        if self.by_user:
            hits += self.by_user.get(login.user, ())
        if self.by_domain and login.domain is not None:
            hits += self.by_domain.get(login.domain, ())
        ip = login.remote_ip
        if ip is not None:
            n = int(ip)
            for shift, table in self.nets[ip.version]:
                hit = table.get(n >> shift)
                if hit:
                    hits += hit
        get = self.rules.__getitem__
        if not self.always:
            hits.sort()
            return map(get, hits)
        if not hits:
            return map(get, self.always)
        hits.sort()
        return map(get, _merged(self.always, hits))


def _merged(a: list[int], b: list[int]) -> Iterator[int]:
    """Two ascending lists as one, lazily."""
    j, n = 0, len(b)
    for pos in a:
        while j < n and b[j] < pos:
            yield b[j]
            j += 1
        yield pos
    while j < n:
        yield b[j]
        j += 1


_last_index: tuple[tuple[Rule, ...], RuleIndex] | None = None


def _candidates(rules: tuple[Rule, ...], login: "LoginFacts") -> "Iterable[Rule]":
    """``rules``, or the ones of them that can match (RuleIndex), in order.
    The index of the last rule set is kept: the daemon's rules are one tuple
    until a reload makes a new one."""
    global _last_index
    if len(rules) < INDEX_FROM:
        return rules
    last = _last_index
    if last is None or last[0] is not rules:
        last = _last_index = (rules, RuleIndex(rules))
    return last[1].candidates(login)


def order(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """Rules in evaluation order (what decide() expects)."""
    return tuple(sorted(rules, key=lambda r: (r.priority, r.id)))


def decide(rules: tuple[Rule, ...] | None, login: LoginFacts,
           default: str = ALLOW, unloaded: str = ALLOW, auto=None) -> Decision:
    """``rules`` in evaluation order; None means they were never loaded.

    ``auto``: automatic blocks (anything with ``find(login)``, e.g.
    AutoBlocks), decided in their place in the (priority, id) order. With no
    rules loaded, a block held in memory still rejects; otherwise the
    unloaded decision applies.
    """
    block = auto.find(login) if auto is not None else None
    if rules is None:
        if block is not None:
            return Decision(block.action, block, f"automatic block {block.id}")
        return Decision(unloaded, None, "no rules loaded yet", temporary=True)
    for rule in _candidates(rules, login):
        if block is not None and (rule.priority, rule.id) > (block.priority, block.id):
            break
        if rule.matches(login):
            return Decision(rule.action, rule, f"rule {rule.id}")
    if block is not None:
        return Decision(block.action, block, f"rule {block.id} (automatic block)")
    return Decision(default, None, "no rule matched")


def login_decision(rules: tuple[Rule, ...] | None, protocol: str, username: str,
                   remote_ip: str | bytes | None, local_ip: str | bytes | None,
                   now: dt.datetime, default: str = ALLOW, unloaded: str = ALLOW,
                   country: str | None = None, asn: int | None = None,
                   auto=None) -> Decision:
    """The decision for one login: what the daemon enforces and `check` shows.

    ``country``/``asn``: where the client is (GeoIP); a rule by place never
    matches a login whose place is unknown.
    """
    return decide(rules, LoginFacts.of(protocol, username, remote_ip, local_ip, now,
                                       country, asn), default, unloaded, auto)
