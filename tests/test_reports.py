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
    assert bad.returncode == 2 and bad.stderr.endswith("(--since)\n")


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
    out = lastlogin("prune", "--older-than", "3d", "--no-progress", "--yes",
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
                                  "0 already recorded; 1 unparsable lines")
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


# --- issue 15: prune, cut reports, the time rule -------------------------------

def _count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(login_events)).scalar()


def on_a_terminal(args, answer: str, env) -> int:
    """Run lastlogin with a pseudo-terminal as stdin, typing ``answer``; its exit status."""
    import pty
    import subprocess
    import sys
    master, slave = pty.openpty()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    full_env.update(env)
    try:
        os.write(master, answer.encode())
        out = subprocess.run([sys.executable, "-m", "app", *args], stdin=slave,
                             capture_output=True, env=full_env, timeout=60)
    finally:
        os.close(master)
        os.close(slave)
    return out.returncode


def test_prune_refuses_ambiguous_1m_and_asks_first(engine, db_url):
    with engine.begin() as conn:
        record_logins(conn, [record(b"old@example.com", at=NOW - 40 * DAY),
                             record(b"older@example.com", at=NOW - 400 * DAY),
                             record(b"new@example.com", at=NOW - 60 * dt.timedelta(seconds=1))])
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    ambiguous = lastlogin("prune", "--older-than", "1m", "--yes", env=env)
    assert ambiguous.returncode == 2
    assert ambiguous.stderr == ("lastlogin: '1m' is ambiguous: write 1min for minutes or 1mo "
                                "for months (--older-than)\n")
    dry = lastlogin("prune", "--older-than", "1mo", "--dry-run", "--utc", env=env)
    assert dry.returncode == 0, dry.stderr
    oldest = (NOW - 400 * DAY).isoformat(timespec="seconds")
    newest = (NOW - 40 * DAY).isoformat(timespec="seconds")
    assert dry.stdout.startswith("would remove 2 login events older than ")
    assert f"(oldest {oldest}, newest {newest})" in dry.stdout
    # no terminal, no --yes: nothing goes, one line, exit 2
    unasked = lastlogin("prune", "--older-than", "1mo", "--utc", env=env)
    assert unasked.returncode == 2 and unasked.stderr.startswith(
        "lastlogin: not removing 2 login events older than ")
    assert unasked.stderr.endswith(f"(oldest {oldest}, newest {newest}) without confirmation: "
                                   "give --yes (or run it on a terminal)\n")
    assert _count(engine) == 3
    assert on_a_terminal(["prune", "--older-than", "1y", "--no-progress"], "n\n", env) == 1
    assert _count(engine) == 3
    assert on_a_terminal(["prune", "--older-than", "1y", "--no-progress"], "y\n", env) == 0
    assert _count(engine) == 2                          # only the 400-day-old one went
    assert lastlogin("prune", "--older-than", "6mo", "--yes", env=env).stdout.startswith(
        "no login events older than")


def test_duration_units():
    from app.errors import InvalidInput
    from app.timeparse import parse_duration
    at = dt.datetime(2026, 3, 31, 12, tzinfo=dt.timezone.utc)
    assert at - parse_duration("1mo", "x") == dt.datetime(2026, 2, 28, 12, tzinfo=dt.timezone.utc)
    assert at - parse_duration("1y", "x") == dt.datetime(2025, 3, 31, 12, tzinfo=dt.timezone.utc)
    assert at - parse_duration("30d", "x") == at - 30 * DAY
    assert at + parse_duration("12h", "x") == at + dt.timedelta(hours=12)
    assert at - parse_duration("10min", "x") == at - dt.timedelta(minutes=10)
    for bad in ("1m", "0d", "7", "d", "99999999999d", "999999999y"):
        with pytest.raises(InvalidInput):
            parse_duration(bad, "x")


def test_report_says_when_it_is_cut_in_every_format(engine, db_url):
    with engine.begin() as conn:
        record_logins(conn, [record(f"u{i:02}@example.com".encode(), at=NOW - i * DAY)
                             for i in range(12)])
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    for fmt, body_lines in (("table", 6), ("csv", 6), ("json", None)):
        out = lastlogin("report", "last", "--limit", "5", "--format", fmt, env=env)
        assert out.returncode == 0
        assert out.stderr == "lastlogin: 5 of 12 rows (use --limit 0 for all)\n"
        if body_lines:
            assert len(out.stdout.splitlines()) == body_lines
        else:
            assert len(json.loads(out.stdout)) == 5
    full = lastlogin("report", "last", "--limit", "0", "--format", "csv", env=env)
    assert full.stderr == "" and len(full.stdout.splitlines()) == 13
    hist = lastlogin("report", "history", "u00@example.com", "--limit", "1", env=env)
    assert hist.stderr == ""                            # one row, not cut


def test_times_in_the_local_zone_unless_utc(engine, db_url):
    """TZ=EST+5: input without a zone is local, an offset is honoured, output is local."""
    env = {"LASTLOGIN_DATABASE_URL": db_url, "TZ": "EST+5"}
    add = lastlogin("rule", "add", "deny", "--user", "tz@example.com",
                    "--from", "2026-12-01T08:00", "--until", "2026-12-01T20:00+01:00", env=env)
    assert add.returncode == 0, add.stderr
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT valid_from, valid_until FROM access_rules").one()
    from app.db.types import UTCDateTime
    conv = UTCDateTime().process_result_value
    assert conv(row[0], None) == dt.datetime(2026, 12, 1, 13, tzinfo=dt.timezone.utc)
    assert conv(row[1], None) == dt.datetime(2026, 12, 1, 19, tzinfo=dt.timezone.utc)
    local = lastlogin("rule", "list", "--format", "csv", env=env)
    utc = lastlogin("rule", "list", "--format", "csv", "--utc", env=env)
    assert "2026-12-01T08:00:00-05:00,2026-12-01T14:00:00-05:00" in local.stdout
    assert "2026-12-01T13:00:00+00:00,2026-12-01T19:00:00+00:00" in utc.stdout
    alert = lastlogin("alert", "add", "hello", "--until", "2026-12-07", "--utc", env=env)
    assert alert.returncode == 0, alert.stderr
    shown = lastlogin("alert", "list", "--format", "csv", env=env)
    assert "2026-12-06T19:00:00-05:00" in shown.stdout


# --- issue 15 / 12: imports ----------------------------------------------------

def _table_source(tmp_path, rows):
    path = tmp_path / "dict.db"
    source = make_engine(f"sqlite:///{path}")
    with source.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE last_login (userid VARCHAR(255), last_login BIGINT)")
        for user, stamp in rows:
            conn.exec_driver_sql("INSERT INTO last_login VALUES (?, ?)", (user, stamp))
    source.dispose()
    return f"sqlite:///{path}"


def test_table_import_detects_precision_and_refuses_a_wrong_one(db_url, engine, tmp_path):
    url = _table_source(tmp_path, [("ms@example.com", 1764000000123), ("", 1764000000000),
                                   (None, 1764000000000), ("nostamp@example.com", None)])
    env = {"LASTLOGIN_DATABASE_URL": db_url, "LASTLOGIN_IMPORT_SOURCE_URL": url}
    wrong = lastlogin("import", "last-login-table", "--precision", "s", env=env)
    assert (wrong.returncode, wrong.stderr) == (
        2, "lastlogin: timestamps look like milliseconds: use --precision ms (--precision)\n")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(last_logins)).scalar() == 0
    auto = lastlogin("import", "last-login-table", env=env)
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout == ("4 rows read, 1 folded into last_logins, 3 skipped (no user or "
                           "time); precision ms\n")
    with engine.connect() as conn:
        (row,) = conn.execute(sa.select(last_logins)).all()
    assert row.username == "ms@example.com"
    assert row.last_seen == dt.datetime(2025, 11, 24, 16, 0, 0, 123000, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("args, message", [
    (["--table", "lastlogins"],
     "no table 'lastlogins' in the source database (its tables: last_login) (--table)"),
    (["--user-column", "username"],
     "no column 'username' in table 'last_login' (its columns: userid, last_login) "
     "(--user-column)"),
    (["--time-column", "ts"],
     "no column 'ts' in table 'last_login' (its columns: userid, last_login) (--time-column)"),
])
def test_table_import_names_unknown_tables_and_columns(sqlite_url, tmp_path, args, message):
    url = _table_source(tmp_path, [("a@example.com", 1764000000)])
    url_file = tmp_path / "source.url"          # the URL from a file this time
    url_file.write_text(url + "\n")
    out = lastlogin("import", "last-login-table", "--source-url-file", str(url_file), *args,
                    env={"LASTLOGIN_DATABASE_URL": sqlite_url})
    assert (out.returncode, out.stderr) == (2, f"lastlogin: {message}\n")


@pytest.fixture(scope="module")
def mariadb():
    from tests.harness.mariadb import MissingComponent, start_server
    try:
        server = start_server()
    except MissingComponent as exc:
        pytest.fail(f"MariaDB is required for this test: {exc}", pytrace=False)
    yield server
    server.stop()


def test_table_import_from_mariadb(mariadb, db_url, engine):
    """The plugin's table in MySQL/MariaDB, through the pure-Python driver."""
    import pymysql
    url = mariadb.create_database(f"dovecot_{os.getpid()}_{db_url.split(':')[0]}")
    conn = pymysql.connect(host="127.0.0.1", port=mariadb.port, user="root",
                           database=url.rsplit("/", 1)[1])
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE last_login (userid VARCHAR(255) NOT NULL, "
                    "last_login BIGINT NOT NULL, PRIMARY KEY (userid))")
        cur.executemany("INSERT INTO last_login VALUES (%s, %s)",
                        [("alice@example.com", 1764000000), ("bob@example.com", 1700000000),
                         ("", 1764000000)])
    conn.commit()
    conn.close()
    env = {"LASTLOGIN_DATABASE_URL": db_url, "LASTLOGIN_IMPORT_SOURCE_URL": url}
    out = lastlogin("import", "last-login-table", "--protocol", "pop3", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("3 rows read, 2 folded into last_logins, 1 skipped (no user or "
                          "time); precision s\n")
    with engine.connect() as c:
        rows = {r.username: r for r in c.execute(sa.select(last_logins))}
    assert set(rows) == {"alice@example.com", "bob@example.com"}
    assert rows["alice@example.com"].protocol == "pop3"
    assert rows["alice@example.com"].last_seen == dt.datetime.fromtimestamp(
        1764000000, dt.timezone.utc)
    missing = lastlogin("import", "last-login-table", "--table", "nope", env=env)
    assert missing.returncode == 2 and missing.stderr.startswith(
        "lastlogin: no table 'nope' in the source database (its tables: last_login)")


def _log_lines(n: int, start: int = 0) -> bytes:
    return b"".join(
        b"Nov 26 07:%02d:%02d imap-login: Info: Login: user=<u%d@example.com>, method=PLAIN, "
        b"rip=198.51.100.7, lip=192.0.2.25, mpid=%d, session=<S%d>\n"
        % (i // 60, i % 60, i, 1000 + i, i) for i in range(start, start + n))


def test_truncated_gz_names_the_file_the_lines_and_what_was_committed(db_url, engine,
                                                                        tmp_path):
    whole = gzip.compress(_log_lines(3000))
    cut = tmp_path / "mail.log.2.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    out = lastlogin("import", "dovecot-log", str(cut), "--utc", "--year", "2026",
                    env={"LASTLOGIN_DATABASE_URL": db_url})
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    committed = _count(engine)
    assert committed > 0
    assert out.stderr.startswith(f"lastlogin: {cut}: damaged or truncated (")
    assert (f"; everything before it was imported: {committed:,} logins read, "
            f"{committed:,} new, 0 already recorded (FILES)\n") in out.stderr
    lines = int(out.stderr.split(" after line ")[1].split(";")[0].replace(",", ""))
    assert committed == lines                       # one login per line, all stored


def test_log_import_skips_logins_the_daemon_recorded(db_url, engine, tmp_path):
    """Issue 12 point 7: an import over a recorded period doubles nothing."""
    t = dt.datetime(2026, 11, 26, 7, 0, 0, tzinfo=dt.timezone.utc)
    with engine.begin() as conn:       # what the daemon stored, a fraction of a second later
        record_logins(conn, [
            record(b"u0@example.com", at=t + dt.timedelta(milliseconds=400)),
            record(b"u1@example.com", at=t + dt.timedelta(seconds=1, milliseconds=30)),
            record(b"u2@example.com", at=t + dt.timedelta(seconds=2, milliseconds=900),
                   outcome="denied")])
    log = tmp_path / "mail.log"
    log.write_bytes(_log_lines(5) + b"Nov 26 07:00:02 imap(u2@example.com)<1002><S2>: Error: "
                    b"Post-login script denied access to user u2@example.com\n")
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    out = lastlogin("import", "dovecot-log", str(log), "--utc", "--year", "2026", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("1 file(s), 6 lines: 5 logins (1 refused); 2 new, 3 already "
                          "recorded; 0 unparsable lines\n")
    with engine.connect() as conn:
        assert _count(engine) == 5
        counts = dict(conn.execute(sa.select(last_logins.c.username, last_logins.c.login_count)
                                   ).all())
        refused = conn.execute(sa.select(sa.func.count()).select_from(login_events)
                               .where(login_events.c.outcome == "denied")).scalar()
    assert counts == {"u0@example.com": 1, "u1@example.com": 1, "u3@example.com": 1,
                      "u4@example.com": 1}
    assert refused == 1
    again = lastlogin("import", "dovecot-log", str(log), "--utc", "--year", "2026", env=env)
    assert "0 new, 5 already recorded" in again.stdout and _count(engine) == 5


def test_log_import_since_until(db_url, engine, tmp_path):
    log = tmp_path / "mail.log"
    log.write_bytes(_log_lines(10))                  # 07:00:00 .. 07:00:09
    out = lastlogin("import", "dovecot-log", str(log), "--utc", "--year", "2026",
                    "--since", "2026-11-26T07:00:03", "--until", "2026-11-26T08:00:07+01:00",
                    env={"LASTLOGIN_DATABASE_URL": db_url})
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("1 file(s), 10 lines: 4 logins (0 refused); 4 new, 0 already "
                          "recorded; 0 unparsable lines; 6 outside --since/--until\n")


def test_crafted_username_cannot_turn_a_failure_into_a_success(engine, tmp_path):
    """Text inside a username is a username, never another line's fields."""
    log = tmp_path / "mail.log"
    log.write_bytes(
        b"Nov 26 07:00:00 imap-login: Info: Aborted login (auth failed, 1 attempts in 2 secs): "
        b"user=<x imap-login: Info: Login: user=<victim@example.com>, method=PLAIN, "
        b"rip=203.0.113.66, lip=192.0.2.25, mpid=1, session=<evil>, method=PLAIN, "
        b"rip=203.0.113.66, lip=192.0.2.25, session=<real>\n"
        b"Nov 26 07:00:01 imap-login: Info: Login: user=<a>, method=PLAIN, rip=1.2.3.4, "
        b"lip=5.6.7.8, mpid=9, session=<S>, method=PLAIN, rip=203.0.113.1, lip=192.0.2.25, "
        b"mpid=10, session=<T>\n"
        b"Nov 26 07:00:02 imap-login: Info: Login: user=<>, method=PLAIN, rip=203.0.113.2, "
        b"lip=192.0.2.25, mpid=11, session=<U>\n")
    stats = import_logs(engine, [str(log)], zone=dt.timezone.utc, year=2026)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(login_events.c.username, login_events.c.remote_ip)).all()
    # the failed login is not a login; the second line's user is the whole bracketed text
    assert [r.username for r in rows] == [
        "a>, method=PLAIN, rip=1.2.3.4, lip=5.6.7.8, mpid=9, session=<S"]
    assert rows[0].remote_ip == "203.0.113.1"
    assert (stats.logins, stats.empty_user, stats.unparsable) == (1, 1, 0)
