"""End to end with Dovecot 2.4 (Debian 13's 2.4.1, in a chroot).

The post-login wire protocol is the same as in 2.3; what these tests pin
down is that lastlogin works with a 2.4 configuration and that 2.4's field
names (mail_path, not mail) are what an override must use there.
"""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.overrides import set_override
from app.db.rules import add_rule
from app.importer import import_logs
from tests.harness.dovecot24 import MAIL_UID
from tests.harness.stack import running24
from tests.harness.db import events_of, last_of
from tests.harness.mailclients import imap_login, pop3_login, raw_session

pytestmark = pytest.mark.e2e

USERS = [b"alice@example.com", b"bob@example.com", b"carol@example.com", b"mallory@example.com"]


@pytest.fixture(scope="module")
def stack(pg_url):
    with running24(pg_url, USERS) as parts:
        yield parts


def test_imap_and_pop3_logins_through_dovecot_24(stack):
    dovecot, daemon, engine = stack
    imap_login(dovecot.imap_port, b"alice@example.com").logout()
    pop3_login(dovecot.pop3_port, b"alice@example.com").quit()
    events = events_of(engine, b"alice@example.com")
    assert [(e.protocol, e.outcome, e.remote_ip) for e in events] == [
        ("imap", "allowed", "127.0.0.1"), ("pop3", "allowed", "127.0.0.1")]
    assert last_of(engine, b"alice@example.com", "imap").login_count == 1
    assert "Dovecot v2.4" in dovecot.logs()


def test_mail_path_override_moves_the_mailbox_on_24(stack):
    dovecot, daemon, engine = stack
    alt = dovecot.outside / "alt"
    alt.mkdir()
    os.chown(alt, MAIL_UID, MAIL_UID)
    with engine.begin() as conn:
        set_override(conn, "user", "bob@example.com", "mail_path", f"{dovecot.inside}/alt/bob")
    daemon.wait_config(engine)
    client = imap_login(dovecot.imap_port, b"bob@example.com")
    assert client.append("INBOX", None, None, b"Subject: 2.4\r\n\r\nmoved\r\n")[0] == "OK"
    client.logout()
    stored = [p for d in ("new", "cur") for p in (dovecot.outside / "alt" / "bob" / d).glob("*")]
    assert len(stored) == 1 and b"moved" in stored[0].read_bytes()


def test_deny_rule_on_24(stack):
    dovecot, daemon, engine = stack
    with engine.begin() as conn:
        add_rule(conn, action="deny", username="mallory@example.com", message="No, not on 2.4")
    daemon.wait_config(engine)
    said = raw_session(dovecot.imap_port, [b'a1 LOGIN "mallory@example.com" "secret"'])
    assert said == b"* BYE [ALERT] No, not on 2.4\r\n"
    assert events_of(engine, b"mallory@example.com")[-1].outcome == "denied"


def test_import_reads_24_log_lines(stack, tmp_path):
    """2.4 writes `Logged in: user=<...>` where 2.3 wrote `Login: user=<...>`."""
    dovecot, _, engine = stack
    url = f"sqlite:///{tmp_path / 'import.db'}"
    upgrade(url)
    target = make_engine(url)
    stats = import_logs(target, [str(dovecot.outside / "dovecot.log")])
    with target.connect() as conn:
        imported = sorted((r.username, r.protocol, r.outcome)
                          for r in conn.execute(sa.text(
                              "SELECT username, protocol, outcome FROM login_events")))
    with engine.connect() as conn:
        recorded = sorted((r.username, r.protocol, r.outcome)
                          for r in conn.execute(sa.text(
                              "SELECT username, protocol, outcome FROM login_events")))
    target.dispose()
    assert stats.unparsable == 0
    assert imported == recorded and len(imported) >= 4
