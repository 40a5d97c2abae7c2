"""The fault matrix of docs/reliability.md, row by row, against a running daemon.

Each test injects its fault for real -- a held lock, a role that cannot log
in plus terminated backends, a tmpfs that is full, a constraint the
database enforces, SIGUSR2 in the middle of an outage -- and then asserts
exact counts: login_events rows = logins acknowledged, sum(login_count) =
allowed rows, quarantined records accounted for, nothing refused stored.
"""

from __future__ import annotations

import json
import sys
import os
import re
import signal
import subprocess
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.schema import login_events
from app.protocol import TEMPFAIL_TEXT, tempfail_line
from app.spool import Quarantine, Spool
from tests.builders import HOSTILE_USERNAMES, request_bytes
from tests.harness.db import stored
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.faults import hold_lock, reject_rows, slow_commits
from tests.harness.pg import start_server
from tests.harness.postlogin import send_request

ROLE = "lldaemon"




def exact(url, allowed: list[str], denied: list[str] = ()) -> bool:
    return stored(url) == (sorted([*allowed, *denied]), len(allowed))


def login(daemon, name: str, protocol: str = "imap"):
    return send_request(daemon.sock(protocol), request_bytes(name.encode()), timeout=30)


@pytest.fixture
def own_pg():
    """A PostgreSQL of this test's own, and the URL of a role the daemon uses."""
    server = start_server()
    admin = server.url("postgres")
    upgrade(admin)
    engine = make_engine(admin)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {ROLE} LOGIN")
        conn.exec_driver_sql(f"GRANT USAGE, CREATE ON SCHEMA public TO {ROLE}")
        conn.exec_driver_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {ROLE}")
        conn.exec_driver_sql(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {ROLE}")
    engine.dispose()
    url = make_url(admin).set(username=ROLE).render_as_string(hide_password=False)
    yield server, admin, url
    server.stop()


def lock_out(admin: str, locked: bool) -> None:
    """The database goes away for the daemon: its role cannot log in, its
    sessions are ended. (And comes back.)"""
    engine = make_engine(admin)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER ROLE {ROLE} {'NOLOGIN' if locked else 'LOGIN'}")
        if locked:
            conn.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 f"WHERE usename = '{ROLE}'")
    engine.dispose()


def status(daemon) -> tuple[int, dict]:
    env = {**{k: v for k, v in daemon.env.items()}, "PYTHONPATH": daemon.env["PYTHONPATH"]}
    out = subprocess.run([sys.executable, "-m", "app", "status", "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=60)
    doc = json.loads(out.stdout)
    return out.returncode, {c["check"]: c for c in doc["checks"]}


# --- the database is slow ---------------------------------------------------------

def on(request, backend: str) -> str:
    return request.getfixturevalue("pg_db" if backend == "postgresql" else "sqlite_db")


@pytest.fixture(params=["lock-postgresql", "lock-sqlite", "sleep-postgresql"])
def slow_db(request):
    """(url, how): lock -- the writer waits behind a held lock (PostgreSQL
    cancels it after lock_timeout and the record is spooled twice; SQLite's
    commit lands late); sleep -- the commit itself takes 1.5 s and lands
    after the login was spooled (pg_sleep in a trigger)."""
    how, backend = request.param.split("-")
    return on(request, backend), how


def test_a_commit_slower_than_record_timeout_counts_once(slow_db, tmp_path):
    db_url, slow = slow_db
    d = make_daemon(db_url, protocols="imap", record_timeout="1", data_dir=str(tmp_path))
    d.start()
    try:
        assert not login(d, "warm@example.com").refused
        if slow == "lock":
            release = hold_lock(db_url)
        else:
            slow_commits(db_url, 1.5, True)
            release = lambda: slow_commits(db_url, 0, False)  # noqa: E731
        try:
            t0 = time.monotonic()
            results = [login(d, f"slow{i}@example.com").refused for i in range(3)]
            assert results == [False] * 3 and time.monotonic() - t0 < 6
            time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))      # held 3 s in all
        finally:
            release()
        acked = ["warm@example.com"] + [f"slow{i}@example.com" for i in range(3)]
        assert wait_for(lambda: exact(db_url, acked), timeout=20), stored(db_url)
        time.sleep(1.5)                     # a late duplicate would show up by now
        assert exact(db_url, acked), stored(db_url)
    finally:
        d.stop()


# --- the database rejects one record ------------------------------------------------

@pytest.fixture(params=["check-postgresql", "check-sqlite", "raise-postgresql"])
def rejecting_db(request):
    """(url, how): check -- a constraint (PostgreSQL) or trigger (SQLite);
    raise -- a trigger raising its own exception (PostgreSQL P0001)."""
    how, backend = request.param.split("-")
    return on(request, backend), how


def test_a_record_the_database_rejects_is_set_aside_and_the_rest_go_on(rejecting_db,
                                                                      tmp_path):
    db_url, how = rejecting_db
    d = make_daemon(db_url, protocols="imap", data_dir=str(tmp_path))
    d.start()
    reject_rows(db_url, "evil@example.com", True, how)
    try:
        names = ["a@example.com", "evil@example.com", "b@example.com"]
        assert [login(d, n).refused for n in names] == [False] * 3
        assert [login(d, f"after{i}@example.com").refused for i in range(5)] == [False] * 5
        allowed = ["a@example.com", "b@example.com"] + [f"after{i}@example.com"
                                                        for i in range(5)]
        assert exact(db_url, allowed), stored(db_url)
        assert "event=database_down" not in d.logs()
        quarantine = Quarantine(tmp_path / "spool" / "quarantine")
        assert quarantine.count() == 1
        rc, checks = status(d)
        assert rc == 1 and "1 records set aside" in checks["quarantine"]["detail"]
        assert len(re.findall(r"event=record_quarantined", d.logs())) == 1
    finally:
        reject_rows(db_url, "evil@example.com", False, how)
        d.stop()


def test_logins_after_a_username_past_the_index_limit_are_stored(pg_db, tmp_path):
    pg_url = pg_db
    d = make_daemon(pg_url, protocols="imap", data_dir=str(tmp_path))
    d.start()
    try:
        huge = HOSTILE_USERNAMES[-1]
        assert len(huge) == 3000
        ex = send_request(d.sock("imap"), request_bytes(huge))
        assert not ex.refused
        assert [login(d, f"n{i}@example.com").refused for i in range(5)] == [False] * 5
        names, total = stored(pg_url)
        assert len(names) == 6 and total == 6
        assert "event=database_down" not in d.logs()
        assert "record_quarantined" not in d.logs()
    finally:
        d.stop()


# --- the database is away, and the spool disk is full --------------------------------

@pytest.mark.parametrize("action", ["refuse", "allow"])
def test_a_full_spool_disk_during_an_outage(own_pg, tiny_tmpfs, tmp_path, action):
    server, admin, url = own_pg
    d = make_daemon(url, protocols="imap,pop3", data_dir=str(tmp_path), record_timeout="1",
                    spool_dir=os.path.join(tiny_tmpfs, "spool"), spool_full_action=action)
    d.start()
    try:
        assert not login(d, "before@example.com").refused
        lock_out(admin, True)
        acked, refused, saw = [], [], []
        for i in range(40):
            name = f"out{i}@example.com"
            ex = login(d, name, "imap" if i % 2 else "pop3")
            (refused if ex.refused else acked).append(name)
            if ex.refused:
                saw.append(ex.client_saw())
        assert acked and refused if action == "refuse" else not refused
        if action == "refuse":
            assert set(saw) <= {tempfail_line("imap"), tempfail_line("pop3")}
            assert tempfail_line("pop3") == b"-ERR [SYS/TEMP] " + TEMPFAIL_TEXT.encode() + b"\r\n"
            assert wait_for(lambda: "logins are being refused" in json.dumps(status(d)[1]),
                            timeout=10)
            assert status(d)[0] == 2
        else:
            assert wait_for(lambda: "not recorded" in json.dumps(status(d)[1]), timeout=10)
        assert len(re.findall(r"event=spool_full", d.logs())) == 1     # one line, not 40
        spooled = Spool(os.path.join(tiny_tmpfs, "spool"), 1 << 30).depth()
        lock_out(admin, False)
        # what was spooled is stored, once; what was refused is not
        if action == "refuse":
            expect = ["before@example.com"] + acked
        else:
            expect = ["before@example.com"] + acked[:spooled]
        assert wait_for(lambda: exact(url, expect), timeout=30), (stored(url), expect)
        assert all(n not in stored(url)[0] for n in refused)
    finally:
        lock_out(admin, False)
        d.stop()


# --- a graceful restart in the middle of an outage ----------------------------------

def test_graceful_restart_during_an_outage_loses_nothing(own_pg, tmp_path):
    server, admin, url = own_pg
    d = make_daemon(url, protocols="imap", data_dir=str(tmp_path), record_timeout="1")
    d.start()
    successor = None
    try:
        lock_out(admin, True)
        acked = [f"old{i}@example.com" for i in range(10)]
        assert [login(d, n).refused for n in acked] == [False] * 10
        d.signal(signal.SIGUSR2)
        assert d.proc.wait(30) == 0                          # the old one stepped down
        m = re.search(r"event=handover_done child_pid=(\d+)", d.logs())
        assert m, d.logs()
        successor = int(m.group(1))
        new = [f"new{i}@example.com" for i in range(10)]
        assert [login(d, n).refused for n in new] == [False] * 10
        lock_out(admin, False)
        assert wait_for(lambda: exact(url, acked + new), timeout=30), stored(url)
        time.sleep(2.5)                     # both replayers ran again: still exact
        assert exact(url, acked + new), stored(url)
    finally:
        lock_out(admin, False)
        if successor:
            os.kill(successor, signal.SIGTERM)
            wait_for(lambda: not os.path.exists(f"/proc/{successor}"), timeout=30)
        d.stop()


# --- rules that cannot be loaded ---------------------------------------------------------

@pytest.mark.parametrize("action", ["allow", "deny"])
def test_logins_decided_without_rules_say_so_in_the_history(own_pg, tmp_path, action):
    """The daemon's role may write logins but not read the rules: every login is
    decided by rules_unloaded_action, and history records that policy was not applied."""
    server, admin, url = own_pg
    engine = make_engine(admin)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"REVOKE SELECT ON access_rules FROM {ROLE}")
    engine.dispose()
    d = make_daemon(url, protocols="imap", data_dir=str(tmp_path),
                    rules_unloaded_action=action)
    d.start()
    try:
        ex = login(d, "blind@example.com")
        assert ex.refused == (action == "deny")
        if action == "deny":
            assert ex.client_saw() == tempfail_line("imap")
    finally:
        d.stop()
    engine = make_engine(admin)
    with engine.connect() as conn:
        row = conn.execute(sa.select(login_events)).one()
    engine.dispose()
    assert (row.username, row.outcome, row.policy_applied) == (
        "blind@example.com", "allowed" if action == "allow" else "denied", False)
