"""End to end through Dovecot 2.4 (its own auth_policy syntax, and fail_type):
failed rows, a block after three failures, rule remove lifts it, an exempt
network is never blocked. The 2.3 module (test_e2e_policy.py) says more."""

from __future__ import annotations

import json

import pytest

from tests.harness.cli import lastlogin
from tests.harness.daemon import wait_for
from tests.harness.dovecot import policy_config
from tests.harness.mailclients import imap_login_ok
from tests.harness.pg import free_port
from tests.harness.stack import running24
from tests.test_e2e_policy import (BLOCKED, EXEMPT, KEY, NO_DELAYS, OTHER, failed_rows,
                                   policy_settings)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(pg_url):
    port = free_port()
    with running24(pg_url, [b"alice", b"bob", b"carol"],
                   extra=policy_config(port, KEY, version="2.4") + NO_DELAYS,
                   **policy_settings(port)) as parts:
        yield parts


def test_failures_block_until_removed_and_exempt_is_never_blocked(stack):
    dovecot, daemon, engine = stack
    port = dovecot.imap_port
    for _ in range(3):
        assert not imap_login_ok(port, "alice", "wrong", source=BLOCKED)
    # a report is answered once handed to the recorder: the rows follow
    assert wait_for(lambda: len(failed_rows(engine, BLOCKED)) == 3, timeout=5)
    rows = failed_rows(engine, BLOCKED)
    assert [(r["username"], r["protocol"], str(r["local_ip"])) for r in rows] == [
        ("alice", "imap", "127.0.0.1")] * 3
    assert all(r["session_id"] and r["message"].startswith("authentication failed")
               for r in rows), [r["message"] for r in rows]
    assert not imap_login_ok(port, "bob", "secret", source=BLOCKED)
    assert imap_login_ok(port, "bob", "secret", source=OTHER)
    env = {"LASTLOGIN_DATABASE_URL": daemon.env["LASTLOGIN_DATABASE_URL"]}
    listed = json.loads(lastlogin("rule", "list", "--format", "json", env=env).stdout)
    (rule,) = [r for r in listed if r["remote_network"] == f"{BLOCKED}/32"]
    assert (rule["action"], rule["created_by"]) == ("deny", "auto") and rule["valid_until"]
    assert lastlogin("rule", "remove", str(rule["id"]), env=env).returncode == 0
    assert wait_for(lambda: imap_login_ok(port, "bob", "secret", source=BLOCKED),
                    timeout=1.0, interval=0.05)
    for _ in range(4):
        assert not imap_login_ok(port, "carol", "wrong", source=EXEMPT)
    assert imap_login_ok(port, "carol", "secret", source=EXEMPT)
    assert wait_for(lambda: len(failed_rows(engine, EXEMPT)) == 4, timeout=5)
