"""End to end: a real Dovecot 2.3 asks lastlogin before authentication and
reports after it (auth_policy_server_url), on PostgreSQL.

Clients connect from different loopback addresses (all of 127/8 is local),
so one Dovecot shows a blocked address, an unblocked one and an exempt one.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from app.db.schema import access_rules, login_events
from tests.harness.cli import lastlogin
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.dovecot import make_dovecot, policy_config
from tests.harness.mailclients import imap_login_ok
from tests.harness.pg import free_port
from tests.harness.stack import running

pytestmark = pytest.mark.e2e

KEY = "e2e-policy-key"
USERS = [b"alice", b"bob", b"carol"]
BLOCKED, OTHER, EXEMPT = "127.0.0.5", "127.0.0.6", "127.0.0.70"
# Failures are what this module is made of: no 2 s failure delay, and no
# auth penalty (Dovecot's own growing delay per failing address; a socket
# the auth process cannot open turns it off).
NO_DELAYS = """auth_failure_delay = 0
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
"""


def policy_settings(port: int) -> dict[str, str]:
    return dict(policy_listen=f"127.0.0.1:{port}", policy_api_key=KEY,
                block_after_failures="3", block_window="10min", block_for="1h",
                block_exempt_networks="127.0.0.64/26")


@pytest.fixture(scope="module")
def stack(pg_url):
    port = free_port()
    daemon = make_daemon(pg_url, protocols="imap,pop3", **policy_settings(port))
    dovecot = make_dovecot(daemon.socket_dir)
    dovecot.extra = policy_config(port, KEY) + NO_DELAYS
    with running(pg_url, daemon, dovecot, USERS) as parts:
        yield parts


def failed_rows(engine, remote_ip):
    t = login_events
    with engine.connect() as c:
        return c.execute(sa.select(t).where(t.c.outcome == "failed",
                                            t.c.remote_ip == remote_ip)
                         .order_by(t.c.occurred_at)).mappings().all()


def test_failures_recorded_then_the_address_blocked_until_the_rule_goes(stack):
    dovecot, daemon, engine = stack
    port = dovecot.imap_port
    for _ in range(3):
        assert not imap_login_ok(port, "alice", "wrong", source=BLOCKED)
    # a report is answered once handed to the recorder: the rows follow
    assert wait_for(lambda: len(failed_rows(engine, BLOCKED)) == 3, timeout=5)
    rows = failed_rows(engine, BLOCKED)
    assert [(r["username"], r["protocol"], str(r["local_ip"]), r["message"]) for r in rows] == [
        ("alice", "imap", "127.0.0.1", "authentication failed")] * 3
    assert all(r["session_id"] for r in rows) and len({r["session_id"] for r in rows}) == 3
    # the right password, another user, the same address: refused before the passdb
    assert not imap_login_ok(port, "bob", "secret", source=BLOCKED)
    assert imap_login_ok(port, "bob", "secret", source=OTHER)
    env = {"LASTLOGIN_DATABASE_URL": daemon.env["LASTLOGIN_DATABASE_URL"]}
    listed = json.loads(lastlogin("rule", "list", "--format", "json", env=env).stdout)
    (rule,) = [r for r in listed if r["remote_network"] == f"{BLOCKED}/32"]
    assert (rule["action"], rule["created_by"]) == ("deny", "auto") and rule["valid_until"]
    # bob's refusal was reported as a policy refusal, not counted again
    assert wait_for(lambda: len(failed_rows(engine, BLOCKED)) == 4, timeout=5)
    assert [r["message"] for r in failed_rows(engine, BLOCKED)][3:] == [
        "refused by the policy server before authentication"]
    assert lastlogin("rule", "remove", str(rule["id"]), env=env).returncode == 0
    assert wait_for(lambda: imap_login_ok(port, "bob", "secret", source=BLOCKED),
                    timeout=1.0, interval=0.05)


def test_an_exempt_network_is_never_blocked(stack):
    dovecot, _, engine = stack
    for _ in range(4):
        assert not imap_login_ok(dovecot.imap_port, "carol", "wrong", source=EXEMPT)
    assert imap_login_ok(dovecot.imap_port, "carol", "secret", source=EXEMPT)
    assert wait_for(lambda: len(failed_rows(engine, EXEMPT)) == 4, timeout=5)
    with engine.connect() as c:
        nets = c.execute(sa.select(access_rules.c.remote_network, access_rules.c.username)
                         ).all()
    assert all(str(n) != f"{EXEMPT}/32" and u != "carol" for n, u in nets)
