"""The daemon on either event loop: the same logins, answered and recorded."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.schema import last_logins, login_events
from app.protocol import build_reply
from tests.builders import HOSTILE_USERNAMES, request_bytes, request_fields
from tests.harness.daemon import make_daemon
from tests.harness.postlogin import send_request


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_logins_on_each_event_loop(db_url, loop):
    d = make_daemon(db_url, protocols="imap,pop3", event_loop=loop)
    d.start()
    try:
        names = [b"alice@example.com", *HOSTILE_USERNAMES[:4]]
        for i, name in enumerate(names):
            ex = send_request(d.sock("imap" if i % 2 else "pop3"), request_bytes(name))
            assert ex.reply == build_reply(name, request_fields())      # fields unchanged
        bad = send_request(d.sock("imap"), b"not a request\n\n")
        assert bad.refused                          # and the daemon goes on
        assert not send_request(d.sock("imap"), request_bytes(b"after@example.com")).refused
    finally:
        assert d.stop() == 0
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(login_events)).scalar()
        total = conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar()
    engine.dispose()
    assert (rows, total) == (len(names) + 1, len(names) + 1)


def test_an_unknown_or_missing_loop_is_one_line(tmp_path):
    import subprocess
    import sys
    d = make_daemon(f"sqlite:///{tmp_path / 'x.db'}", event_loop="tokio")
    out = subprocess.run([sys.executable, "-m", "app", "serve"], env=d.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "(event_loop)" in out.stderr
