"""`lastlogin check` and the running daemon agree on every row of one table.

The same rules, the same logins (users differing in case and white space,
domains written with @, IPv4, IPv6 and IPv4-mapped clients, time windows,
protocols, server addresses): `check` is run as the CLI runs it, the daemon
is asked through its sockets, and the two verdicts (and the deciding rule)
must be the same -- and what the table says.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from click.testing import CliRunner

from app.cli import main_group
from app.db import make_engine
from app.db.rules import add_rule
from app.db.schema import login_events
from app.login import normalize_ip
from tests.builders import request_bytes
from tests.harness.daemon import make_daemon
from tests.harness.postlogin import send_request

HOUR = dt.timedelta(hours=1)

# name -> rule (ids are looked up by name: they differ between backends)
RULES = {
    "bob": dict(action="deny", username=" Bob@Example.COM "),
    "dom": dict(action="deny", domain="@Blocked.Example ", priority=50),
    "office-allow": dict(action="allow", domain="corp.example", remote_network="10.20.0.0/16",
                         priority=10),
    "office-deny": dict(action="deny", domain="corp.example", priority=20),
    "net6": dict(action="deny", remote_network="2001:db8:bad::/48"),
    "mapped": dict(action="deny", remote_network="::ffff:203.0.113.0/120"),
    "v4": dict(action="deny", remote_network="198.18.0.0/15"),
    "pop-only": dict(action="deny", username="popless@example.com", protocol="pop3"),
    "local": dict(action="deny", local_network="192.0.2.99/32"),
    "window-now": dict(action="deny", username="now@example.com", window=(-HOUR, HOUR)),
    "window-later": dict(action="deny", username="later@example.com", window=(HOUR, 2 * HOUR)),
    "window-over": dict(action="deny", username="over@example.com", window=(-2 * HOUR, -HOUR)),
}

# (username, remote ip, protocol, local ip) -> name of the deciding rule or None (allowed)
LOGINS = [
    ("bob@example.com", "198.51.100.7", "imap", "192.0.2.25", "bob"),
    ("BOB@EXAMPLE.COM", "198.51.100.7", "pop3", "192.0.2.25", "bob"),
    (" bob@example.com", "198.51.100.7", "submission", "192.0.2.25", "bob"),
    ("bobby@example.com", "198.51.100.7", "imap", "192.0.2.25", None),
    ("x@blocked.example", "198.51.100.7", "imap", "192.0.2.25", "dom"),
    ("x@BLOCKED.Example", "198.51.100.7", "managesieve", "192.0.2.25", "dom"),
    ("x@sub.blocked.example", "198.51.100.7", "imap", "192.0.2.25", None),
    ("ann@corp.example", "10.20.3.4", "imap", "192.0.2.25", "office-allow"),
    ("ann@corp.example", "::ffff:10.20.3.4", "imap", "192.0.2.25", "office-allow"),
    ("ann@corp.example", "10.21.3.4", "imap", "192.0.2.25", "office-deny"),
    ("c@example.com", "2001:db8:bad::1", "imap", "192.0.2.25", "net6"),
    ("c@example.com", "2001:db8:600d::1", "imap", "192.0.2.25", None),
    ("c@example.com", "203.0.113.9", "imap", "192.0.2.25", "mapped"),
    ("c@example.com", "::ffff:203.0.113.9", "pop3", "192.0.2.25", "mapped"),
    ("c@example.com", "::ffff:198.19.1.1", "imap", "192.0.2.25", "v4"),
    ("c@example.com", "198.19.1.1", "imap", "192.0.2.25", "v4"),
    ("popless@example.com", "198.51.100.7", "imap", "192.0.2.25", None),
    ("popless@example.com", "198.51.100.7", "pop3", "192.0.2.25", "pop-only"),
    ("d@example.com", "198.51.100.7", "imap", "192.0.2.99", "local"),
    ("d@example.com", "198.51.100.7", "imap", "::ffff:192.0.2.99", "local"),
    ("now@example.com", "198.51.100.7", "imap", "192.0.2.25", "window-now"),
    ("later@example.com", "198.51.100.7", "imap", "192.0.2.25", None),
    ("over@example.com", "198.51.100.7", "imap", "192.0.2.25", None),
]


def add_rules(engine) -> dict[str, int]:
    now = dt.datetime.now(dt.timezone.utc)
    ids = {}
    with engine.begin() as conn:
        for name, spec in RULES.items():
            spec = dict(spec)
            window = spec.pop("window", None)
            if window and window[1] < dt.timedelta(0):
                # an ended window: the CLI refuses it, so write it with SQL
                ids[name] = conn.execute(sa.text(
                    "INSERT INTO access_rules (action, username, valid_from, valid_until) "
                    "VALUES ('deny', :u, :f, :t) RETURNING id"),
                    {"u": spec["username"],
                     "f": (now + window[0]).replace(tzinfo=None).isoformat(" ")
                     if conn.dialect.name == "sqlite" else now + window[0],
                     "t": (now + window[1]).replace(tzinfo=None).isoformat(" ")
                     if conn.dialect.name == "sqlite" else now + window[1]}).scalar_one()
                continue
            if window:
                spec["valid_from"], spec["valid_until"] = now + window[0], now + window[1]
            ids[name] = add_rule(conn, **spec)
    return ids


def check_verdict(db_url: str, user: str, ip: str, protocol: str, local: str):
    result = CliRunner().invoke(main_group, ["check", user, ip, "--protocol", protocol,
                                             "--local-ip", local],
                                env={"LASTLOGIN_DATABASE_URL": db_url})
    lines = result.output.splitlines()
    assert result.exit_code in (0, 1), result.output
    rule = lines[1].split()[1] if lines[1].startswith("rule:     ") else None
    rule_id = int(rule) if rule and rule.isdigit() else None
    return ("allowed" if result.exit_code == 0 else "denied"), rule_id


def test_check_and_the_daemon_agree_on_every_row(db_url):
    engine = make_engine(db_url)
    ids = add_rules(engine)
    by_id = {v: k for k, v in ids.items()}
    d = make_daemon(db_url, protocols="imap,pop3,submission,managesieve")
    d.start()
    daemon = []
    try:
        for user, ip, proto, local, _ in LOGINS:
            ex = send_request(d.sock(proto), request_bytes(user.encode(), remote_ip=ip.encode(),
                                                           local_ip=local.encode()))
            daemon.append("denied" if ex.refused else "allowed")
    finally:
        d.stop()
    with engine.connect() as conn:
        events = conn.execute(sa.select(login_events.c.username, login_events.c.protocol,
                                        login_events.c.remote_ip, login_events.c.local_ip,
                                        login_events.c.outcome, login_events.c.rule_id)
                              .order_by(login_events.c.occurred_at)).all()
    engine.dispose()
    assert len(events) == len(LOGINS)       # one after the other: in the same order
    for (user, ip, proto, local, expected), seen, ev in zip(LOGINS, daemon, events):
        checked = check_verdict(db_url, user, ip, proto, local)
        key = (user, proto, ip, local)
        assert (ev.username, ev.protocol) == (user, proto)
        # stored as matched: one spelling for a v4-mapped address
        assert ev.remote_ip == normalize_ip(ip) and ev.local_ip == normalize_ip(local)
        rec = (ev.outcome, ev.rule_id)
        want = ("allowed" if expected is None or RULES[expected]["action"] == "allow"
                else "denied", ids[expected] if expected else None)
        row = f"{key}: table {expected}, check {checked}, daemon {seen}/{rec}"
        assert checked == want, row
        assert (seen, rec[0]) == (want[0], want[0]), row
        assert rec[1] == want[1], row
        assert by_id.get(checked[1]) == expected, row



