"""End to end with a real Dovecot: overrides, alerts, and a script-login hop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.db.overrides import add_alert, set_override
from tests.harness.daemon import make_daemon
from tests.harness.dovecot import MAIL_UID, make_dovecot
from tests.harness.stack import running
from tests.harness.cli import lastlogin
from tests.harness.db import events_of
from tests.harness.mailclients import imap_login, pop3_login, raw_session

pytestmark = pytest.mark.e2e

USERS = [b"frank@example.com", b"gina@example.com", b"hank@example.com", b"ivy@example.com",
         b"jack@example.com", b"kim@example.net", b"lee@example.net", b".dot@example.net"]

NEXT_SCRIPT = """#!/bin/sh
# A site's old post-login script, kept behind lastlogin through script-login.
echo "$USER" >> {scratch}/ran
NOTE="from-the-script"
export NOTE
USERDB_KEYS="$USERDB_KEYS note"
export USERDB_KEYS
exec "$@"
"""

NEXT_SERVICE = """
service lastlogin-next {{
  executable = script-login {script}
  user = dovecot
  unix_listener {path} {{
    mode = 0600
  }}
}}
"""


@pytest.fixture(scope="module")
def stack(pg_url):
    daemon = make_daemon(pg_url, protocols="imap,pop3")
    dovecot = make_dovecot(daemon.socket_dir)
    scratch = Path(dovecot.base, "scratch")
    scratch.mkdir(mode=0o777)
    os.chmod(scratch, 0o777)
    alt = Path(dovecot.base, "alt")
    alt.mkdir()
    os.chown(alt, MAIL_UID, MAIL_UID)
    script = Path(dovecot.base, "next.sh")
    script.write_text(NEXT_SCRIPT.format(scratch=scratch))
    script.chmod(0o755)
    hop = os.path.join(dovecot.base, "next-imap.sock")
    dovecot.extra = NEXT_SERVICE.format(script=script, path=hop)
    daemon.env["LASTLOGIN_NEXT_SOCKET_IMAP"] = hop
    with running(pg_url, daemon, dovecot, USERS) as parts:
        yield parts


def session_log(dovecot, user: str) -> list[str]:
    return [ln for ln in dovecot.logs().splitlines() if f"imap({user})" in ln]


def test_mail_override_moves_the_mailbox(stack):
    dovecot, daemon, engine = stack
    target = Path(dovecot.base, "alt", "frank")
    with engine.begin() as conn:
        set_override(conn, "user", "frank@example.com", "mail", f"maildir:{target}")
    daemon.wait_config(engine)
    client = imap_login(dovecot.imap_port, b"frank@example.com")
    typ, _ = client.append("INBOX", None, None,
                           b"Subject: moved\r\n\r\nThis message lands in the override.\r\n")
    assert typ == "OK"
    client.logout()
    stored = [p for d in ("new", "cur") for p in (target / d).glob("*")]
    assert len(stored) == 1
    assert b"lands in the override" in stored[0].read_bytes()
    assert not Path(dovecot.base, "home", "u0", "Maildir").exists()


def test_acl_groups_and_script_fields_reach_the_session(stack):
    dovecot, daemon, engine = stack
    with engine.begin() as conn:
        set_override(conn, "domain", "example.com", "acl_groups", "staff,sales")
    daemon.wait_config(engine)
    imap_login(dovecot.imap_port, b"gina@example.com").logout()
    log = "\n".join(session_log(dovecot, "gina@example.com"))
    assert "Added userdb setting: plugin/acl_groups=staff,sales" in log
    # the next hop (script-login running a shell script) ran, and what it
    # added to USERDB_KEYS reached the session as well
    ran = Path(dovecot.base, "scratch", "ran").read_text().split()
    assert "gina@example.com" in ran
    assert "Added userdb setting: plugin/note=from-the-script" in log


def test_alerts_reach_imap_clients_and_show_once_shows_once(stack):
    dovecot, daemon, engine = stack
    with engine.begin() as conn:
        add_alert(conn, "user", "hank@example.com", "Out of office until Monday")
        add_alert(conn, "user", "hank@example.com", "Welcome to the new server", show_once=True)
    daemon.wait_config(engine)
    first = raw_session(dovecot.imap_port, [b'a1 LOGIN "hank@example.com" "secret"'])
    lines = first.split(b"\r\n")
    assert lines[0] == b"* OK [ALERT] Out of office until Monday"
    assert lines[1] == b"* OK [ALERT] Welcome to the new server"
    assert lines[2].startswith(b"a1 OK") and b"Logged in" in lines[2]
    second = raw_session(dovecot.imap_port, [b'a1 LOGIN "hank@example.com" "secret"'])
    assert second.count(b"[ALERT]") == 1 and b"Out of office" in second
    assert b"a1 OK" in second
    assert [e.outcome for e in events_of(engine, b"hank@example.com")] == ["allowed"] * 2


def test_pop3_login_with_alerts_configured_still_works(stack):
    dovecot, daemon, engine = stack
    with engine.begin() as conn:
        add_alert(conn, "global", None, "Maintenance tonight")
    daemon.wait_config(engine)
    pop3_login(dovecot.pop3_port, b"ivy@example.com").quit()      # +OK Logged in., STAT
    said = raw_session(dovecot.pop3_port, [b"USER ivy@example.com", b"PASS secret"])
    assert said.startswith(b"+OK Logged in.") and b"ALERT" not in said
    imap = raw_session(dovecot.imap_port, [b'a1 LOGIN "ivy@example.com" "secret"'])
    assert imap.startswith(b"* OK [ALERT] Maintenance tonight\r\n")


def test_readme_domain_override_gives_each_user_their_own_mailbox(stack):
    """`override set mail maildir:/.../%d/%n --domain ...` exactly as the README has it."""
    dovecot, daemon, engine = stack
    root = Path(dovecot.base, "alt", "mail")
    root.mkdir()
    os.chown(root, MAIL_UID, MAIL_UID)
    out = lastlogin("override", "set", "mail", f"maildir:{root}/%d/%n", "--domain", "example.net",
                    env={"LASTLOGIN_DATABASE_URL": daemon.env["LASTLOGIN_DATABASE_URL"]})
    assert out.returncode == 0, out.stderr
    daemon.wait_config(engine)
    for user in (b"kim@example.net", b"lee@example.net"):
        client = imap_login(dovecot.imap_port, user)
        body = b"Subject: mine\r\n\r\nfor " + user + b" only\r\n"
        assert client.append("INBOX", None, None, body)[0] == "OK"
        client.logout()
    for name in ("kim", "lee"):
        box = root / "example.net" / name
        stored = [p for d in ("new", "cur") for p in (box / d).glob("*")]
        assert len(stored) == 1, name
        assert stored[0].read_bytes() == f"Subject: mine\n\nfor {name}@example.net only\n".encode()
    assert sorted(p.name for p in (root / "example.net").iterdir()) == ["kim", "lee"]
    # a username that would make a hidden directory gets a temporary failure, not a path
    said = raw_session(dovecot.imap_port, [b'a1 LOGIN ".dot@example.net" "secret"'])
    assert said == b"* BYE [UNAVAILABLE] Temporary server failure, try again later.\r\n"
    assert not any(p.name.startswith(".") for p in (root / "example.net").iterdir())
    assert events_of(engine, b".dot@example.net")[-1].outcome == "denied"
