"""End to end with Dovecot 2.4: a domain's mail_path template gives each user a mailbox.

2.4 does not expand %-variables in a post-login reply either; lastlogin
does, with the same names, so `mail_path /srv/.../%d/%n --domain ...` works
on 2.4 as `mail maildir:/.../%d/%n` does on 2.3.
"""

from __future__ import annotations

import os

import pytest

from app.db.overrides import set_override
from tests.harness.dovecot24 import MAIL_UID
from tests.harness.stack import running24
from tests.harness.db import events_of
from tests.harness.mailclients import imap_login, raw_session

pytestmark = pytest.mark.e2e

USERS = [b"kim@example.net", b"lee@example.net", b".dot@example.net"]


@pytest.fixture(scope="module")
def stack(pg_url):
    with running24(pg_url, USERS, dovecot_version="2.4") as parts:
        yield parts


def test_domain_mail_path_template_gives_two_mailboxes_on_24(stack):
    dovecot, daemon, engine = stack
    root = dovecot.outside / "alt"
    root.mkdir()
    os.chown(root, MAIL_UID, MAIL_UID)
    with engine.begin() as conn:
        set_override(conn, "domain", "example.net", "mail_path", f"{dovecot.inside}/alt/%d/%n")
    daemon.wait_config(engine)
    for user in (b"kim@example.net", b"lee@example.net"):
        client = imap_login(dovecot.imap_port, user)
        assert client.append("INBOX", None, None, b"Subject: 2.4\r\n\r\nfor " + user + b"\r\n"
                             )[0] == "OK"
        client.logout()
    for name in ("kim", "lee"):
        stored = [p for d in ("new", "cur") for p in (root / "example.net" / name / d).glob("*")]
        assert len(stored) == 1, name
        assert stored[0].read_bytes() == f"Subject: 2.4\n\nfor {name}@example.net\n".encode()
    said = raw_session(dovecot.imap_port, [b'a1 LOGIN ".dot@example.net" "secret"'])
    assert said == b"* BYE [UNAVAILABLE] Temporary server failure, try again later.\r\n"
    assert sorted(p.name for p in (root / "example.net").iterdir()) == ["kim", "lee"]
    assert events_of(engine, b".dot@example.net")[-1].outcome == "denied"
