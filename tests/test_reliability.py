"""Faults: the database goes away, slows down, the daemon dies or restarts.

Every test is bounded in time and talks to addresses on this machine only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.schema import last_logins, login_events
from app.spool import Spool, decode, encode
from tests.builders import HOSTILE_USERNAMES, record, request_bytes
from tests.harness.cli import lastlogin
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.pg import start_server
from tests.harness.postlogin import send_request
from tests.harness.stream import Stream


# --- the spool on its own -----------------------------------------------------

@pytest.mark.parametrize("name", HOSTILE_USERNAMES, ids=range(len(HOSTILE_USERNAMES)))
def test_spool_codec_round_trip(name):
    rec = record(name, master_user=b"m\xff", alerts_shown=(3, 4))
    assert decode(encode(rec)) == rec


def leave_in_spool(directory, *records):
    """What a process that spooled ``records`` and then went away leaves behind."""
    spool = Spool(directory, 1 << 20)
    spool.append(list(records))
    spool.close()


# --- the daemon against a PostgreSQL of its own ---------------------------------

@pytest.fixture
def own_pg():
    server = start_server()
    url = server.url("postgres")
    upgrade(url)
    yield server, url
    server.stop()


def stored(url) -> list[str]:
    engine = make_engine(url)
    with engine.connect() as conn:
        names = conn.execute(sa.select(login_events.c.username)).scalars().all()
    engine.dispose()
    return names


def exactly_once(url, acked) -> bool:
    """Every acknowledged (allowed) login stored once and counted once."""
    names = stored(url)
    if sorted(names) != sorted(acked):
        return False
    engine = make_engine(url)
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar()
    engine.dispose()
    return int(total or 0) == len(acked)


def acked_once_plus_in_flight(url, acked, refused) -> bool:
    """exactly_once, except that the one login in flight when the daemon was
    killed may be stored without its answer having reached the client (it
    was stored before the reply; the client saw the connection drop). It is
    stored once and counted once like every other."""
    names = stored(url)
    extra = sorted(set(names) - set(acked))
    if len(names) != len(set(names)) or not set(acked) <= set(names):
        return False
    if len(extra) > 1 or not set(extra) <= set(refused):
        return False
    engine = make_engine(url)
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar()
    engine.dispose()
    return int(total or 0) == len(names)


def pg_ctl(server, action):
    subprocess.run(server._cmd("pg_ctl", "-D", server.datadir, "-m", "fast", "-w", action,
                               *(["-o", f"-c listen_addresses=127.0.0.1 -p {server.port} "
                                        f"-k {server.base}"] if action == "start" else []),
                               "-l", os.path.join(server.base, "log")),
                   check=True, capture_output=True, timeout=60)


def test_postgresql_stops_during_a_stream(own_pg, tmp_path):
    server, url = own_pg
    d = make_daemon(url, protocols="imap", record_timeout="1", data_dir=str(tmp_path))
    d.start()
    try:
        stream = Stream(lambda: d.sock("imap"))
        t = stream.start(6.0)
        time.sleep(1.0)
        pg_ctl(server, "stop")
        time.sleep(2.0)
        pg_ctl(server, "start")
        t.join(30)
        assert stream.refused == []                  # mail kept flowing
        assert max(stream.latencies) < 3.0           # within the bound (+ slack)
        assert "event=database_down" in d.logs()
        # the spool is replayed: every acknowledged login, exactly once
        assert wait_for(lambda: exactly_once(url, stream.acked), timeout=20), (
            len(stored(url)), len(stream.acked))
        assert "event=spool_replayed" in d.logs()
    finally:
        d.stop()
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar() == \
            len(stream.acked)
    engine.dispose()


def test_kill_9_mid_stream_loses_no_acknowledged_login(own_pg, tmp_path):
    server, url = own_pg
    d = make_daemon(url, protocols="imap", record_timeout="1", data_dir=str(tmp_path))
    d.start()
    stream = Stream(lambda: d.sock("imap"), interval=0.005)
    t = stream.start(4.0)
    time.sleep(1.0)
    pg_ctl(server, "stop")              # so some acknowledged logins are only in the spool
    time.sleep(1.0)
    os.kill(d.proc.pid, signal.SIGKILL)   # our own child, by its pid
    d.proc.wait(10)
    pg_ctl(server, "start")
    d.forget()
    d.start()                           # replaces the dead daemon's stale sockets
    t.join(30)
    try:
        assert len(stream.acked) > 50 and stream.refused   # refused while it was dead
        assert wait_for(lambda: acked_once_plus_in_flight(url, stream.acked, stream.refused),
                        timeout=20), (len(stored(url)), len(stream.acked))
    finally:
        d.stop()


def test_a_held_lock_does_not_hold_logins(own_pg, tmp_path):
    server, url = own_pg
    d = make_daemon(url, protocols="imap", record_timeout="1", data_dir=str(tmp_path))
    d.start()
    locker = make_engine(url)
    try:
        send_request(d.sock("imap"), request_bytes(b"warm@example.com"))
        conn = locker.connect()
        tx = conn.begin()
        conn.exec_driver_sql("LOCK TABLE last_logins IN ACCESS EXCLUSIVE MODE")
        stream = Stream(lambda: d.sock("imap"), prefix="locked")
        stream.run(4.0)
        tx.rollback()
        conn.close()
        assert stream.refused == []
        assert max(stream.latencies) < 2.5, max(stream.latencies)   # bound 1 s, + slack
        assert wait_for(lambda: exactly_once(url, stream.acked + ["warm@example.com"]),
                        timeout=20)
    finally:
        d.stop()
        locker.dispose()


@pytest.mark.parametrize("action", ["refuse", "allow"])
def test_full_spool(tmp_path, action):
    # a database that is not there at all, and room for about three records
    d = make_daemon("postgresql+psycopg://nobody@127.0.0.1:1/none", protocols="imap",
                    data_dir=str(tmp_path), spool_max_bytes="1200", spool_full_action=action)
    d.start()
    try:
        results = [send_request(d.sock("imap"), request_bytes(f"u{i}".encode())).refused
                   for i in range(8)]
    finally:
        d.stop()
    assert results[:3] == [False] * 3
    if action == "refuse":
        assert all(results[4:])
        assert "reason=\"not recorded: spool: spool holds" in d.logs()
    else:
        assert not any(results)
        assert "event=spool_full action=allow_unrecorded" in d.logs()
    assert Spool(tmp_path / "spool", 1200).depth() >= 3


def test_database_away_at_start_is_not_fatal(tmp_path):
    d = make_daemon("postgresql+psycopg://nobody@127.0.0.1:1/none", protocols="imap",
                    data_dir=str(tmp_path), rules_unloaded_action="deny")
    d.start()
    try:
        ex = send_request(d.sock("imap"), request_bytes())
        # no rules were ever loaded, and the setting says deny
        assert ex.refused and b"BYE" in ex.client_saw()
        assert "event=database_unreachable_at_start" in d.logs()
        # and status says so, critically: every login is being refused
        env = {k: v for k, v in d.env.items() if k.startswith("LASTLOGIN_")}
        assert wait_for(lambda: "logins are being refused (rules not loaded"
                        in lastlogin("status", env=env).stdout, timeout=10)
        assert lastlogin("status", env=env).returncode == 2
    finally:
        d.stop()


def test_status_command(db_url, tmp_path):
    from tests.harness.cli import lastlogin
    d = make_daemon(db_url, protocols="imap,pop3", data_dir=str(tmp_path))
    env = {k: v for k, v in d.env.items() if k.startswith("LASTLOGIN_")}
    down = lastlogin("status", env=env)
    assert down.returncode == 2 and "critical socket imap" in down.stdout
    d.start()
    try:
        assert wait_for(lambda: lastlogin("status", env=env).returncode == 0, timeout=10)
        out = lastlogin("status", "--format", "json", env=env)
        import json
        doc = json.loads(out.stdout)
        assert doc["status"] == "ok"
        assert {c["check"] for c in doc["checks"]} >= {
            "socket imap", "socket pop3", "daemon", "rules", "database", "spool"}
        # a record left in the spool (by a crashed predecessor, say) is
        # replayed by the running daemon, and status is ok again after it
        leave_in_spool(tmp_path / "spool", record(b"late@example.com"))
        assert wait_for(lambda: "late@example.com" in stored(db_url), timeout=10)
        assert wait_for(lambda: lastlogin("status", env=env).returncode == 0, timeout=10)
        assert "event=probe" in d.logs() and "connection_refused" not in d.logs()
    finally:
        d.stop()
    # no daemon, but the sockets' files are gone and a record waits: critical
    leave_in_spool(tmp_path / "spool", record(b"later@example.com"))
    out = lastlogin("status", env=env)
    assert out.returncode == 2
    assert "warning  spool            1 records waiting" in out.stdout
    assert "critical daemon" in out.stdout

