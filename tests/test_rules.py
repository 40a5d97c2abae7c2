"""Access rules: storage, CLI, reload, and enforcement by the running daemon."""

from __future__ import annotations

import datetime as dt
import json
import os
import time

import pytest
import sqlalchemy as sa

from app.cli.common import flag_of
from app.db import make_engine
from app.db.rules import add_rule, config_version_of, list_rules
from app.db.schema import access_rules, login_events
from app.status import DaemonStatus
from app.errors import InvalidInput
from app.protocol import deny_line
from app.snapshot import ConfigCache, Refresher, status_checks
from tests.builders import request_bytes
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.postlogin import send_request
from tests.harness.cli import lastlogin


def test_add_validates(engine):
    with engine.begin() as conn:
        for values, field in [
            (dict(action="deny", remote_network="10.0.0.300/8"), "--network"),
            (dict(action="deny", local_network="nope"), "--local-network"),
            (dict(action="deny", protocol="smtp"), "--protocol"),
            (dict(action="maybe"), "ACTION"),
            (dict(action="deny", username="  "), "--user"),
            (dict(action="deny", remote_network="10.1.2.3/8"), "--network"),   # host bits
            (dict(action="deny"), "--everyone"),                    # matches everyone
            (dict(action="deny", username="x", message="a\r\nb"), "--message"),
            (dict(action="deny", username="x", comment="a\x1bb"), "--comment"),
            (dict(action="deny", username="x",
                  valid_until=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)), "--until"),
            (dict(action="deny", valid_from=dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc),
                  valid_until=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)), "--until"),
        ]:
            with pytest.raises(InvalidInput) as err:
                add_rule(conn, **values)
            # the library names the column; the command line shows its option
            assert not err.value.field.startswith("-") and not err.value.field.isupper()
            assert flag_of(err.value.field) == field
        rid = add_rule(conn, action="deny", remote_network="2001:db8::/32", domain=" @Example.COM",
                       username=" Bob@Example.com ", protocol="IMAP")
        everyone = add_rule(conn, action="deny", everyone=True, priority=999)
        mapped = add_rule(conn, action="deny", remote_network="::ffff:10.0.0.0/104")
        rows = list_rules(conn)
    assert [r["id"] for r in rows] == [rid, mapped, everyone]
    row = rows[0]
    assert row["remote_network"] == "2001:db8::/32" and row["domain"] == "example.com"
    assert row["username"] == "Bob@Example.com" and row["protocol"] == "imap"
    assert rows[1]["remote_network"] == "10.0.0.0/8"



def test_triggers_bump_the_version_on_any_change(engine):
    with engine.begin() as conn:
        v0 = config_version_of(conn)
        rid = add_rule(conn, action="deny", username="x")
    with engine.begin() as conn:
        v1 = config_version_of(conn)
        # plain SQL counts too
        conn.execute(sa.text("UPDATE access_rules SET message = 'm' WHERE id = :id"), {"id": rid})
    with engine.begin() as conn:
        v2 = config_version_of(conn)
        conn.execute(access_rules.delete())
    with engine.begin() as conn:
        v3 = config_version_of(conn)
    assert v0 < v1 < v2 < v3


def test_refresher_follows_changes_and_keeps_rules_when_db_is_gone(db_url):
    engine = make_engine(db_url)
    cache = ConfigCache()
    refresher = Refresher(engine, cache, poll_interval=0.1, heartbeat=1.0)
    assert refresher.refresh() and cache.rules == ()
    assert not refresher.refresh()              # nothing changed: no reload
    refresher.start()
    try:
        with engine.begin() as conn:
            add_rule(conn, action="deny", username="eve")
        assert wait_for(lambda: cache.rules and cache.rules[0].username == "eve", timeout=3)
    finally:
        refresher.stop()
    engine.dispose()
    # a refresher whose database is unreachable keeps the cache it has
    broken = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout=1)
    keeper = Refresher(broken, cache, poll_interval=0.1)
    with pytest.raises(sa.exc.OperationalError):
        keeper.refresh()
    assert cache.rules[0].username == "eve"


def test_rule_cli(db_url):
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    out = lastlogin("rule", "add", "deny", "--user", "bob@example.com", "--message",
                    "Suspended", "--comment", "ticket 42", env=env)
    assert out.returncode == 0 and out.stdout.startswith("added rule ")
    rid = int(out.stdout.split()[-1])
    assert lastlogin("rule", "add", "deny", "--network", "203.0.113.0/24", "--for", "2h",
                     env=env).returncode == 0
    listed = json.loads(lastlogin("rule", "list", "--format", "json", env=env).stdout)
    assert [r["username"] for r in listed] == ["bob@example.com", None]
    assert listed[1]["valid_until"] is not None
    assert [r["state"] for r in listed] == ["on", "on"]
    from app.db.rules import rule_states
    eng = make_engine(db_url)
    with eng.connect() as conn:
        later = rule_states(conn, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=3))
    eng.dispose()
    assert later == {rid: "on", listed[1]["id"]: "expired"}
    csv_out = lastlogin("rule", "list", "--format", "csv", env=env).stdout.splitlines()
    assert csv_out[0].startswith("id,action,priority") and len(csv_out) == 3
    shown = lastlogin("rule", "show", str(rid), env=env).stdout
    assert "ticket 42" in shown and "created_by" in shown

    denied = lastlogin("check", "bob@example.com", "192.0.2.1", env=env)
    assert denied.returncode == 1
    assert denied.stdout.splitlines()[:3] == [
        "decision: deny", f"rule:     {rid} (priority 100)", "message:  Suspended"]
    assert lastlogin("check", "ann@example.com", "192.0.2.1", env=env).returncode == 0
    assert lastlogin("check", "x@example.com", "203.0.113.9", "--protocol", "pop3",
                     env=env).returncode == 1

    assert lastlogin("rule", "disable", str(rid), env=env).returncode == 0
    assert lastlogin("check", "bob@example.com", "192.0.2.1", env=env).returncode == 0
    assert lastlogin("rule", "enable", str(rid), env=env).returncode == 0
    assert lastlogin("rule", "remove", str(rid), env=env).returncode == 0
    gone = lastlogin("rule", "remove", str(rid), env=env)
    assert gone.returncode == 1 and gone.stderr == f"lastlogin: no rule with id {rid}\n"


@pytest.mark.parametrize("args,line", [
    (["rule", "add", "deny", "--network", "10.0.0.300/8"],
     "lastlogin: not an IPv4 or IPv6 network: '10.0.0.300/8' (--network)"),
    (["rule", "add", "deny", "--protocol", "smtp"],
     "lastlogin: unknown protocol 'smtp' "
     "(known: imap, pop3, submission, managesieve) (--protocol)"),
    (["rule", "add", "deny", "--from", "2026-12-02", "--until", "2026-12-01"], None),
    (["rule", "add", "deny", "--for", "soon"],
     "lastlogin: not a duration like 30s, 10min, 12h, 7d, 2w, 6mo, 1y: 'soon' (--for)"),
    (["check", "bob", "not-an-ip"], "lastlogin: not an IP address: 'not-an-ip' (IP)"),
])
def test_rule_cli_errors_are_one_line(sqlite_url, args, line):
    out = lastlogin(*args, env={"LASTLOGIN_DATABASE_URL": sqlite_url})
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1
    if line:
        assert out.stderr.strip() == line
    else:
        assert out.stderr.startswith("lastlogin: the window ends")
        assert out.stderr.endswith("(--until)\n")


# --- enforcement by the daemon, at the socket level -------------------------

def test_daemon_denies_with_message_and_records_the_rule(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        # the CLI refuses a message with CR/LF; one written with SQL is still
        # sent as one line
        rid = add_rule(conn, action="deny", username="bob@example.com")
        conn.execute(sa.text("UPDATE access_rules SET message = :m WHERE id = :id"),
                     {"m": "Suspended.\r\n* OK [ALERT] injected", "id": rid})
    d = make_daemon(db_url, protocols="imap,pop3,submission,managesieve")
    d.start()
    try:
        for proto in ("imap", "pop3", "submission", "managesieve"):
            ex = send_request(d.sock(proto), request_bytes(b"bob@example.com"))
            assert ex.refused
            assert ex.client_saw() == deny_line(proto, "Suspended.\r\n* OK [ALERT] injected")
        ok = send_request(d.sock("imap"), request_bytes(b"ann@example.com"))
        assert not ok.refused and ok.client_saw() == b""
        # added while running: effective on a later login, within a second
        with engine.begin() as conn:
            add_rule(conn, action="deny", domain="example.com", protocol="imap")
        started = time.monotonic()
        assert wait_for(lambda: send_request(d.sock("imap"),
                                             request_bytes(b"ann@example.com")).refused,
                        timeout=5, interval=0.1)
        assert time.monotonic() - started < 2
        assert not send_request(d.sock("pop3"), request_bytes(b"ann@example.com")).refused
    finally:
        d.stop()
    with engine.connect() as conn:
        denied = conn.execute(sa.select(login_events).where(
            login_events.c.username == "bob@example.com")).all()
    engine.dispose()
    assert len(denied) == 4
    assert {(e.outcome, e.rule_id) for e in denied} == {("denied", rid)}
    assert "event=login protocol=imap user=bob@example.com" in d.logs()
    assert "outcome=denied rule=%d" % rid in d.logs()


# --- one bad row spoils nothing (issue 13) ------------------------------------------

def insert_bad_rule(conn) -> tuple[int, str]:
    """A deny rule written with plain SQL that the loader cannot use: (id, reason)."""
    if conn.dialect.name == "sqlite":
        # host bits set; PostgreSQL's cidr would refuse it at INSERT
        rid = conn.execute(sa.text("INSERT INTO access_rules (action, remote_network) "
                                   "VALUES ('deny', '10.1.2.3/8') RETURNING id")).scalar_one()
        return rid, ("remote_network: '10.1.2.3/8' has host bits set: write 10.0.0.0/8 for "
                     "the network or 10.1.2.3/32 for the one address")
    rid = conn.execute(sa.text("INSERT INTO access_rules (action, username) "
                               "VALUES ('deny', '  ') RETURNING id")).scalar_one()
    return rid, "username: must not be empty"


def status_doc(d) -> dict:
    with open(os.path.join(d.socket_dir, "status.json")) as fh:
        return json.load(fh)


def test_loader_skips_a_bad_row_and_keeps_the_others(engine):
    from app.snapshot import load_snapshot
    with engine.begin() as conn:
        before = add_rule(conn, action="deny", username="early@example.com")
        bad, reason = insert_bad_rule(conn)
        after = add_rule(conn, action="deny", username="late@example.com")
        # a broken time (SQLite keeps any text) is skipped the same way
        if conn.dialect.name == "sqlite":
            late = conn.execute(sa.text("INSERT INTO access_rules (action, username, valid_from) "
                                        "VALUES ('deny', 'x', 'soon') RETURNING id")).scalar_one()
        snap = load_snapshot(conn)
    assert [r.id for r in snap.rules] == [before, after]
    expected = [("access_rules", bad, reason)]
    if engine.dialect.name == "sqlite":
        expected.append(("access_rules", late, "not a time: 'soon'"))
    assert sorted(snap.skipped) == sorted(expected)


def test_bad_row_while_running_and_after_a_restart(db_url):
    engine = make_engine(db_url)
    d = make_daemon(db_url, protocols="imap")
    d.start()
    try:
        with engine.begin() as conn:
            bad, reason = insert_bad_rule(conn)
        d.wait_config(engine)
        with engine.begin() as conn:
            add_rule(conn, action="deny", username="bob@example.com", message="Suspended")
        started = time.monotonic()
        assert wait_for(lambda: send_request(d.sock("imap"),
                                             request_bytes(b"bob@example.com")).refused,
                        timeout=5, interval=0.05)
        assert time.monotonic() - started < 1.5
        assert f"event=config_row_skipped table=access_rules id={bad} " in d.logs()
        assert wait_for(lambda: status_doc(d)["config_skipped"] == [["access_rules", bad, reason]],
                        timeout=5)
        assert status_checks(DaemonStatus.from_doc(status_doc(d))) == [
            (1, "config", f"access_rules row {bad} skipped: {reason}")]
    finally:
        d.stop()
    checked = lastlogin("check", "bob@example.com", "192.0.2.1",
                        env={"LASTLOGIN_DATABASE_URL": db_url})
    assert checked.returncode == 1
    assert checked.stderr == f"lastlogin: warning: access_rules row {bad} skipped: {reason}\n"
    d2 = make_daemon(db_url, protocols="imap", rules_unloaded_action="deny")
    d2.start()
    try:
        bob = send_request(d2.sock("imap"), request_bytes(b"bob@example.com"))
        assert bob.refused and bob.client_saw() == deny_line("imap", "Suspended")
        ann = send_request(d2.sock("imap"), request_bytes(b"ann@example.com"))
        assert not ann.refused                        # the rules did load
        assert wait_for(lambda: status_doc(d2)["config_skipped"] == [["access_rules", bad,
                                                                      reason]], timeout=5)
    finally:
        d2.stop()
    engine.dispose()


@pytest.fixture
def own_sqlite(tmp_path):
    from app.db.migrate import upgrade
    url = f"sqlite:///{tmp_path / 'own.db'}"
    upgrade(url)
    return url


@pytest.mark.parametrize("rows", [0, 2])
def test_config_version_without_exactly_one_row_does_not_freeze_reloads(own_sqlite, rows):
    engine = make_engine(own_sqlite)
    with engine.begin() as conn:
        if rows == 0:
            conn.execute(sa.text("DELETE FROM config_version"))
        else:
            # only possible without the table's constraints: rebuild it so
            conn.execute(sa.text("DROP TABLE config_version"))
            conn.execute(sa.text("CREATE TABLE config_version (id INTEGER, version BIGINT, "
                                 "changed_at TEXT)"))
            conn.execute(sa.text("INSERT INTO config_version VALUES (1, 5, ''), (1, 6, '')"))
    assert config_version_of(engine.connect()) is None
    cache = ConfigCache()
    refresher = Refresher(engine, cache, poll_interval=0.05)
    assert refresher.refresh() and cache.rules == ()
    assert cache.skipped == (("config_version", rows, f"has {rows} rows instead of 1: changes "
                              "are found by reloading everything at every check"),)
    assert not refresher.refresh()              # nothing changed: no new snapshot
    with engine.begin() as conn:
        rid = add_rule(conn, action="deny", username="eve")
    assert refresher.refresh() and [r.id for r in cache.rules] == [rid]
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def own_db(request, tmp_path):
    """A database of the test's own (its tables may be renamed)."""
    from app.db.migrate import upgrade
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'own.db'}"
    else:
        url = request.getfixturevalue("pg_cluster").create_database()
    upgrade(url)
    return url


def test_a_load_error_at_start_is_rules_unloaded_never_a_crash(own_db):
    # SQLite says OperationalError (handled as "database away"), PostgreSQL
    # ProgrammingError (a load error): the daemon starts either way
    engine = make_engine(own_db)
    with engine.begin() as conn:
        add_rule(conn, action="deny", username="bob@example.com")
        conn.execute(sa.text("ALTER TABLE login_alerts RENAME TO login_alerts_away"))
    d = make_daemon(own_db, protocols="imap,pop3", rules_unloaded_action="deny")
    d.start()
    try:
        for proto, line in (("imap", b"* BYE [UNAVAILABLE] "), ("pop3", b"-ERR [SYS/TEMP] ")):
            ex = send_request(d.sock(proto), request_bytes(b"ann@example.com"))
            assert ex.refused
            assert ex.client_saw() == line + b"Temporary server failure, try again later.\r\n"
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE login_alerts_away RENAME TO login_alerts"))
        assert wait_for(lambda: not send_request(d.sock("imap"),
                                                 request_bytes(b"ann@example.com")).refused,
                        timeout=10, interval=0.2)
        assert send_request(d.sock("imap"), request_bytes(b"bob@example.com")).refused
    finally:
        d.stop()
    engine.dispose()


def test_rule_cli_guard_rails_and_safe_listing(sqlite_url):
    env = {"LASTLOGIN_DATABASE_URL": sqlite_url}
    for args, line in [
        (["rule", "add", "deny"], "lastlogin: a rule with no --user, --domain, --network, "
         "--local-network, --protocol, --country or --asn would match every login: give "
         "--everyone if that is meant (--everyone)"),
        (["rule", "add", "deny", "--user", "x", "--until", "2020-01-01T00:00:00Z"],
         "lastlogin: the window has already ended (2020-01-01T00:00:00+00:00) (--until)"),
        (["rule", "add", "deny", "--user", "x", "--message", "a\r\n* OK [ALERT] b"],
         "lastlogin: must not contain a CR (--message)"),
        (["rule", "add", "deny", "--user", "x", "--comment", "a\x1b[2Jb"],
         "lastlogin: must not contain a control character (0x1b) (--comment)"),
        (["rule", "add", "deny", "--network", "10.1.2.3/8"],
         "lastlogin: '10.1.2.3/8' has host bits set: write 10.0.0.0/8 for the network "
         "or 10.1.2.3/32 for the one address (--network)"),
        (["rule", "add", "deny", "--everyone", "--user", "x"],
         "lastlogin: cannot be combined with match options (--everyone)"),
    ]:
        out = lastlogin(*args, env=env)
        assert (out.returncode, out.stderr) == (2, line + "\n"), args
    out = lastlogin("rule", "add", "deny", "--everyone", "--priority", "900", env=env)
    assert out.returncode == 0
    rid = int(out.stdout.split()[-1])
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE access_rules SET message = :m WHERE id = :id"),
                     {"m": "two\r\nlines", "id": rid})
    engine.dispose()
    try:
        listed = lastlogin("rule", "list", env=env).stdout.splitlines()
        assert len(listed) == 2 and "two\\r\\nlines" in listed[1]
        as_json = json.loads(lastlogin("rule", "list", "--format", "json", env=env).stdout)
        assert as_json[0]["message"] == "two\r\nlines"
    finally:        # the session's SQLite database is shared with other tests
        assert lastlogin("rule", "remove", str(rid), env=env).returncode == 0


def test_a_rule_enabled_with_text_is_reported_not_silently_off(sqlite_db):
    """SQLite keeps enabled='true' as text and reads it as false: the loader
    must say so, not drop a deny rule without a word. (PostgreSQL's boolean
    column refuses such a value itself.)"""
    from app.snapshot import load_snapshot
    engine = make_engine(sqlite_db)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO access_rules (action, username, enabled) "
                             "VALUES ('deny', 'frank', 'true')")
        conn.exec_driver_sql("INSERT INTO access_rules (action, username, enabled) "
                             "VALUES ('deny', 'gina', 1)")
        conn.exec_driver_sql("INSERT INTO access_rules (action, username, enabled) "
                             "VALUES ('deny', 'hal', 0)")
        snap = load_snapshot(conn)
    engine.dispose()
    assert [r.username for r in snap.rules] == ["gina"]
    assert [(t, reason) for t, _, reason in snap.skipped] == [
        ("access_rules", "enabled: not a boolean (0 or 1): 'true'")]
    # `rule list` says the same as the loader: the text row is not in force
    listed = json.loads(lastlogin("rule", "list", "--format", "json",
                                  env={"LASTLOGIN_DATABASE_URL": sqlite_db}).stdout)
    assert {r["username"]: r["state"] for r in listed} == {
        "frank": "skipped: enabled: not a boolean (0 or 1): 'true'",
        "gina": "on", "hal": "off"}


def test_check_cannot_steer_the_operators_terminal(engine, db_url):
    """A message written with SQL may hold ESC/BEL/CR/LF: `check` shows it escaped."""
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO access_rules (action, username, message) VALUES "
                             "('deny', 'eve', 'hi' || char(27) || ']0;pwned' || char(7) || "
                             "char(13) || char(10) || 'rule: 999 fake')"
                             if engine.dialect.name == "sqlite" else
                             "INSERT INTO access_rules (action, username, message) VALUES "
                             "('deny', 'eve', 'hi' || chr(27) || ']0;pwned' || chr(7) || "
                             "chr(13) || chr(10) || 'rule: 999 fake')")
    out = lastlogin("check", "eve", "192.0.2.1", env={"LASTLOGIN_DATABASE_URL": db_url})
    assert out.returncode == 1
    assert not any(ch in out.stdout for ch in "\x1b\x07\r")
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("rule:")] == [
        ln for ln in out.stdout.splitlines() if ln.startswith("rule:") and "999" not in ln]


def test_an_automatic_block_already_in_force_is_extended_not_added_twice(engine):
    """Daemons on two mail hosts reaching the threshold for one address
    leave one rule: the second extends the first."""
    from app.db.rules import add_auto_block
    now = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)
    block = dict(comment="3 failed", priority=50, now=now, remote_network="192.0.2.7/32")
    with engine.begin() as conn:
        first = add_auto_block(conn, valid_until=now + dt.timedelta(hours=1), **block)
        again = add_auto_block(conn, valid_until=now + dt.timedelta(hours=2), **block)
        shorter = add_auto_block(conn, valid_until=now + dt.timedelta(minutes=5), **block)
        user = add_auto_block(conn, valid_until=now + dt.timedelta(hours=1), comment="3",
                              priority=50, now=now, username="bob@example.com")
        rows = conn.execute(sa.select(access_rules.c.id, access_rules.c.valid_until)
                            .order_by(access_rules.c.id)).all()
    assert first == again == shorter != user
    assert [r.id for r in rows] == [first, user]
    assert rows[0].valid_until == now + dt.timedelta(hours=2)
    # one an operator disabled is left as it is: the next burst is a new block
    from app.db.rules import set_enabled
    with engine.begin() as conn:
        set_enabled(conn, user, False)
        fresh = add_auto_block(conn, valid_until=now + dt.timedelta(hours=3), comment="3",
                               priority=50, now=now, username="bob@example.com")
        off = conn.execute(sa.select(access_rules.c.enabled, access_rules.c.valid_until)
                           .where(access_rules.c.id == user)).one()
    assert fresh not in (first, user) and not off.enabled
    assert off.valid_until == now + dt.timedelta(hours=1)
    # one that has ended is not extended: a new block is a new rule
    with engine.begin() as conn:
        later = add_auto_block(conn, valid_until=now + dt.timedelta(hours=5),
                               **dict(block, now=now + dt.timedelta(hours=3)))
    assert later not in (first, user, fresh)


def test_two_daemons_adding_the_same_block_at_once_leave_one_rule(pg_db):
    """The look-and-add is serialised on PostgreSQL: the second transaction
    waits on the first's lock and then finds its rule."""
    import threading

    from app.db.rules import add_auto_block
    now = dt.datetime.now(dt.timezone.utc)
    block = dict(comment="3 failed", priority=50, now=now, remote_network="192.0.2.8/32",
                 valid_until=now + dt.timedelta(hours=1))
    engine = make_engine(pg_db)
    try:
        got: list[int] = []
        with engine.begin() as first:
            got.append(add_auto_block(first, **block))
            other = threading.Thread(target=lambda: got.append(
                _in_new_transaction(engine, add_auto_block, **block)))
            other.start()
            # autocommit: pg_stat_activity is read once per transaction
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
                assert wait_for(lambda: watch.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()")).scalar() == 1, timeout=10)
        other.join(10)
        with engine.connect() as conn:
            count = conn.execute(sa.select(sa.func.count()).select_from(access_rules)).scalar()
    finally:
        engine.dispose()
    assert got[0] == got[1] and count == 1


def _in_new_transaction(engine, fn, **kw):
    with engine.begin() as conn:
        return fn(conn, **kw)
