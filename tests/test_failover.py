"""A database that fails over: primary killed mid-stream, standby promoted.

A throw-away primary and a streaming standby (``pg_basebackup -R``) with
synchronous replication; the daemon's database_url names both with
``target_session_attrs=read-write``. Logins stream while the primary's
postmaster is killed (SIGKILL) and the standby is promoted. Afterwards
every acknowledged login is on the new primary exactly once (the ones
taken while no server took writes went through the spool), and a rule
added on the new primary reaches the daemon by NOTIFY again.

See docs/scaling.md ("When the database fails over") for why synchronous
replication is what makes "exactly once" hold across a crash.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.rules import config_version_of
from tests.builders import request_bytes
from tests.harness.db import stored
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.pg import MissingComponent, free_port
from tests.harness.pgpair import start_pair
from tests.harness.postlogin import send_request

REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def pair():
    try:
        p = start_pair(synchronous=True)
    except MissingComponent as exc:
        pytest.fail(f"PostgreSQL primary + standby are required for this test: {exc}",
                    pytrace=False)
    yield p
    p.stop()




class Stream:
    """Logins one after another, each a new user, until stopped."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.acked: list[str] = []
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            name = f"stream{i:05d}@example.com"
            ex = send_request(self.daemon.sock("imap"), request_bytes(name.encode()),
                              timeout=30)
            (self.refused if ex.refused else self.acked).append(name)
            ex.client.close()
            i += 1
            time.sleep(0.005)

    def __enter__(self) -> "Stream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def test_failover_to_a_promoted_standby_loses_no_acknowledged_login(pair, tmp_path):
    url = pair.url()
    upgrade(url)
    d = make_daemon(url, protocols="imap", record_timeout="1", host_name="mx-a",
                    data_dir=str(tmp_path))
    d.start()
    try:
        with Stream(d) as stream:
            assert wait_for(lambda: len(stream.acked) >= 100, timeout=20)
            pair.kill_primary()
            killed_at = len(stream.acked)
            # No server takes writes: logins go on through the spool.
            assert wait_for(lambda: len(stream.acked) >= killed_at + 20, timeout=20)
            pair.promote()
            promoted_at = len(stream.acked)
            assert wait_for(lambda: len(stream.acked) >= promoted_at + 100, timeout=20)
        assert stream.refused == []
        acked = stream.acked
        assert len(acked) >= 220
        # Every acknowledged login on the new primary, once; counted once.
        assert wait_for(lambda: stored(url) == (sorted(acked), len(acked)), timeout=30), (
            len(stored(url)[0]), len(acked))
        time.sleep(1.5)                     # a late duplicate would show up by now
        assert stored(url) == (sorted(acked), len(acked))
        assert "event=database_down" in d.logs()        # the outage was real
        replayed = re.findall(r"event=spool_replayed \S+ records=(\d+)", d.logs())
        assert sum(map(int, replayed)) >= 20, d.logs()[-3000:]  # taken while nothing wrote

        # Rule reloads resume on the new primary: LISTEN again, NOTIFY within a second.
        assert wait_for(lambda: "event=config_refresh_recovered" in d.logs(), timeout=20), (
            d.logs()[-3000:])
        engine = make_engine(url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT pg_is_in_recovery()").scalar() is False
            assert conn.exec_driver_sql("SELECT inet_server_port()").scalar() == \
                pair.standby.port
        env = {**d.env, "LASTLOGIN_DATA_DIR": str(tmp_path)}
        out = subprocess.run([sys.executable, "-m", "app", "rule", "add", "deny", "--user",
                              "late@example.com"], env=env, capture_output=True, text=True,
                             timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        added = time.monotonic()
        with engine.connect() as conn:
            wanted = config_version_of(conn)
        engine.dispose()
        # under the 5 s heartbeat: it was the notification that woke the reload
        loaded = wait_for(lambda: d.loaded_version() >= wanted and time.monotonic(),
                          timeout=1.5, interval=0.01)
        assert loaded and loaded - added < 1.5, d.logs()[-3000:]
        assert send_request(d.sock("imap"), request_bytes(b"late@example.com")).refused
    finally:
        d.stop()


def test_reports_read_from_the_standby_never_the_primary(pair, tmp_path):
    upgrade(pair.url())
    d = make_daemon(pair.url(), protocols="imap", host_name="mx-b", data_dir=str(tmp_path))
    d.start()
    try:
        for i in range(5):
            assert not send_request(d.sock("imap"),
                                    request_bytes(f"u{i}@example.com".encode())).refused
    finally:
        d.stop()
    standby = pair.standby.url()
    # synchronous_commit=on waits for the standby's flush, not its replay
    assert wait_for(lambda: stored(standby) == ([f"u{i}@example.com" for i in range(5)], 5),
                    timeout=10)
    env = {**d.env, "LASTLOGIN_DATA_DIR": str(tmp_path),
           # the primary as far as this command knows: nothing listens there
           "LASTLOGIN_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
           "LASTLOGIN_REPORT_DATABASE_URL": standby}
    out = subprocess.run([sys.executable, "-m", "app", "report", "last", "--host", "mx-b",
                          "--format", "csv"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split(",")[-1] == "last_host" and len(lines) == 6
    assert {ln.split(",")[0] for ln in lines[1:]} == {f"u{i}@example.com" for i in range(5)}
    # Commands that write still go to database_url (here: unreachable), never the standby.
    out = subprocess.run([sys.executable, "-m", "app", "rule", "add", "deny", "--user", "x"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 4 and out.stderr.count("\n") == 1, out.stderr
