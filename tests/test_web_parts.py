"""The dashboard's parts without a server: the chart's counts (cached) against
`report daily`, the token and its cookie, the chart's geometry, which rules
concern a user; and the ASGI application itself, called in-process (the Host
check, hostile requests) over a real database."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import html
import json
import re
import time
import urllib.parse
import zoneinfo

import pytest
import sqlalchemy as sa

from app.cli.common import Context
from app.config import Settings
from app.db import make_engine, reports
from app.db.rules import add_rule
from app.db.store import record_logins
from app.policy import Rule
from app.web import auth
from app.web.app import create_app
from app.web.chart import daily_chart, nice_top
from app.web.views import DailyCounts
from tests.builders import record
from tests.harness.cli import lastlogin

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
HOUR = dt.timedelta(hours=1)
TOKEN = "t0ken-for-the-tests-" + "x" * 12
SECURITY = ("content-security-policy", "x-frame-options", "x-content-type-options",
            "referrer-policy", "cache-control")


def call(app, method: str, path: str, query: bytes = b"", headers=(), body: bytes = b"",
         host: bytes | None = b"127.0.0.1:8470"):
    """One request to the ASGI ``app``, as uvicorn makes it: (status, headers, body)."""
    out: dict = {"body": b""}
    scope = {"type": "http", "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode("utf-8", "surrogateescape"), "root_path": "",
             "scheme": "http", "query_string": query,
             "headers": [*([(b"host", host)] if host is not None else []),
                         *[(k.lower(), v) for k, v in headers]],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8470)}
    sent = [False]

    async def receive():
        if sent[0]:
            return {"type": "http.disconnect"}
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode("latin-1"): v.decode("latin-1")
                              for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")
    asyncio.run(app(scope, receive, send))
    return out["status"], out["headers"], out["body"]


def has_security_headers(headers: dict) -> bool:
    return all(h in headers for h in SECURITY) and headers["x-frame-options"] == "DENY"


@pytest.fixture
def app_on(db_url):
    """create_app(settings, engine) over an emptied database on each backend."""
    made = []

    def make(daily=None, **settings):
        engine = make_engine(db_url)
        made.append(engine)
        return create_app(dataclasses.replace(Settings(), **settings), engine,
                          dt.timezone.utc, daily), engine
    yield make
    for engine in made:
        engine.dispose()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/St_Johns"])
def test_the_charts_counts_are_report_daily_and_late_logins_show_after_a_refresh(engine, zone):
    tz = zoneinfo.ZoneInfo(zone)
    protocols = ("imap", "pop3", "submission")
    with engine.begin() as conn:
        record_logins(conn, [record(b"u%d@example.com" % (i % 7), at=NOW - i * 5 * HOUR,
                                    protocol=protocols[i % 3],
                                    outcome="denied" if i % 11 == 0 else "allowed")
                             for i in range(200)])              # 41 days back
    clock = Clock()
    counts = DailyCounts(refresh=900, clock=clock)
    with engine.connect() as conn:
        first = counts.rows(conn, NOW, tz)
        assert first == reports.daily(conn, 30, NOW, tz)
        assert len({r["day"] for r in first}) == 30
    # a login now shows at once; one stored late for an hour that is kept, after a refresh
    with engine.begin() as conn:
        record_logins(conn, [record(b"now@example.com", at=NOW),
                             record(b"late@example.com", at=NOW - 3 * HOUR, protocol="pop3")])
    clock.t += 60
    with engine.connect() as conn:
        daily = reports.daily(conn, 30, NOW, tz)
        cached = counts.rows(conn, NOW, tz)
        assert sum(r["allowed"] for r in cached) == sum(r["allowed"] for r in first) + 1
        clock.t += 900
        assert counts.rows(conn, NOW, tz) == daily


def test_in_a_half_hour_zone_the_first_days_first_minutes_count_on_it(engine):
    """St John's days start at hh:30 UTC: a login in the first half hour of
    the first day is that day's, not a 31st day's (report daily and the chart)."""
    tz = zoneinfo.ZoneInfo("America/St_Johns")
    now = dt.datetime(2026, 11, 26, 16, 0, tzinfo=dt.timezone.utc)
    first = now.astimezone(tz).date() - dt.timedelta(days=29)
    start = dt.datetime.combine(first, dt.time(), tz).astimezone(dt.timezone.utc)
    assert start.minute == 30
    with engine.begin() as conn:
        record_logins(conn, [record(b"early@example.com", at=start + dt.timedelta(minutes=10)),
                             record(b"late@example.com", at=start - dt.timedelta(minutes=10))])
    with engine.connect() as conn:
        for rows in (reports.daily(conn, 30, now, tz), DailyCounts().rows(conn, now, tz)):
            assert [(r["day"], r["allowed"]) for r in rows] == [(first, 1)]


def test_with_an_engine_the_refresh_runs_in_the_background(engine):
    with engine.begin() as conn:
        record_logins(conn, [record(b"a@example.com", at=NOW - 30 * HOUR)])
    clock = Clock()
    counts = DailyCounts(refresh=900, clock=clock, engine=engine)
    counts.warm(dt.timezone.utc)
    with engine.connect() as conn:
        assert sum(r["allowed"] for r in counts.rows(conn, NOW, dt.timezone.utc)) == 1
        with engine.begin() as writer:
            record_logins(writer, [record(b"late@example.com", at=NOW - 20 * HOUR)])
        clock.t += 901
        # this request starts the reading and does not wait for it; a later one sees it
        assert sum(r["allowed"] for r in counts.rows(conn, NOW, dt.timezone.utc)) in (1, 2)
        deadline = time.monotonic() + 30
        while counts.rows(conn, NOW, dt.timezone.utc) != reports.daily(conn, 30, NOW):
            assert time.monotonic() < deadline, "the background reading never landed"
            time.sleep(0.05)


def test_the_token_and_its_cookie():
    token = "a-token-of-thirty-two-characters"
    assert auth.bearer_ok(f"Bearer {token}", token) and auth.bearer_ok(f"bearer {token}", token)
    for bad in (None, "", token, f"Basic {token}", f"Bearer {token}x", "Bearer "):
        assert not auth.bearer_ok(bad, token), bad
    value = auth.session_value(token, now=1_000_000)
    expires, signature = value.split(".")
    assert int(expires) == 1_000_000 + auth.SESSION_SECONDS and token not in value
    assert auth.session_ok(value, token, now=1_000_000 + auth.SESSION_SECONDS - 1)
    assert not auth.session_ok(value, token, now=1_000_000 + auth.SESSION_SECONDS)
    assert not auth.session_ok(value, token + "x", now=1_000_000)
    assert not auth.session_ok(f"{int(expires) + 1}.{signature}", token, now=1_000_000)
    for junk in ("", ".", "x.y", "1e9.abc", "-1." + signature, "\u00e9." + signature,
                 "\u00b2." + signature, "\u0661\u0662." + signature, " 1." + signature,
                 "1" * 13 + "." + signature):
        assert not auth.session_ok(junk, token, now=0), junk
    assert [auth.safe_next(p) for p in ("/rules", "/user?name=a%40b", None, "", "rules",
                                        "//evil.example", "/\\evil", "https://x/",
                                        "/a\nb")] == [
        "/rules", "/user?name=a%40b", "/", "/", "/", "/", "/", "/", "/"]


def test_the_charts_geometry():
    assert [nice_top(n) for n in (0, 1, 3, 7, 10, 11, 101, 4999)] == [1, 1, 5, 10, 10, 20,
                                                                      200, 5000]
    start = dt.date(2026, 11, 1)
    rows = [{"day": start, "protocol": "imap", "allowed": 60, "denied": 20},
            {"day": start, "protocol": "pop3", "allowed": 20, "denied": 0},
            {"day": start + dt.timedelta(days=29), "protocol": "pop3", "allowed": 50,
             "denied": 0}]
    chart = daily_chart(rows, start, 30, ("imap", "pop3", "submission"))
    assert chart.total == 150 and chart.legend == [("p-imap", "imap"), ("p-pop3", "pop3")]
    imap, pop3, last = chart.bars
    assert (imap.cls, pop3.cls, last.cls) == ("p-imap", "p-pop3", "p-pop3")
    # a 100 high scale: 80 + 20 fill the first day's column to the top
    assert imap.y + imap.h == pytest.approx(chart.baseline)
    assert pop3.y + pop3.h == pytest.approx(imap.y)
    assert imap.h == pytest.approx(4 * pop3.h) and last.h == pytest.approx(2.5 * pop3.h)
    assert [label for _, label in chart.y_ticks] == ["0", "25", "50", "75", "100"]
    assert imap.title == "2026-11-01 imap: 60 allowed, 20 refused"
    assert last.x > imap.x and [lbl for _, lbl in chart.x_labels][-1] == "11-30"
    empty = daily_chart([], start, 30, ("imap",))
    assert (empty.bars, empty.legend, empty.total) == ([], [], 0)


def test_which_rules_concern_a_user():
    def rule(**kw):
        return Rule(id=1, action="deny", **kw)
    assert rule().concerns("Alice@Example.com")
    assert rule(username="alice@example.com").concerns(" ALICE@example.COM")
    assert rule(domain="EXAMPLE.com").concerns("alice@example.com")
    assert rule(protocol="pop3").concerns("alice@example.com")
    assert not rule(username="bob@example.com").concerns("alice@example.com")
    assert not rule(domain="example.org").concerns("alice@example.com")
    assert not rule(domain="example.com").concerns("alice")


def test_search_takes_like_wildcards_literally(engine):
    with engine.begin() as conn:
        record_logins(conn, [record(n) for n in (b"a_b@example.com", b"axb@example.com",
                                                 b"100%@example.com", b"Mixed@Example.com")])
    with engine.connect() as conn:
        assert [r["username"] for r in reports.find_users(conn, "a_b")] == ["a_b@example.com"]
        assert [r["username"] for r in reports.find_users(conn, "%")] == ["100%@example.com"]
        assert [r["username"] for r in reports.find_users(conn, "mixed@EX")] == [
            "Mixed@Example.com"]
        found = reports.find_users(conn, "example", limit=2)
        assert len(found) == 2 and found.total == 4
        assert isinstance(found[0]["last_seen"], dt.datetime) and found[0]["last_seen"].tzinfo


# --- the application in-process ----------------------------------------------------

def test_without_a_token_only_loopback_host_names_are_answered(app_on):
    app, _ = app_on()
    for host in (b"127.0.0.1:8470", b"127.0.0.1", b"localhost:8470", b"LocalHost",
                 b"[::1]:8470", b"[::1]"):
        status, headers, _ = call(app, "GET", "/api/rules", host=host)
        assert status == 200 and has_security_headers(headers), host
    # DNS rebinding: another site's name pointed at 127.0.0.1 reads nothing
    for host in (b"attacker.example:8470", b"attacker.example", b"127.0.0.1.evil.example",
                 b"localhost.evil.example:8470", b"127.0.0.2:8470", b"[::1]x", b"",
                 b"127.0.0.1:8470:1", None):
        for path in ("/", "/api/overview", "/api/rules", "/static/style.css", "/login"):
            status, headers, body = call(app, "GET", path, host=host)
            assert status == 421 and has_security_headers(headers), (host, path)
            assert b"<" not in body
    # two Host headers: refused, whichever comes first
    for pair in ((b"127.0.0.1:8470", b"attacker.example"), (b"attacker.example", b"localhost")):
        status, headers, _ = call(app, "GET", "/api/rules", headers=[(b"host", pair[1])],
                                  host=pair[0])
        assert status == 421 and has_security_headers(headers), pair
    # web_listen's own loopback address is one of its names
    app, _ = app_on(web_listen="127.0.0.2:8471")
    assert call(app, "GET", "/api/rules", host=b"127.0.0.2:8471")[0] == 200
    assert call(app, "GET", "/api/rules", host=b"127.0.0.3:8471")[0] == 421


def test_with_a_token_any_host_name_is_answered(app_on):
    app, _ = app_on(web_token=TOKEN)
    bearer = [(b"authorization", f"Bearer {TOKEN}".encode())]
    for host in (b"mail.example.com", b"dashboard.example:443", b"127.0.0.1:8470"):
        assert call(app, "GET", "/api/rules", headers=bearer, host=host)[0] == 200, host
        assert call(app, "GET", "/api/rules", host=host)[0] == 401, host


def test_hostile_requests_are_4xx_and_every_answer_has_the_security_headers(app_on):
    app, _ = app_on(web_token=TOKEN)
    bearer = [(b"authorization", f"Bearer {TOKEN}".encode())]
    form = [(b"content-type", b"application/x-www-form-urlencoded")]
    # a cookie whose expiry is a superscript two (latin-1 from the header), or long
    for cookie in (b"lastlogin_session=\xb2.x", b"lastlogin_session=" + b"9" * 5000 + b".x",
                   b"lastlogin_session=\xd9\xa1.x"):
        status, headers, _ = call(app, "GET", "/rules", headers=[(b"cookie", cookie)])
        assert status == 303 and has_security_headers(headers), cookie
    # more fields than the form has
    status, headers, body = call(app, "POST", "/login", headers=form,
                                 body=b"a=1&b=2&c=3&d=4&e=5")
    assert status == 400 and has_security_headers(headers) and b"fields" in body
    status, headers, _ = call(app, "POST", "/login", headers=form,
                              body=f"token={TOKEN}&next=%2Frules".encode())
    assert (status, headers["location"]) == (303, "/rules") and has_security_headers(headers)
    # days: digits that are not ASCII, more digits than int() takes, and the usual junk
    for days in ("%C2%B2", "%D9%A1%D9%A2", "9" * 5000, "1" * 13, "+5", " 5", "5.0", "0x10"):
        for path in ("/inactive", "/api/inactive"):
            status, headers, body = call(app, "GET", path, f"days={days}".encode(), bearer)
            assert status == 400 and has_security_headers(headers), (path, days[:20])
            assert b"days must be" in body
    # a NUL: PostgreSQL text cannot hold one (no stored name has one): 400, not 503
    for path, query in (("/api/user", b"name=a%00b"), ("/user", b"name=a%00b"),
                        ("/api/search", b"q=a%00b"), ("/search", b"q=%00")):
        status, headers, body = call(app, "GET", path, query, bearer)
        assert status == 400 and has_security_headers(headers), path
        assert b"NUL" in body
    for path, method, expected in (("/nowhere", "GET", 404), ("/api/rules", "POST", 405),
                                   ("/api/rules", "DELETE", 405), ("/api/user", "GET", 400)):
        status, headers, _ = call(app, method, path, headers=bearer)
        assert status == expected and has_security_headers(headers), path
    status, headers, _ = call(app, "GET", "/api/rules")
    assert status == 401 and has_security_headers(headers)


def test_an_unexpected_error_is_a_plain_500_with_the_headers_and_one_log_line(app_on, caplog):
    class Broken(DailyCounts):
        def rows(self, conn, now, tz):
            raise RuntimeError("injected\nsecond line")
    app, _ = app_on(daily=Broken())
    for path in ("/", "/api/overview"):
        caplog.clear()
        status, headers, body = call(app, "GET", path)
        assert status == 500 and has_security_headers(headers), path
        assert headers["content-type"].startswith("text/plain") and b"injected" not in body
        lines = [r for r in caplog.records if r.name == "lastlogin.web"]
        assert len(lines) == 1 and lines[0].levelname == "ERROR"
        assert "event=web_request_failed" in lines[0].getMessage()
        assert "RuntimeError: injected" in lines[0].getMessage()
    assert call(app, "GET", "/api/rules")[0] == 200        # and it keeps serving


def test_the_user_pages_check_is_lastlogin_check_with_the_server_address(app_on, db_url):
    """A rule on the server address (local network): the page decides as
    `lastlogin check USER IP --local-ip L` does, by default with the last
    login's server address, else with the one the form gives."""
    app, engine = app_on()
    name = "dave@example.com"
    with engine.begin() as conn:
        rule = add_rule(conn, action="deny", username=name, local_network="192.0.2.0/24",
                        message="not on this server")
        record_logins(conn, [record(name.encode(), at=NOW - HOUR, remote_ip="198.51.100.7",
                                    local_ip="192.0.2.25")])

    def cli(*args):
        out = lastlogin("check", name, "198.51.100.7", *args,
                        env={"LASTLOGIN_DATABASE_URL": db_url})
        lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
        return lines["decision"].strip(), lines.get("rule", "").split()[:1]

    def page(query: str):
        status, _, body = call(app, "GET", "/api/user", query.encode())
        assert status == 200, body
        c = json.loads(body)["check"]
        return c, (c["decision"], [str(c["rule"])] if c["rule"] else ["none"])

    c, answer = page("name=dave%40example.com")
    assert (c["ip"], c["local_ip"]) == ("198.51.100.7", "192.0.2.25")
    assert answer == ("deny", [str(rule)]) == cli("--local-ip", "192.0.2.25")
    assert c["message"] == "not on this server"
    c, answer = page("name=dave%40example.com&ip=198.51.100.7&local_ip=203.0.113.1")
    assert answer == ("allow", ["none"]) == cli("--local-ip", "203.0.113.1")
    c, answer = page("name=dave%40example.com&ip=198.51.100.7&local_ip=")
    assert c["local_ip"] is None and answer == ("allow", ["none"]) == cli()
    # the page shows the rule's local network, and the server address it checked with
    status, _, body = call(app, "GET", "/user", b"name=dave%40example.com")
    assert status == 200
    assert b"<th>local network</th>" in body and b"<td>192.0.2.0/24</td>" in body
    assert b'name="local_ip" value="192.0.2.25"' in body
    assert call(app, "GET", "/api/user", b"name=dave%40example.com&local_ip=x")[0] == 400


def test_the_check_form_gives_back_a_name_with_line_breaks(app_on):
    app, engine = app_on()
    names = ["cr\rlf\r\n@example.com", "new\nline@example.com", "t\u00e9st\t+%2F@x"]
    with engine.begin() as conn:
        record_logins(conn, [record(n.encode()) for n in names])
    for name in names:
        status, _, body = call(app, "GET", "/user",
                               b"name=" + urllib.parse.quote(name, safe="").encode())
        assert status == 200, name
        fields = re.findall(rb'<input type="hidden" name="([a-z_]+)" value="([^"]*)"', body)
        assert len(fields) == 1 and b"\n" not in fields[0][1] and b"\r" not in fields[0][1]
        # what a browser sends for the form (no line break left to turn into CR LF)
        key, value = fields[0][0].decode(), html.unescape(fields[0][1].decode())
        query = urllib.parse.urlencode({key: value, "ip": "198.51.100.9", "local_ip": ""})
        status, _, body = call(app, "GET", "/api/user", query.encode())
        assert status == 200 and json.loads(body)["username"] == name


# --- read-only ----------------------------------------------------------------------

def test_the_webs_engine_cannot_write(db_url):
    """`lastlogin web`'s engine (Context.engine(reports=True, read_only=True)):
    PostgreSQL sessions are read-only with a statement_timeout, SQLite is
    opened with mode=ro."""
    ctx = Context(None)
    ctx._settings = dataclasses.replace(Settings(), database_url=db_url)
    engine = ctx.engine(reports=True, read_only=True)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM access_rules")).scalar() == 0
            if conn.dialect.name == "postgresql":
                assert conn.execute(sa.text("SHOW default_transaction_read_only")).scalar() \
                    == "on"
                assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "10s"
        for statement in ("INSERT INTO access_rules (action, priority, enabled) "
                          "VALUES ('deny', 1, true)", "DELETE FROM login_events",
                          "CREATE TABLE intruder (a integer)"):
            with pytest.raises(sa.exc.DBAPIError, match="read-only|readonly"):
                with engine.begin() as conn:
                    conn.execute(sa.text(statement))
    finally:
        engine.dispose()
    writer = make_engine(db_url)
    with writer.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM access_rules")).scalar() == 0
        assert "intruder" not in sa.inspect(conn).get_table_names()
    writer.dispose()


def test_web_never_makes_a_missing_sqlite_file(tmp_path, pg_url):
    missing = tmp_path / "no" / "lastlogin.db"
    for env in ({"LASTLOGIN_DATABASE_URL": f"sqlite:///{missing}"},
                {"LASTLOGIN_DATABASE_URL": pg_url,
                 "LASTLOGIN_REPORT_DATABASE_URL": f"sqlite:///{missing}"}):
        out = lastlogin("web", env={**env, "LASTLOGIN_WEB_LISTEN": "127.0.0.1:1"})
        assert out.returncode == 3 and out.stdout == "", out.stderr
        assert out.stderr.count("\n") == 1 and f"no database at {missing}" in out.stderr
        setting = "report_database_url" if "LASTLOGIN_REPORT_DATABASE_URL" in env else \
            "database_url"
        assert f"({setting})" in out.stderr
        assert not (tmp_path / "no").exists()
    # a read-only engine of a missing file fails to connect and makes nothing
    engine = make_engine(f"sqlite:///{missing}", read_only=True)
    with pytest.raises(sa.exc.OperationalError, match="unable to open"):
        engine.connect()
    engine.dispose()
    assert not (tmp_path / "no").exists()


def test_search_lowers_as_user_key_does_ascii_only(app_on):
    """One rule for case: login.user_key's (ASCII only, as Dovecot's %L)."""
    app, engine = app_on()
    names = ["\u00c9LISE@example.com", "\u00e9lise@example.com", "kelvin@example.com",
             "\u212aelvin@example.com", "Bob@Example.com"]
    with engine.begin() as conn:
        record_logins(conn, [record(n.encode(), at=NOW - i * HOUR)
                             for i, n in enumerate(names)])

    def found(q: str) -> list[str]:
        status, _, body = call(app, "GET", "/api/search",
                               b"q=" + urllib.parse.quote(q, safe="").encode())
        assert status == 200
        return sorted(r["username"] for r in json.loads(body)["rows"])
    assert found("\u00c9LISE") == found("\u00c9lise") == ["\u00c9LISE@example.com"]
    assert found("\u00e9lise") == found("\u00e9LISE") == ["\u00e9lise@example.com"]
    assert found("lise@") == ["\u00c9LISE@example.com", "\u00e9lise@example.com"]
    assert found("KELVIN") == ["kelvin@example.com"]
    assert found("\u212aelvin") == ["\u212aelvin@example.com"]
    assert found(" bob@EXAMPLE ") == ["Bob@Example.com"]
    with engine.connect() as conn:
        assert [r["username"] for r in reports.find_users(conn, "\u212aELVIN")] == [
            "\u212aelvin@example.com"]


def test_times_follow_the_systems_zone_with_its_summer_time(db_url, monkeypatch):
    """Without --utc, pages show the system's zone by its rules (zoneinfo), so
    a July login is at +02:00 and a January one at +01:00 in Berlin, whatever
    the offset on the day the server started."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    engine = make_engine(db_url)
    winter = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.timezone.utc)
    summer = dt.datetime(2026, 7, 15, 10, 0, tzinfo=dt.timezone.utc)
    with engine.begin() as conn:
        record_logins(conn, [record(b"zone@example.com", at=winter),
                             record(b"zone@example.com", at=summer, remote_ip="192.0.2.8")])
    try:
        app = create_app(Settings(), engine)            # no zone given: the system's
        status, _, body = call(app, "GET", "/user", b"name=zone%40example.com")
        assert status == 200
        assert b"2026-07-15 12:00:00" in body and b"2026-01-15 11:00:00" in body
    finally:
        engine.dispose()


def test_the_search_box_shows_the_query_escaped(app_on):
    app, _ = app_on()
    status, _, body = call(app, "GET", "/search", b"q=%22%3E%3Cscript%3Ex")
    assert status == 200
    assert b'name="q" placeholder="user name" aria-label="Search for a user" ' \
           b'value="&#34;&gt;&lt;script&gt;x"' in body and b"<script" not in body
    assert b'value=""' in call(app, "GET", "/rules")[2]


def test_a_database_error_page_says_nothing_of_the_database(caplog):
    from tests.harness.pg import free_port
    port = free_port()          # nothing listens there
    engine = make_engine(f"postgresql+psycopg://secret_role@127.0.0.1:{port}/secret_db")
    try:
        app = create_app(Settings(), engine, dt.timezone.utc)
        for path in ("/rules", "/api/rules"):
            caplog.clear()
            status, headers, body = call(app, "GET", path)
            assert status == 503 and has_security_headers(headers), path
            assert b"database unavailable" in body
            assert b"secret" not in body and str(port).encode() not in body
            assert b"127.0.0.1" not in body and b"connect" not in body.lower()
            lines = [r.getMessage() for r in caplog.records
                     if "event=web_database_error" in r.getMessage()]
            assert len(lines) == 1 and str(port) in lines[0]
    finally:
        engine.dispose()


def test_inactive_takes_a_bounded_limit(app_on):
    app, engine = app_on()
    with engine.begin() as conn:
        record_logins(conn, [record(f"idle{i}@example.com".encode(), at=NOW - (10 + i) * 24 * HOUR)
                             for i in range(3)])

    def get(query: bytes):
        status, _, body = call(app, "GET", "/api/inactive", query)
        return status, json.loads(body)
    status, data = get(b"days=5")
    assert status == 200 and (data["limit"], data["total"], len(data["rows"])) == (1000, 3, 3)
    status, data = get(b"days=5&limit=2")
    assert (data["total"], [r["username"] for r in data["rows"]]) == (
        3, ["idle2@example.com", "idle1@example.com"])            # the longest idle first
    for bad in (b"0", b"100001", b"x", b"%C2%B2"):
        status, data = get(b"days=5&limit=" + bad)
        assert status == 400 and "limit" in data["error"], bad
    status, _, body = call(app, "GET", "/inactive", b"days=5&limit=2")
    assert status == 200 and b"2 of 3 shown" in body


def test_the_session_cookie_is_secure_when_web_secure_cookie_is_set(app_on):
    form = [(b"content-type", b"application/x-www-form-urlencoded")]
    for secure in (False, True):
        app, _ = app_on(web_token=TOKEN, web_secure_cookie=secure)
        status, headers, _ = call(app, "POST", "/login", headers=form,
                                  body=f"token={TOKEN}".encode())
        attrs = [a.strip().lower() for a in headers["set-cookie"].split(";")]
        assert status == 303 and ("secure" in attrs) == secure


@pytest.mark.parametrize("zone,offset", [("Asia/Kolkata", 330), ("Asia/Kathmandu", 345)])
def test_a_login_in_a_days_first_half_hour_counts_on_that_day(engine, zone, offset):
    """In a zone whose days do not begin on a UTC hour, a login a few minutes
    after local midnight is today's and one a few minutes before is
    yesterday's -- every day, not only the first (report daily and the chart)."""
    tz = zoneinfo.ZoneInfo(zone)
    midnight = dt.datetime(2026, 11, 27, tzinfo=tz)
    now = (midnight + dt.timedelta(minutes=10)).astimezone(dt.timezone.utc)
    assert now.minute != 10        # the zone's day starts inside a UTC hour
    with engine.begin() as conn:
        record_logins(conn, [
            record(b"today@example.com", at=midnight + dt.timedelta(minutes=5)),
            record(b"yesterday@example.com", at=midnight - dt.timedelta(minutes=5)),
            record(b"week@example.com", at=midnight - dt.timedelta(days=7, minutes=-1))])
    today, yesterday = midnight.date(), midnight.date() - dt.timedelta(days=1)
    with engine.connect() as conn:
        for rows in (reports.daily(conn, 30, now, tz), DailyCounts().rows(conn, now, tz)):
            assert [(r["day"], r["allowed"]) for r in rows] == [
                (today - dt.timedelta(days=7), 1), (yesterday, 1), (today, 1)]


def test_quarter_hour_buckets_and_a_zone_that_moves_by_half_an_hour(engine):
    """The buckets are quarter hours (not minutes), and a window that crosses
    Lord Howe's half-hour daylight saving counts by quarter hour too."""
    at = dt.datetime(2026, 11, 26, 10, 7, tzinfo=dt.timezone.utc)
    with engine.begin() as conn:
        record_logins(conn, [record(b"a@example.com", at=at + dt.timedelta(minutes=m))
                             for m in (0, 7, 8, 30)])
    with engine.connect() as conn:
        rows = reports.hourly(conn, at - HOUR, minutes=15)
    assert sorted((r["hour"].minute, r["n"]) for r in rows) == [(0, 2), (15, 1), (30, 1)]
    howe = zoneinfo.ZoneInfo("Australia/Lord_Howe")         # +11 in summer, +10:30 in winter
    assert reports.bucket_minutes(howe, at - dt.timedelta(days=29), at) == 60
    assert reports.bucket_minutes(howe, at - dt.timedelta(days=364), at) == 15
    assert reports.bucket_minutes(zoneinfo.ZoneInfo("Asia/Kolkata"), at, at) == 15
    assert reports.bucket_minutes(dt.timezone.utc, at - dt.timedelta(days=364), at) == 60
