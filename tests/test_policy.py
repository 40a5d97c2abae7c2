"""Decision tables for the pure rule evaluator."""

import datetime as dt
import ipaddress

import pytest

from app.login import parse_network
from app.policy import ALLOW, DENY, LoginFacts, Rule, decide, login_decision, order, parse_ip
from app.protocol import tempfail_line

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)
HOUR = dt.timedelta(hours=1)


def net(text):
    return ipaddress.ip_network(text)


def facts(user="alice@example.com", ip="198.51.100.7", protocol="imap",
          local="192.0.2.25", now=NOW):
    return LoginFacts.of(protocol, user, ip, local, now)


def verdict(rules, **kw):
    d = decide(order(rules), facts(**kw))
    return d.action, (d.rule.id if d.rule else None)


OFFICE = [Rule(1, ALLOW, 10, domain="example.org", remote_network=net("10.1.0.0/16")),
          Rule(2, DENY, 20, domain="example.org", message="office only")]


@pytest.mark.parametrize("rules,kw,expected", [
    ([], {}, (ALLOW, None)),                                              # default
    ([Rule(1, DENY, username="alice@example.com")], {}, (DENY, 1)),
    ([Rule(1, DENY, username="alice@example.com")], {"user": "Alice@Example.com"},
     (DENY, 1)),                                                          # any case
    ([Rule(1, DENY, username=" Bob@Example.com ")], {"user": "bob@example.com "},
     (DENY, 1)),                                                          # trimmed
    ([Rule(1, DENY, username="alice@example.com")], {"user": "alice@example.co"},
     (ALLOW, None)),
    ([Rule(1, DENY, domain="@Example.com ")], {"user": "x@EXAMPLE.COM"}, (DENY, 1)),
    ([Rule(1, DENY, domain="EXAMPLE.com")], {"user": "bob@Example.COM"}, (DENY, 1)),
    ([Rule(1, DENY, domain="example.com")], {"user": "bob@sub.example.com"}, (ALLOW, None)),
    ([Rule(1, DENY, domain="example.com")], {"user": "no-domain"}, (ALLOW, None)),
    (OFFICE, {"user": "ann@example.org", "ip": "10.1.2.3"}, (ALLOW, 1)),
    (OFFICE, {"user": "ann@example.org", "ip": "10.2.2.3"}, (DENY, 2)),
    (OFFICE, {"user": "ann@example.com", "ip": "10.2.2.3"}, (ALLOW, None)),
    # priorities: lower first, then id; order given does not matter
    ([Rule(5, ALLOW, 50), Rule(3, DENY, 10)], {}, (DENY, 3)),
    ([Rule(5, DENY, 10), Rule(3, ALLOW, 10)], {}, (ALLOW, 3)),
    # disabled rules never match
    ([Rule(1, DENY, enabled=False), Rule(2, DENY, 200)], {}, (DENY, 2)),
    # protocols
    ([Rule(1, DENY, protocol="pop3")], {"protocol": "imap"}, (ALLOW, None)),
    ([Rule(1, DENY, protocol="pop3")], {"protocol": "pop3"}, (DENY, 1)),
    # IPv4 / IPv6
    ([Rule(1, DENY, remote_network=net("2001:db8::/32"))], {"ip": "2001:db8:1::5"}, (DENY, 1)),
    ([Rule(1, DENY, remote_network=net("2001:db8::/32"))], {"ip": "198.51.100.7"},
     (ALLOW, None)),
    ([Rule(1, DENY, remote_network=net("198.51.100.0/24"))], {"ip": "::ffff:198.51.100.9"},
     (DENY, 1)),                                                          # v4-mapped
    ([Rule(1, DENY, remote_network=parse_network("::ffff:198.51.100.0/120"))],
     {"ip": "198.51.100.9"}, (DENY, 1)),                                  # mapped network
    ([Rule(1, DENY, remote_network=parse_network("::ffff:198.51.100.0/120"))],
     {"ip": "::ffff:198.51.100.9"}, (DENY, 1)),
    ([Rule(1, DENY, remote_network=net("0.0.0.0/0"))], {"ip": None}, (ALLOW, None)),
    ([Rule(1, DENY, local_network=net("192.0.2.25/32"))], {}, (DENY, 1)),
    ([Rule(1, DENY, local_network=net("192.0.2.26/32"))], {}, (ALLOW, None)),
    # windows: [from, until)
    ([Rule(1, DENY, valid_from=NOW - HOUR, valid_until=NOW + HOUR)], {}, (DENY, 1)),
    ([Rule(1, DENY, valid_from=NOW + HOUR)], {}, (ALLOW, None)),
    ([Rule(1, DENY, valid_until=NOW)], {}, (ALLOW, None)),
    ([Rule(1, DENY, valid_from=NOW)], {}, (DENY, 1)),
    # overlaps: a narrow allow before a broad deny
    ([Rule(1, DENY, 100, remote_network=net("203.0.113.0/24")),
      Rule(2, ALLOW, 1, username="ops@example.com")],
     {"user": "ops@example.com", "ip": "203.0.113.5"}, (ALLOW, 2)),
    ([Rule(1, DENY, 100, remote_network=net("203.0.113.0/24")),
      Rule(2, ALLOW, 1, username="ops@example.com")],
     {"user": "dev@example.com", "ip": "203.0.113.5"}, (DENY, 1)),
])
def test_decision_table(rules, kw, expected):
    assert verdict(rules, **kw) == expected


def test_unloaded_and_default_actions():
    assert decide(None, facts(), unloaded=DENY).action == DENY
    assert decide(None, facts(), unloaded=DENY).temporary      # a temporary failure
    assert not decide((Rule(1, DENY),), facts()).temporary     # a rule's deny is not
    assert decide(None, facts()).reason == "no rules loaded yet"
    assert decide((), facts(), default=DENY).action == DENY


def test_decision_message():
    d = decide(order(OFFICE), facts(user="x@example.org", ip="192.0.2.9"))
    assert d.message == "office only" and not d.allowed


def test_parse_ip():
    assert str(parse_ip("fe80::1%eth0")) == "fe80::1"
    assert parse_ip("") is None and parse_ip("junk") is None


def test_parse_network_maps_v4_mapped_and_refuses_host_bits_when_strict():
    assert str(parse_network("::ffff:10.0.0.0/104")) == "10.0.0.0/8"
    assert str(parse_network("10.1.2.3/8")) == "10.0.0.0/8"
    with pytest.raises(ValueError):
        parse_network("10.1.2.3/8", strict=True)
    assert str(parse_network("2001:db8::/32")) == "2001:db8::/32"


def test_login_decision_takes_bytes_and_text_alike():
    rules = order([Rule(1, DENY, remote_network=net("198.51.100.0/24"))])
    a = login_decision(rules, "imap", "x", b"::ffff:198.51.100.7", b"192.0.2.25", NOW)
    b = login_decision(rules, "imap", "x", "198.51.100.7", None, NOW)
    assert (a.action, a.rule.id) == (b.action, b.rule.id) == (DENY, 1)


@pytest.mark.parametrize("protocol,line", [
    ("imap", b"* BYE [UNAVAILABLE] Temporary server failure, try again later.\r\n"),
    ("pop3", b"-ERR [SYS/TEMP] Temporary server failure, try again later.\r\n"),
    ("submission", b"421 4.3.0 Temporary server failure, try again later.\r\n"),
    ("managesieve", b'BYE (TRYLATER) "Temporary server failure, try again later."\r\n'),
])
def test_temporary_failure_lines(protocol, line):
    assert tempfail_line(protocol) == line
    # one line whatever the text: no injection into the session
    said = tempfail_line(protocol, 'spool full\r\n* OK "x"')
    assert said.count(b"\r\n") == 1 and said.endswith(b"\r\n")


# --- the rule index decides exactly as the scan does ---------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from app import policy  # noqa: E402

_NOW = dt.datetime(2026, 11, 26, 12, tzinfo=dt.timezone.utc)
_USERS = ["alice", "Alice@Example.com", "bob@example.com", "carol@other.org", "dave"]
_NETS = [None, None, "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32",
         "192.0.2.0/24", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1:2::/64",
         "::ffff:10.1.2.0/120", "0.0.0.0/0", "::/0"]
_IPS = [None, "10.1.2.3", "10.1.9.9", "10.200.0.1", "192.0.2.77", "203.0.113.5",
        "2001:db8:1:2::5", "2001:db8:9::1", "::ffff:10.1.2.3", "2001:db9::1"]

_rules = st.lists(st.builds(
    lambda i, action, prio, enabled, user, dom, net, lnet, proto, window: Rule(
        id=i, action=action, priority=prio, enabled=enabled, username=user, domain=dom,
        remote_network=None if net is None else parse_network(net),
        local_network=None if lnet is None else parse_network(lnet), protocol=proto,
        valid_from=None if window is None else _NOW + dt.timedelta(hours=window),
        valid_until=None if window is None else _NOW + dt.timedelta(hours=window + 2)),
    st.integers(1, 10_000), st.sampled_from([ALLOW, DENY]), st.integers(0, 5), st.booleans(),
    st.sampled_from([None, None, *_USERS]),
    st.sampled_from([None, None, "example.com", "other.org"]), st.sampled_from(_NETS),
    st.sampled_from([None, None, "127.0.0.0/8"]), st.sampled_from([None, "imap", "pop3"]),
    st.sampled_from([None, None, -1, -3])), max_size=60, unique_by=lambda r: r.id)


@settings(max_examples=300, deadline=None)
@given(_rules, st.sampled_from(_USERS + ["eve@example.com", "x"]), st.sampled_from(_IPS),
       st.sampled_from([None, "127.0.0.1", "192.0.2.1"]), st.sampled_from(["imap", "pop3"]),
       st.booleans())
def test_the_index_decides_as_the_scan_does(rules, user, rip, lip, proto, blocked):
    ordered = order(rules)
    auto = policy.AutoBlocks.of([Rule(id=5000, action=DENY, priority=2, created_by="auto",
                                      remote_network=parse_network("10.1.2.3/32"))]
                                ) if blocked else None
    login = LoginFacts.of(proto, user, rip, lip, _NOW)
    scanned = indexed = None
    saved = policy.INDEX_FROM
    try:
        policy.INDEX_FROM = 10 ** 9
        scanned = decide(ordered, login, auto=auto)
        policy.INDEX_FROM = 0
        indexed = decide(ordered, login, auto=auto)
    finally:
        policy.INDEX_FROM = saved
    assert indexed == scanned


def test_the_index_yields_its_candidates_lazily_in_order():
    # 1000 rules for any address (protocol-only) and an early match: the index
    # must not build and sort every candidate before the first is tested
    class Looked(tuple):
        looked = 0

        def __getitem__(self, i):
            Looked.looked += 1
            return tuple.__getitem__(self, i)

    rules = Looked(order([Rule(id=1, action=ALLOW, priority=1, protocol="imap")]
                         + [Rule(id=i, action=DENY, protocol="pop3") for i in range(2, 1000)]
                         + [Rule(id=1000, action=DENY, username="bob")]))
    index = policy.RuleIndex(rules)
    login = LoginFacts.of("imap", "bob", "10.1.2.3", None, _NOW)
    Looked.looked = 0
    first = next(iter(index.candidates(login)))
    assert (first.id, Looked.looked) == (1, 1)
    assert [r.id for r in index.candidates(login)] == list(range(1, 1001))
