"""Userdb overrides and alerts: pure merging, storage, and the daemon's replies."""

from __future__ import annotations

import array
import datetime as dt
import os
import socket
import threading

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.overrides import (add_alert, list_overrides, load_overrides, remove_alert,
                              set_override, unset_override)
from app.db.schema import login_alert_deliveries, login_events
from app.errors import InvalidInput, NotFound
from app.overrides import (Alert, Overrides, alerts_for, merge_fields, union_list,
                           validate_key, version_warning)
from app.protocol import alert_line, build_reply, parse_reply, tempfail_line
from app.sysgroups import system_groups
from tests.builders import request_bytes
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.postlogin import send_request
from tests.harness.cli import lastlogin

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)


# --- pure ---------------------------------------------------------------------

def test_merge_replaces_in_place_appends_new_and_never_repeats_a_key():
    fields = [b"uid=1", b"mail=maildir:~/Maildir", b"mail=dup", b"auth_mech=PLAIN"]
    merged = merge_fields(fields, {"mail": "mdbox:/srv/x\tweird", "quota_rule": "*:storage=1G"})
    assert merged == [b"uid=1", b"mail=mdbox:/srv/x\tweird", b"auth_mech=PLAIN",
                      b"quota_rule=*:storage=1G"]
    assert merge_fields(fields, {}) is fields


def test_precedence_user_over_domain_over_global():
    o = Overrides(global_={"mail": "g", "quota_rule": "g"},
                  domains={"example.com": {"mail": "d", "acl_groups": "d"}},
                  users={"alice@example.com": {"mail": "u"}})
    assert o.for_login("alice@example.com", "example.com") == {
        "mail": "u", "quota_rule": "g", "acl_groups": "d"}
    assert o.for_login("bob@example.com", "example.com")["mail"] == "d"
    assert o.for_login("carol@example.org", "example.org") == {"mail": "g", "quota_rule": "g"}
    assert o.count() == 5


@pytest.mark.parametrize("key", ["", "a=b", "a\tb", "a\nb", "auth_token", "auth_mech",
                                 "auth_user"])
def test_bad_keys(key):
    with pytest.raises(InvalidInput):
        validate_key(key)


def test_version_warnings():
    assert version_warning("mail", "2.4") and version_warning("quota_rule2", "2.4")
    assert version_warning("mail_path", "2.3")
    assert version_warning("mail", "2.3") is None and version_warning("acl_groups", "2.4") is None


def test_union_list():
    assert union_list("staff, sales", ["sales", "root"]) == "staff,sales,root"
    assert union_list(None, ["a"]) == "a"


def test_alert_selection():
    alerts = (Alert(1, "global", "", "all"),
              Alert(2, "domain", "example.com", "dom"),
              Alert(3, "user", "alice@example.com", "once", show_once=True),
              Alert(4, "global", "", "later", valid_from=NOW + dt.timedelta(hours=1)),
              Alert(5, "global", "", "over", valid_until=NOW))
    ids = lambda *a: [x.id for x in alerts_for(alerts, *a)]   # noqa: E731
    assert ids(set(), "alice@example.com", "example.com", NOW) == [1, 2, 3]
    assert ids({(3, "alice@example.com")}, "alice@example.com", "example.com", NOW) == [1, 2]
    assert ids(set(), "bob@example.org", "example.org", NOW) == [1]


def test_system_groups_of_root():
    assert "root" in system_groups("root")
    assert system_groups("no-such-user-here") == []


# --- storage --------------------------------------------------------------------

def test_override_storage(engine):
    with engine.begin() as conn:
        set_override(conn, "global", None, "quota_rule", "*:storage=1G")
        set_override(conn, "domain", "@Example.COM", "mail", "maildir:/srv/%d/%n")
        set_override(conn, "user", "alice@example.com", "mail", "maildir:/tmp/test")
        set_override(conn, "user", "alice@example.com", "mail", "maildir:/tmp/test2")  # update
        with pytest.raises(InvalidInput):
            set_override(conn, "user", "", "mail", "x")
        with pytest.raises(InvalidInput):
            set_override(conn, "planet", "x", "mail", "x")
        loaded = load_overrides(conn)
        assert loaded.users == {"alice@example.com": {"mail": "maildir:/tmp/test2"}}
        assert loaded.domains == {"example.com": {"mail": "maildir:/srv/%d/%n"}}
        assert [r["key"] for r in list_overrides(conn, "global", None)] == ["quota_rule"]
        unset_override(conn, "global", None, "quota_rule")
        with pytest.raises(NotFound):
            unset_override(conn, "global", None, "quota_rule")


# --- the daemon -------------------------------------------------------------------

@pytest.fixture
def daemon_with(db_url):
    started = []

    def start(**settings):
        d = make_daemon(db_url, protocols="imap,pop3", **settings)
        d.start()
        started.append(d)
        return d
    yield start
    for d in started:
        d.stop()


def test_overrides_reach_the_reply(db_url, daemon_with):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        set_override(conn, "domain", "example.com", "mail", "maildir:/srv/example.com/%n")
        set_override(conn, "user", "alice@example.com", "quota_rule", "*:storage=2G")
        set_override(conn, "global", None, "note", "100%% %s from %r;'quoted'")
    d = daemon_with()
    user, fields = parse_reply(send_request(d.sock("imap"), request_bytes()).reply)
    assert user == b"alice@example.com"
    assert fields == [b"uid=5000", b"gid=5000", b"home=/var/vmail/alice",
                      b"mail=maildir:/srv/example.com/alice", b"auth_mech=PLAIN",
                      b"auth_token=3f2a0c9e5b7d41e08a6c2f1b9d3e7a5c4b8f0e12",
                      b"note=100% imap from 198.51.100.7;'quoted'",
                      b"quota_rule=*:storage=2G"]
    # changed while running: the next login gets the new value
    with engine.begin() as conn:
        unset_override(conn, "global", None, "note")
    assert wait_for(lambda: b"note=" not in send_request(d.sock("imap"), request_bytes()).reply,
                    timeout=5)
    engine.dispose()


def test_alerts_imap_only_and_show_once_survives_restart(db_url, daemon_with):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        a_always = add_alert(conn, "user", "alice@example.com", "Out of office until Monday")
        a_once = add_alert(conn, "global", None, "New webmail for %d", show_once=True)
    d = daemon_with()
    first = send_request(d.sock("imap"), request_bytes())
    assert not first.refused
    assert first.client_saw() == (alert_line("Out of office until Monday")
                                  + alert_line("New webmail for example.com"))
    second = send_request(d.sock("imap"), request_bytes())
    assert second.client_saw() == alert_line("Out of office until Monday")
    pop = send_request(d.sock("pop3"), request_bytes())
    assert not pop.refused and pop.client_saw() == b""          # never for POP3
    d.stop()
    with engine.connect() as conn:
        seen = conn.execute(sa.select(login_alert_deliveries)).all()
    assert [(r.alert_id, r.username) for r in seen] == [(a_once, "alice@example.com")]
    d2 = daemon_with()
    assert send_request(d2.sock("imap"), request_bytes()).client_saw() == alert_line(
        "Out of office until Monday")
    with engine.begin() as conn:
        remove_alert(conn, a_always)
        remove_alert(conn, a_once)
        assert conn.execute(sa.select(sa.func.count()).select_from(
            login_alert_deliveries)).scalar() == 0
    engine.dispose()


def test_acl_groups_from_system_groups(db_url, daemon_with):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        set_override(conn, "user", "root", "acl_groups", "staff")
    engine.dispose()
    d = daemon_with(acl_groups_from_system="true")
    _, fields = parse_reply(send_request(d.sock("imap"), request_bytes(b"root")).reply)
    acl = [f for f in fields if f.startswith(b"acl_groups=")]
    assert len(acl) == 1
    groups = acl[0].split(b"=", 1)[1].split(b",")
    assert groups[0] == b"staff" and b"root" in groups
    # a user the system does not know keeps what Dovecot sent
    _, fields = parse_reply(send_request(d.sock("imap"), request_bytes(b"x@example.com")).reply)
    assert not any(f.startswith(b"acl_groups=") for f in fields)


class NextHop(threading.Thread):
    """A stand-in for a next post-login socket: records what it got, answers."""

    def __init__(self, path: str, answer: bytes | None, send_fd: bool = True):
        super().__init__(daemon=True)
        self.path, self.answer, self.send_fd = path, answer, send_fd
        self.requests: list[tuple[bytes, int]] = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16))
                fds = array.array("i")
                for level, kind, raw in anc:
                    fds.frombytes(raw[:len(raw) - len(raw) % 4])
                self.requests.append((data, len(fds)))
                if self.answer is not None:
                    anc_out = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds[:1])] \
                        if self.send_fd and fds else []
                    conn.sendmsg([self.answer], anc_out)
                for fd in fds:
                    os.close(fd)


def test_next_hop_gets_merged_fields_and_its_answer_is_relayed(db_url, daemon_with, tmp_path):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        set_override(conn, "global", None, "mail", "maildir:/srv/%u")
    hop_path = str(tmp_path / "hop.sock")
    hop_reply = build_reply(b"alice@example.com", [b"uid=5000", b"extra=from-script"])
    hop = NextHop(hop_path, hop_reply)
    hop.start()
    d = daemon_with(next_socket_imap=hop_path)
    ex = send_request(d.sock("imap"), request_bytes())
    assert ex.reply == hop_reply
    (sent, nfds), = hop.requests
    assert nfds == 1 and b"\tmail=maildir:/srv/alice@example.com\t" in sent
    assert sent.startswith(b"VERSION\tscript-login\t1\t0\n")
    # pop3 has no next hop configured: answered by lastlogin itself
    assert parse_reply(send_request(d.sock("pop3"), request_bytes()).reply)[1][3] == \
        b"mail=maildir:/srv/alice@example.com"
    hop.sock.close()
    with engine.connect() as conn:
        outcomes = [r.outcome for r in conn.execute(sa.select(login_events))]
    assert outcomes == ["allowed", "allowed"]
    engine.dispose()


def test_refusal_by_the_next_hop_is_recorded_as_denied(db_url, daemon_with, tmp_path):
    hop_path = str(tmp_path / "hop.sock")
    hop = NextHop(hop_path, None)          # closes without a reply: a refusal
    hop.start()
    d = daemon_with(next_socket_imap=hop_path)
    assert send_request(d.sock("imap"), request_bytes()).refused
    engine = make_engine(db_url)
    with engine.connect() as conn:
        (ev,) = conn.execute(sa.select(login_events)).all()
    engine.dispose()
    assert ev.outcome == "denied" and ev.rule_id is None
    assert "reason=\"next hop" in d.logs()
    hop.sock.close()


def test_override_and_alert_cli(db_url):
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    assert lastlogin("override", "set", "mail", "maildir:/tmp/test", "--user", "alice@example.com",
                     env=env).returncode == 0
    warn = lastlogin("override", "set", "mail", "x", "--global",
                     env={**env, "LASTLOGIN_DOVECOT_VERSION": "2.4"})
    assert warn.returncode == 0 and "2.4 ignores it" in warn.stderr
    both = lastlogin("override", "set", "mail", "x", "--user", "a", "--domain", "b", env=env)
    assert both.returncode == 2 and both.stderr.strip() == (
        "lastlogin: give one of --user, --domain, --global (scope)")
    listed = lastlogin("override", "list", "--user", "alice@example.com", "--format", "csv",
                       env=env).stdout.splitlines()
    assert listed == ["scope,scope_value,key,value", "user,alice@example.com,mail,maildir:/tmp/test"]
    assert lastlogin("alert", "add", "Out of office", "--user", "alice@example.com",
                     env=env).returncode == 0
    check = lastlogin("check", "alice@example.com", "192.0.2.1", env=env).stdout
    assert "field:    mail=maildir:/tmp/test" in check
    assert "alert:    * OK [ALERT] Out of office" in check
    pop = lastlogin("check", "alice@example.com", "192.0.2.1", "--protocol", "pop3", env=env)
    assert "alert:" not in pop.stdout
    assert lastlogin("override", "unset", "mail", "--user", "alice@example.com",
                     env=env).returncode == 0
    gone = lastlogin("override", "unset", "mail", "--user", "alice@example.com", env=env)
    assert gone.returncode == 1
    assert lastlogin("alert", "remove", "999", env=env).returncode == 1


# --- guard rails (issue 13) ------------------------------------------------------

@pytest.mark.parametrize("key,value,allow_ids,reason", [
    ("uid", "5000", False, "uid changes who the session runs as; give --allow-uid-gid to set it"),
    ("uid", "0", True, "uid 0 (root) is never allowed"),
    ("gid", "00", True, "gid 0 (root) is never allowed"),
    ("uid", "root", True, "uid 0 (root) is never allowed"),
    ("user", "mallory", False, "user must reach Dovecot unchanged; it cannot be overridden"),
    ("auth_token", "x", False,
     "auth_token must reach Dovecot unchanged; it cannot be overridden"),
    ("session", "x", False, "session must reach Dovecot unchanged; it cannot be overridden"),
    ("mail", "a\x00b", False, "must not contain a NUL byte"),
    ("mail", "a\tb", False, "must not contain a TAB"),
    ("mail", "a\rb", False, "must not contain a CR"),
    ("mail", "a\nb", False, "must not contain a line feed"),
    ("mail", "maildir:/srv/%h", False, "unknown variable '%h' (write %% for a %)"),
    ("bad key", "x", False, "must not contain white space: 'bad key'"),
])
def test_override_checks(engine, key, value, allow_ids, reason):
    with engine.begin() as conn:
        with pytest.raises(InvalidInput) as err:
            set_override(conn, "user", "alice@example.com", key, value, allow_ids)
    assert err.value.reason == reason
    with engine.begin() as conn:
        set_override(conn, "user", "alice@example.com", "uid", "5000", allow_ids=True)
        assert [(r["key"], r["value"]) for r in list_overrides(conn)] == [("uid", "5000")]


def test_scopes_are_normalised_once_for_every_entrance(engine):
    with engine.begin() as conn:
        set_override(conn, "domain", " @Example.COM ", "mail", "maildir:/srv/%d/%n")
        set_override(conn, "user", " Alice@Example.com ", "quota_rule", "*:storage=1G")
        set_override(conn, "user", "alice@example.com", "quota_rule", "*:storage=2G")
        rows = [(r["scope"], r["scope_value"], r["value"]) for r in list_overrides(conn)]
        assert rows == [("domain", "example.com", "maildir:/srv/%d/%n"),
                        ("user", "alice@example.com", "*:storage=2G")]
        # unset and list find the user whatever the case
        assert len(list_overrides(conn, "user", "ALICE@example.com")) == 1
        loaded = load_overrides(conn)
    assert loaded.for_login("ALICE@EXAMPLE.COM ") == {"mail": "maildir:/srv/%d/%n",
                                                      "quota_rule": "*:storage=2G"}
    with engine.begin() as conn:
        unset_override(conn, "user", "Alice@EXAMPLE.com", "quota_rule")
        assert [r["scope"] for r in list_overrides(conn)] == ["domain"]


def test_sql_written_rows_that_fail_the_checks_are_skipped_and_reported(engine):
    from app.snapshot import load_snapshot, skipped_warnings
    bad = [("user", "a@x", "uid", "0"), ("user", "a@x", "auth_token", "stolen"),
           ("global", "", "mail", "maildir:/srv/\n/x"), ("global", "", "note", "%h"),
           ("global", "", "a=b", "x")]
    good = [("domain", "@Example.COM", "mail", "maildir:/srv/%d/%n"),
            ("user", "B@X", "uid", "5001")]
    if engine.dialect.name == "sqlite":        # PostgreSQL text cannot hold a NUL at all
        bad.append(("global", "", "quota_rule", "1G\x00uid=0"))
    ids = {}
    with engine.begin() as conn:
        for scope, value, key, val in bad + good:
            ids[key, val] = conn.execute(sa.text(
                "INSERT INTO userdb_overrides (scope, scope_value, key, value) "
                "VALUES (:s, :v, :k, :val) RETURNING id"),
                {"s": scope, "v": value, "k": key, "val": val}).scalar_one()
        conn.execute(sa.text("INSERT INTO login_alerts (scope, scope_value, message) "
                             "VALUES ('global', '', :m)"), {"m": "two\r\nlines"})
        snap = load_snapshot(conn)
    assert snap.overrides.for_login("a@x") == {}
    assert snap.overrides.for_login("b@x") == {"uid": "5001"}
    assert snap.overrides.for_login("c@example.com") == {"mail": "maildir:/srv/%d/%n"}
    skipped = {(t, i): r for t, i, r in snap.skipped}
    expected = {("userdb_overrides", ids["uid", "0"]): "value: uid 0 (root) is never allowed",
                ("userdb_overrides", ids["auth_token", "stolen"]):
                    "key: auth_token must reach Dovecot unchanged; it cannot be overridden",
                ("userdb_overrides", ids["mail", "maildir:/srv/\n/x"]):
                    "value: must not contain a line feed",
                ("userdb_overrides", ids["note", "%h"]):
                    "value: unknown variable '%h' (write %% for a %)",
                ("userdb_overrides", ids["a=b", "x"]): "key: must not contain '=': 'a=b'"}
    if engine.dialect.name == "sqlite":
        expected["userdb_overrides", ids["quota_rule", "1G\x00uid=0"]] = \
            "value: must not contain a NUL byte"
    alert_skips = {k: v for k, v in skipped.items() if k[0] == "login_alerts"}
    assert list(alert_skips.values()) == ["message: must not contain a CR"]
    assert {k: v for k, v in skipped.items() if k[0] == "userdb_overrides"} == expected
    assert snap.alerts == ()
    lines = skipped_warnings(snap.skipped)
    assert f"userdb_overrides row {ids['uid', '0']} skipped: value: uid 0 (root) is never " \
           "allowed" in lines


@pytest.mark.parametrize("args,line", [
    (["override", "set", "uid", "0", "--user", "a@x", "--allow-uid-gid"],
     "lastlogin: uid 0 (root) is never allowed (VALUE)"),
    (["override", "set", "uid", "5000", "--user", "a@x"],
     "lastlogin: uid changes who the session runs as; give --allow-uid-gid to set it "
     "(KEY)"),
    (["override", "set", "mail", "maildir:/srv/%h", "--global"],
     "lastlogin: unknown variable '%h' (write %% for a %) (VALUE)"),
    (["override", "set", "note", "a\tb", "--global"],
     "lastlogin: must not contain a TAB (VALUE)"),
    (["override", "set", "user", "root", "--global"],
     "lastlogin: user must reach Dovecot unchanged; it cannot be overridden (KEY)"),
    (["override", "set", "mail", "x", "--domain", " @ "],
     "lastlogin: must not be empty (--domain)"),
    (["alert", "add", "hello\r\n* OK [ALERT] fake"],
     "lastlogin: must not contain a CR (MESSAGE)"),
    (["alert", "add", "hello %x"],
     "lastlogin: unknown variable '%x' (write %% for a %) (MESSAGE)"),
    (["alert", "add", "hello", "--until", "2020-01-01T00:00:00Z"],
     "lastlogin: the window has already ended (2020-01-01T00:00:00+00:00) (--until)"),
])
def test_override_cli_refusals_are_one_line(sqlite_url, args, line):
    out = lastlogin(*args, env={"LASTLOGIN_DATABASE_URL": sqlite_url})
    assert (out.returncode, out.stderr) == (2, line + "\n")


def test_override_cli_uid_with_the_flag_and_domain_with_at(sqlite_url):
    env = {"LASTLOGIN_DATABASE_URL": sqlite_url}
    ok = lastlogin("override", "set", "uid", "5000", "--user", "a@x", "--allow-uid-gid", env=env)
    assert ok.returncode == 0 and ok.stdout == "set uid for user a@x\n"
    dom = lastlogin("override", "set", "mail", "maildir:/srv/%d/%n", "--domain", "@Example.COM",
                    env=env)
    assert dom.stdout == "set mail for domain example.com\n"
    check = lastlogin("check", " Bob@Example.com", "192.0.2.1", env=env).stdout
    assert "field:    mail=maildir:/srv/Example.com/Bob" in check.splitlines()
    bad = lastlogin("check", "eve/x@example.com", "192.0.2.1", env=env)
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[-1] == "refused:  temporary failure: mail: %n would put a / " \
                                          "into a path"
    for args in (["override", "unset", "uid", "--user", "A@X"],
                 ["override", "unset", "mail", "--domain", "example.com"]):
        assert lastlogin(*args, env=env).returncode == 0



@pytest.mark.parametrize("answer,problem", [
    (b"\n", "empty reply line"),
    (b"alice@example.com\tuid=5000\nsecond\tline\n", "reply has 2 lines, not one"),
    (b"\tuid=5000\n", "reply has no username"),
])
def test_an_unusable_next_hop_reply_is_a_temporary_failure(db_url, daemon_with, tmp_path,
                                                           answer, problem):
    hop_path = str(tmp_path / "hop.sock")
    hop = NextHop(hop_path, answer)
    hop.start()
    d = daemon_with(next_socket_imap=hop_path)
    ex = send_request(d.sock("imap"), request_bytes())
    assert ex.refused and ex.reply == b""
    assert ex.client_saw() == tempfail_line("imap")
    assert f'reason="next hop {hop_path}: {problem}"' in d.logs()
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert [r.outcome for r in conn.execute(sa.select(login_events))] == ["denied"]
    engine.dispose()
    hop.sock.close()


def test_two_users_of_a_domain_get_two_mailboxes_and_an_unsafe_name_none(db_url, daemon_with):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        set_override(conn, "domain", "example.com", "mail", "maildir:/srv/mail/%d/%n")
    engine.dispose()
    d = daemon_with()
    mails = []
    for user in (b"alice@example.com", b"bob@example.com"):
        _, fields = parse_reply(send_request(d.sock("imap"), request_bytes(user)).reply)
        mails += [f for f in fields if f.startswith(b"mail=")]
    assert mails == [b"mail=maildir:/srv/mail/example.com/alice",
                     b"mail=maildir:/srv/mail/example.com/bob"]
    for proto, user in (("imap", b"../bob@example.com"), ("pop3", b".@example.com")):
        ex = send_request(d.sock(proto), request_bytes(user))
        assert ex.refused and ex.client_saw() == tempfail_line(proto)
    logs = d.logs()
    (line,) = [ln for ln in logs.splitlines() if "user=../bob@example.com " in ln]
    assert "event=login protocol=imap " in line and " outcome=denied rule=- " in line
    assert 'reason="override: mail: %n would put a / into a path"' in logs
    assert 'reason="override: mail: %n would start a path element with a ."' in logs


def test_two_sql_rows_for_one_user_in_different_case_keep_the_first(engine):
    from app.snapshot import load_snapshot
    with engine.begin() as conn:
        first, second = (conn.execute(sa.text(
            "INSERT INTO userdb_overrides (scope, scope_value, key, value) "
            "VALUES ('user', :u, 'mail', :v) RETURNING id"), {"u": u, "v": v}).scalar_one()
            for u, v in (("bob@x", "maildir:/srv/first"), ("Bob@X", "maildir:/srv/second")))
        snap = load_snapshot(conn)
    assert snap.overrides.for_login("BOB@x") == {"mail": "maildir:/srv/first"}
    assert snap.skipped == (("userdb_overrides", second, "mail is set twice for user Bob@X "
                             "(usernames match case-insensitively)"),)
    assert first < second


@pytest.mark.parametrize("key,value,allow", [
    ("mail_access_groups", "root", False),          # who the session runs as: flag first
    ("mail_access_groups", "mail,root", True),      # never root, also inside a list
    ("first_valid_uid", "0", True),
    ("uid", "+0", True), ("gid", "0x0", True),      # 0 spelled otherwise
    ("uid", "%{user}", True),                       # a template would make a user root
    ("quota_rule", "*:storage=1G\x1b]52;c;cHduZWQ=\x07", False),   # OSC 52 to a terminal
    ("note", "a\x7fb", False),
    ("set/mail_uid", "0", True),                     # 2.4's prefixed names too
    ("namespace/inbox/mail_uid", "5000", False),
    ("set/user", "other@example.com", True),         # a session-identity key, prefixed
])
def test_ids_and_control_characters_are_refused(key, value, allow):
    from app.errors import InvalidInput
    from app.overrides import validate_override
    with pytest.raises(InvalidInput):
        validate_override(key, value, allow_ids=allow)


def test_plain_ids_and_names_pass_with_the_flag():
    from app.overrides import validate_override
    validate_override("uid", "5000", allow_ids=True)
    validate_override("mail_access_groups", "mail,vmail", allow_ids=True)


@pytest.fixture
def root_aliases():
    """A user and a group that are root (id 0) under other names, as `toor`
    and `wheel`-style aliases are on some hosts; removed afterwards."""
    import subprocess
    user, group = f"lltoor{os.getpid()}", f"llwheel{os.getpid()}"
    subprocess.run(["groupadd", "-o", "-g", "0", group], check=True)
    try:
        subprocess.run(["useradd", "-o", "-u", "0", "-g", "0", "-M", "-N", "-s",
                        "/usr/sbin/nologin", user], check=True)
        try:
            yield user, group
        finally:
            subprocess.run(["userdel", "-f", user], check=True)
    finally:
        subprocess.run(["groupdel", "-f", group], check=True)


def test_a_name_that_is_root_on_this_host_is_never_allowed(root_aliases, engine, db_url):
    user, group = root_aliases
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    for key, name in (("uid", user), ("mail_uid", user), ("gid", group),
                      ("mail_access_groups", f"mail,{group}")):
        out = lastlogin("override", "set", key, name, "--user", "a@x", "--allow-uid-gid", env=env)
        bad = name.split(",")[-1]
        assert (out.returncode, out.stderr) == (
            2, f"lastlogin: {key} {bad} is root (id 0) on this host; root is never allowed "
               "(VALUE)\n"), key
    # written with SQL, the loader skips it and says why
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO userdb_overrides (scope, scope_value, key, value) "
                             "VALUES ('user', 'a@x', 'uid', :v)"), {"v": user})
        skipped = []
        assert load_overrides(conn, skipped).users == {}
    assert [reason for _, _, reason in skipped] == [
        f"value: uid {user} is root (id 0) on this host; root is never allowed"]
    # an ordinary name still goes through
    assert lastlogin("override", "set", "uid", "nobody", "--user", "a@x", "--allow-uid-gid",
                     env=env).returncode == 0
