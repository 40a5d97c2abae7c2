"""Reports, retention and backfill on both databases, with known data."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db import reports
from app.db.partitions import ensure_partitions, existing_months
from app.db.retention import maintain, prune
from app.db.rules import add_rule
from app.db.schema import last_logins, login_events
from app.db.store import record_logins
from app.importer import import_last_login_table, import_logs
from tests.builders import record
from tests.harness.cli import lastlogin

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
DAY = dt.timedelta(days=1)


@pytest.fixture
def known(engine):
    """alice: imap daily for 3 days + pop3 once; bob: long ago; carol: refused."""
    with engine.begin() as conn:
        rid = add_rule(conn, action="deny", username="carol@example.org", message="locked")
        recs = [record(b"alice@example.com", at=NOW - i * DAY, remote_ip=f"198.51.100.{i}")
                for i in range(3)]
        recs.append(record(b"alice@example.com", protocol="pop3", at=NOW - 5 * DAY,
                           remote_ip="2001:db8::1"))
        recs.append(record(b"bob@example.com", at=NOW - 200 * DAY, remote_ip="192.0.2.9"))
        recs.append(record(b"carol@example.org", at=NOW - 2 * DAY, remote_ip="203.0.113.5",
                           outcome="denied", rule_id=rid, message="locked"))
        record_logins(conn, recs)
    return rid


def test_last(engine, known):
    with engine.connect() as conn:
        rows = reports.last(conn)
        assert [r["username"] for r in rows] == ["alice@example.com", "bob@example.com"]
        alice = rows[0]
        assert (alice["last_protocol"], alice["last_remote_ip"], alice["logins"]) == (
            "imap", "198.51.100.0", 4)
        assert alice["last_seen"] == NOW and alice["first_seen"] == NOW - 5 * DAY
        assert [r["username"] for r in reports.last(conn, domain="EXAMPLE.com")] == [
            "alice@example.com", "bob@example.com"]
        assert reports.last(conn, domain="example.org") == []       # carol was refused
        assert reports.last(conn, domain="%") == []                 # no LIKE injection
        assert len(reports.last(conn, user="bob@example.com")) == 1


def test_inactive_with_and_without_accounts(engine, known):
    with engine.connect() as conn:
        rows = reports.inactive(conn, 90, NOW)
        assert [(r["username"], r["idle_days"]) for r in rows] == [("bob@example.com", 200)]
        rows = reports.inactive(conn, 90, NOW, ["alice@example.com", "bob@example.com",
                                                "dave@example.com"])
    assert [(r["username"], r["idle_days"]) for r in rows] == [
        ("dave@example.com", None), ("bob@example.com", 200)]


def test_history_ips_refused_daily(engine, known):
    with engine.connect() as conn:
        hist = reports.history(conn, "alice@example.com")
        assert [h["protocol"] for h in hist] == ["imap", "imap", "imap", "pop3"]
        assert len(reports.history(conn, "alice@example.com", since=NOW - 1.5 * DAY)) == 2
        ips = reports.ips(conn, "alice@example.com")
        assert {i["remote_ip"] for i in ips} == {"198.51.100.0", "198.51.100.1",
                                                 "198.51.100.2", "2001:db8::1"}
        assert all(i["logins"] == 1 and i["refused"] == 0 for i in ips)
        # the rule's text changes later: history keeps what the client saw
        conn.execute(sa.text("UPDATE access_rules SET message = 'changed'"))
        (ref,) = reports.refused(conn, NOW - 7 * DAY)
        assert (ref["username"], ref["message"], ref["remote_ip"], ref["policy_applied"]) == (
            "carol@example.org", "locked", "203.0.113.5", True)
        assert reports.refused(conn, NOW - DAY) == []
        daily = reports.daily(conn, 7, NOW)
    by = {(r["day"], r["protocol"]): (r["allowed"], r["denied"]) for r in daily}
    today = NOW.date()
    assert by[(today, "imap")] == (1, 0)
    assert by[(today - 2 * DAY, "imap")] == (1, 1)
    assert by[(today - 5 * DAY, "pop3")] == (1, 0)
    assert sum(a + d for a, d in by.values()) == 5            # bob is outside 7 days


def test_daily_counts_in_the_operators_zone(engine):
    late = dt.datetime(2026, 3, 1, 23, 30, tzinfo=dt.timezone.utc)     # 1 March, UTC
    with engine.begin() as conn:
        record_logins(conn, [record(at=late)])
    plus2 = dt.timezone(dt.timedelta(hours=2))                        # 2 March there
    with engine.connect() as conn:
        (utc_row,) = reports.daily(conn, 3, late + dt.timedelta(hours=1), dt.timezone.utc)
        (east_row,) = reports.daily(conn, 3, late + dt.timedelta(hours=1), plus2)
    assert utc_row["day"] == dt.date(2026, 3, 1) and east_row["day"] == dt.date(2026, 3, 2)


def test_report_cli(db_url, engine, known):
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    out = lastlogin("report", "last", "--format", "json", "--utc", env=env)
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert data[0]["username"] == "alice@example.com" and data[0]["logins"] == 4
    assert data[0]["last_seen"].endswith("+00:00")
    csv = lastlogin("report", "history", "alice@example.com", "--format", "csv",
                    "--since", "36h", env=env)
    assert csv.returncode == 0 and len(csv.stdout.splitlines()) == 3
    inactive = lastlogin("report", "inactive", "--days", "90", env=env)
    assert inactive.returncode == 0 and "bob@example.com" in inactive.stdout
    nobody = lastlogin("report", "ips", "nobody@example.com", env=env)
    assert nobody.returncode == 1              # no rows: scripts can tell
    assert lastlogin("report", "refused", "--since", "7d", env=env).returncode == 0
    assert lastlogin("report", "daily", "--days", "7", env=env).returncode == 0
    bad = lastlogin("report", "refused", "--since", "last tuesday", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("lastlogin: invalid --since")


def test_inactive_accounts_from_stdin(db_url, known):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    env["LASTLOGIN_DATABASE_URL"] = db_url
    out = subprocess.run([sys.executable, "-m", "app", "report", "inactive", "--days", "90",
                          "--accounts", "-", "--format", "csv"], env=env, text=True,
                         input="alice@example.com\nzed@example.com\n", capture_output=True)
    assert out.stdout.splitlines()[1].startswith("zed@example.com,,")


def test_prune_keeps_last_logins_and_recent_history(engine, known, db_url):
    result = prune(engine, NOW - 100 * DAY, batch=100)
    assert result.rows_deleted + result.rows_dropped == 1                # bob's one login
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(login_events)).scalar() == 5
        assert conn.execute(sa.select(sa.func.count()).select_from(last_logins)).scalar() == 3
    out = lastlogin("prune", "--older-than", "3d", "--no-progress",
                    env={"LASTLOGIN_DATABASE_URL": db_url})
    assert out.returncode == 0 and out.stdout.startswith("removed 1 login events")


def test_prune_in_many_small_batches(engine):
    with engine.begin() as conn:
        record_logins(conn, [record(f"u{i}".encode(), at=NOW - 10 * DAY) for i in range(250)])
    result = prune(engine, NOW - DAY, batch=100)
    assert result.rows_deleted + result.rows_dropped == 250


def test_postgresql_drops_whole_months_and_files_strays(pg_url):
    engine = make_engine(pg_url)
    old = dt.datetime(2023, 1, 15, tzinfo=dt.timezone.utc)
    try:
        with engine.begin() as conn:
            # no partition for 2023-01 yet: the row lands in DEFAULT ...
            record_logins(conn, [record(b"old@example.com", at=old)])
            assert (2023, 1) not in existing_months(conn)
            # ... and moves into its month when that partition is made
            assert ensure_partitions(conn, [(2023, 1)]) == ["login_events_p202301"]
            assert conn.exec_driver_sql(
                "SELECT count(*) FROM login_events_p202301").scalar() == 1
            assert conn.exec_driver_sql(
                "SELECT count(*) FROM login_events_pdefault").scalar() == 0
        result = prune(engine, dt.datetime(2023, 3, 1, tzinfo=dt.timezone.utc))
        assert result.partitions == ["login_events_p202301"] and result.rows_dropped == 1
        maintain(engine, NOW, 0)            # months ahead exist after the daily job
        with engine.connect() as conn:
            have = existing_months(conn)
        assert (NOW.year, NOW.month) in have and len(have) >= 4
    finally:
        with engine.begin() as conn:
            conn.execute(login_events.delete())
            conn.execute(last_logins.delete())
        engine.dispose()


# --- backfill ------------------------------------------------------------------

LOG = b"""\
Nov 26 06:33:14 imap-login: Info: Login: user=<alice@example.com>, method=PLAIN, rip=198.51.100.7, lip=192.0.2.25, mpid=100, secured, session=<AAAA>
Nov 26 06:33:14 imap(alice@example.com)<100><AAAA>: Info: Disconnected: Logged out in=12 out=477
Nov 26 06:33:15 pop3-login: Info: Login: user=<o'hara;-->, method=PLAIN, rip=2001:db8::5, lip=192.0.2.25, mpid=101, secured, session=<BBBB>
Nov 26 06:33:16 imap-login: Info: Login: user=<mallory@example.com>, method=LOGIN, rip=203.0.113.9, lip=192.0.2.25, mpid=102, session=<CCCC>
Nov 26 06:33:16 imap(mallory@example.com)<102><CCCC>: Error: Post-login script denied access to user mallory@example.com (connection created 5 msecs ago)
Nov 26 06:33:17 imap-login: Info: Login: user=<broken
Nov 26 06:33:18 master: Info: Dovecot v2.3.19.1 starting up
2026-11-26 06:40:00 imap-login: Info: Login: user=<iso@example.com>, method=PLAIN, rip=, lip=, mpid=103, session=<DDDD>
Dec 31 23:59:59 mailhost dovecot: imap-login: Login: user=<newyear@example.com>, method=PLAIN, rip=198.51.100.8, lip=192.0.2.25, mpid=104, session=<EEEE>
"""


def test_import_dovecot_log(engine, tmp_path):
    plain = tmp_path / "mail.log"
    plain.write_bytes(LOG)
    packed = tmp_path / "mail.log.1.gz"         # a rotated copy: same lines, gzip
    packed.write_bytes(gzip.compress(LOG))
    stamp = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc).timestamp()
    os.utime(plain, (stamp, stamp))
    os.utime(packed, (stamp, stamp))
    stats = import_logs(engine, [str(plain)], zone=dt.timezone.utc)
    assert (stats.logins, stats.refused, stats.new, stats.unparsable) == (5, 1, 5, 1)
    again = import_logs(engine, [str(packed)], zone=dt.timezone.utc)
    assert (again.logins, again.new, again.already) == (5, 0, 5)          # idempotent
    with engine.connect() as conn:
        rows = {r.username: r for r in conn.execute(sa.select(login_events))}
    assert rows["alice@example.com"].occurred_at == dt.datetime(
        2026, 11, 26, 6, 33, 14, tzinfo=dt.timezone.utc)
    assert rows["o'hara;--"].protocol == "pop3" and rows["o'hara;--"].remote_ip == "2001:db8::5"
    assert rows["mallory@example.com"].outcome == "denied"
    assert rows["iso@example.com"].remote_ip is None
    # a December line in a file written in... December 2026 is 2026; the
    # same line read with a January reference belongs to the year before
    assert rows["newyear@example.com"].occurred_at.year == 2026


def test_import_cli_reports_counts(db_url, tmp_path):
    log = tmp_path / "mail.log"
    log.write_bytes(LOG)
    out = lastlogin("import", "dovecot-log", str(log), "--utc", "--year", "2026",
                    env={"LASTLOGIN_DATABASE_URL": db_url})
    assert out.returncode == 0
    assert out.stdout.strip() == ("1 file(s), 9 lines: 5 logins (1 refused); 5 new, "
                                  "0 already imported; 1 unparsable lines")
    assert "unparsable: Nov 26 06:33:17 imap-login: Info: Login: user=<broken" in out.stderr


def test_import_last_login_table(engine, tmp_path):
    source = make_engine(f"sqlite:///{tmp_path / 'dict.db'}")
    with source.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE last_login (userid VARCHAR(255) PRIMARY KEY, "
                             "last_login BIGINT NOT NULL)")
        conn.exec_driver_sql("INSERT INTO last_login VALUES ('alice@example.com', 1764000000),"
                             " ('bob@example.com', 1700000000)")
    with engine.begin() as conn:
        record_logins(conn, [record(b"bob@example.com", at=NOW)])        # newer than the plugin
    first = import_last_login_table(source, engine)
    second = import_last_login_table(source, engine)
    assert first.rows == second.rows == 2
    with engine.connect() as conn:
        rows = {r.username: r for r in conn.execute(sa.select(last_logins))}
    assert rows["alice@example.com"].last_seen == dt.datetime.fromtimestamp(
        1764000000, dt.timezone.utc)
    assert rows["alice@example.com"].login_count == 1
    assert rows["bob@example.com"].last_seen == NOW                       # not moved back
    assert rows["bob@example.com"].first_seen == dt.datetime.fromtimestamp(
        1700000000, dt.timezone.utc)
    assert rows["bob@example.com"].login_count == 1
    source.dispose()


def test_a_failure_logged_before_its_login_still_counts(engine, tmp_path):
    log = tmp_path / "mail.log"
    log.write_bytes(
        b"Nov 26 06:59:00 imap(carol@example.com): Error: net_connect_unix(/run/x.sock) failed: "
        b"No such file or directory (connection created 0 msecs ago, client created 0 msecs "
        b"ago: session=vNJabc, rip=127.0.0.1)\n"
        b"Nov 26 06:59:00 imap-login: Info: Login: user=<carol@example.com>, method=PLAIN, "
        b"rip=127.0.0.1, lip=127.0.0.1, mpid=7, secured, session=<vNJabc>\n")
    stats = import_logs(engine, [str(log)], zone=dt.timezone.utc, year=2026)
    assert (stats.logins, stats.refused, stats.unparsable) == (1, 1, 0)
