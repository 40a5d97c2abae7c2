"""`lastlogin web`, a real server on 127.0.0.1, over HTTP and in headless Chromium.

One PostgreSQL database with known logins (and hostile usernames) is shared
by the module; two servers read it: one asking for a token, one without
(loopback, for the crawl and the browser). One test runs on SQLite.
"""

from __future__ import annotations

import datetime as dt
import html
import http.client
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
from html.parser import HTMLParser

import markupsafe
import pytest

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.rules import add_rule
from app.db.store import record_logins
from app.cli.output import safe_text
from app.login import text_form
from app.web import auth
from tests.builders import HOSTILE_USERNAMES, record
from tests.harness.cli import lastlogin, spawn
from tests.harness.pg import free_port

TOKEN = "t0ken-for-the-tests-" + "x" * 12
NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
DAY = dt.timedelta(days=1)
HOSTILE = [*HOSTILE_USERNAMES, b"<script>alert(1)</script>", b"\"dq\" 'sq' <b>&amp;",
           "bidi\u202eflipped@example.com".encode(),
           b"esc\x1b[31mred\x07bell", b"a+b&c=d%2F/..?#frag@example.com"]
ALICE_IMAP = 10
PAGES = ["/", "/user?name=alice%40example.com", "/inactive", "/inactive?days=30", "/rules",
         "/search?q=alice"]
TWINS = ["/api/overview", "/api/user?name=alice%40example.com", "/api/inactive",
         "/api/inactive?days=30", "/api/rules", "/api/search?q=alice"]


def fill(url: str) -> dict:
    """The known logins; returns what the tests expect."""
    engine = make_engine(url)
    with engine.begin() as conn:
        carol = add_rule(conn, action="deny", username="carol@example.org",
                         message="locked <b>&amp; \"out\"")
        add_rule(conn, action="allow", domain="example.com", remote_network="10.0.0.0/8",
                 valid_until=NOW + 2 * DAY, priority=50)
        add_rule(conn, action="deny", protocol="pop3", valid_until=NOW - DAY,
                 now=NOW - 3 * DAY, comment="maintenance, over")
        # alice logs in from DE, then (the newest login) from FR: a new location
        recs = [record(b"alice@example.com", at=NOW - i * DAY, remote_ip=f"198.51.100.{i}",
                       country="FR" if i == 0 else "DE", asn=3320)
                for i in range(ALICE_IMAP)]
        # a failed password from an address that was then blocked automatically
        recs.append(record(b"mallory@example.com", at=NOW - 2 * dt.timedelta(hours=1),
                           remote_ip="203.0.113.66", outcome="failed", session_id="s1"))
        block = add_rule(conn, action="deny", remote_network="203.0.113.66/32",
                         valid_until=NOW + 100 * DAY, priority=50, created_by="auto",
                         comment="5 failures in 10min")
        recs.append(record(b"alice@example.com", protocol="pop3", at=NOW - 2 * DAY,
                           remote_ip="2001:db8::1"))
        recs.append(record(b"bob@example.com", at=NOW - 200 * DAY, remote_ip="192.0.2.9"))
        recs.append(record(b"carol@example.org", at=NOW - dt.timedelta(hours=1),
                           remote_ip="203.0.113.5", outcome="denied", rule_id=carol,
                           message="locked <b>&amp; \"out\""))
        recs += [record(name, at=NOW - dt.timedelta(minutes=10 + i), remote_ip="192.0.2.77")
                 for i, name in enumerate(HOSTILE)]
        record_logins(conn, recs)
    engine.dispose()
    return {"carol_rule": carol, "block": block, "recent": ALICE_IMAP + 1 + 1 + 1 + 1 + len(HOSTILE),
            "allowed_30d": ALICE_IMAP + 1 + len(HOSTILE), "denied_30d": 1}


class Server:
    """`lastlogin web --utc` as a process of its own, stopped by its pid."""

    def __init__(self, url: str, tmp, token: str = "") -> None:
        self.port = free_port()
        env = {"LASTLOGIN_DATABASE_URL": url, "LASTLOGIN_SOCKET_DIR": str(tmp / "run"),
               "LASTLOGIN_DATA_DIR": str(tmp / "data"),
               "LASTLOGIN_WEB_LISTEN": f"127.0.0.1:{self.port}"}
        if token:
            env["LASTLOGIN_WEB_TOKEN"] = token
        self.proc = spawn("web", "--utc", env=env)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"lastlogin web exited: {self.proc.stderr.read()}", pytrace=False)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "lastlogin web did not start"
                time.sleep(0.05)

    def request(self, path: str, method: str = "GET", headers: dict | None = None,
                body: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def get(self, path: str, token: str | None = TOKEN, **headers):
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.request(path, headers=headers)

    def json(self, path: str, token: str | None = TOKEN):
        status, headers, body = self.get(path, token)
        assert status == 200 and headers["content-type"] == "application/json", (path, body)
        return json.loads(body)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def known_db(pg_cluster):
    url = pg_cluster.create_database()
    upgrade(url)
    return url, fill(url)


@pytest.fixture(scope="module")
def web(known_db, tmp_path_factory):
    server = Server(known_db[0], tmp_path_factory.mktemp("web"), TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def open_web(known_db, tmp_path_factory):
    server = Server(known_db[0], tmp_path_factory.mktemp("openweb"))
    yield server
    server.stop()


class Links(HTMLParser):
    """Every href on a page, and the elements the tests count."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.user_hrefs: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in ("a", "link") and a.get("href"):
            self.hrefs.append(a["href"])
            if "user" in (a.get("class") or "").split():
                self.user_hrefs.append(a["href"])

    handle_startendtag = handle_starttag


def parsed(body: bytes) -> Links:
    p = Links()
    p.feed(body.decode("utf-8"))
    return p


# --- access ------------------------------------------------------------------------

def test_without_the_token_pages_redirect_to_the_form_and_the_api_says_401(web):
    for path in PAGES:
        status, headers, _ = web.get(path, token=None)
        assert status == 303, path
        assert headers["location"] == "/login?next=" + urllib.parse.quote(path, safe="")
    for path in TWINS:
        status, headers, body = web.get(path, token=None)
        assert (status, headers["www-authenticate"]) == (401, 'Bearer realm="lastlogin"')
        assert "token" in json.loads(body)["error"]
        assert web.get(path, token="t0ken-for-the-tests-" + "y" * 12)[0] == 401
        assert web.get(path, token=TOKEN[:-1])[0] == 401
        assert web.get(path)[0] == 200
    # the form and the style sheet are open; nothing else is
    assert web.get("/login", token=None)[0] == 200
    assert web.get("/static/style.css", token=None)[0] == 200


def test_the_login_form_sets_a_strict_httponly_cookie_that_is_not_the_token(web):
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = web.request("/login", "POST", form,
                                  b"token=wrong-token-wrong-token&next=%2Frules")
    assert status == 401 and b"wrong token" in body
    status, headers, _ = web.request("/login", "POST", form,
                                     urllib.parse.urlencode({"token": TOKEN,
                                                             "next": "/rules"}).encode())
    assert (status, headers["location"]) == (303, "/rules")
    cookie = headers["set-cookie"]
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
    value = cookie.split(";")[0].split("=", 1)[1]
    assert TOKEN not in cookie and auth.session_ok(value, TOKEN)
    assert web.get("/rules", token=None, Cookie=f"{auth.COOKIE}={value}")[0] == 200
    assert web.get("/api/rules", token=None, Cookie=f"{auth.COOKIE}={value}")[0] == 200
    # a cookie signed with another token, tampered, or expired opens nothing
    expired = auth.session_value(TOKEN, now=time.time() - auth.SESSION_SECONDS - 1)
    for bad in (auth.session_value("another-token-of-32-characters!!"), value[:-1] + ("1" if value.endswith("0") else "0"),
                "9999999999." + value.split(".")[1], expired, TOKEN, ""):
        assert web.get("/rules", token=None, Cookie=f"{auth.COOKIE}={bad}")[0] == 303, bad
    # after the form, only paths on this site
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        status, headers, _ = web.request("/login", "POST", form, urllib.parse.urlencode(
            {"token": TOKEN, "next": evil}).encode())
        assert (status, headers["location"]) == (303, "/"), evil


def test_read_only_and_the_security_headers_on_every_answer(web):
    for path in PAGES + TWINS + ["/login", "/static/style.css", "/nowhere"]:
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"):
            if path == "/login" and method == "POST":
                continue
            status, headers, body = web.request(path, method,
                                                {"Authorization": f"Bearer {TOKEN}"})
            if path == "/nowhere":
                assert status == 404
            elif method in ("GET", "HEAD"):
                assert status == 200, (path, method)
                assert (body == b"") == (method == "HEAD")
            else:
                assert status == 405, (path, method)
            csp = headers["content-security-policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp
            assert headers["x-frame-options"] == "DENY"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"


def test_a_public_address_without_a_token_is_refused_at_start(tmp_path, known_db):
    env = {"LASTLOGIN_DATABASE_URL": known_db[0], "LASTLOGIN_WEB_LISTEN": "0.0.0.0:8470"}
    out = lastlogin("web", env=env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "web_token" in out.stderr, out.stderr
    out = lastlogin("web", env={**env, "LASTLOGIN_WEB_TOKEN": "short"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "short" not in out.stderr and "(web_token)" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = lastlogin("web", env={**env, "LASTLOGIN_WEB_LISTEN": f"127.0.0.1:{port}"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


# --- what the pages say ------------------------------------------------------------

def test_every_page_and_its_json_twin_answer_with_the_known_numbers(web, known_db):
    expect = known_db[1]
    for path in PAGES:
        status, headers, body = web.get(path)
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8", path
        twin = "/api" + (path if path != "/" else "/overview")
        assert f'href="{html.escape(twin)}"'.encode() in body, path     # says where its twin is
    ov = web.json("/api/overview")
    assert [s for s in ov] == ["daily", "recent", "refused", "failed", "blocks", "new_locations",
                               "health", "sections"]
    assert [(r["remote_ip"], r["failures"], r["users"]) for r in ov["failed"]["rows"]] == [
        ("203.0.113.66", 1, 1)]
    assert [(r["id"], r["remote_network"]) for r in ov["blocks"]["rows"]] == [
        (expect["block"], "203.0.113.66/32")]
    assert [(r["username"], r["country"]) for r in ov["new_locations"]["rows"]] == [
        ("alice@example.com", "FR")]
    rows = ov["daily"]["rows"]
    assert sum(r["allowed"] for r in rows) == expect["allowed_30d"]
    assert sum(r["denied"] for r in rows) == expect["denied_30d"]
    assert {r["protocol"] for r in rows} == {"imap", "pop3"}
    assert ov["daily"]["days"] == 30
    assert ov["daily"]["start_day"] == (NOW.date() - 29 * DAY).isoformat()
    assert len(ov["recent"]) == expect["recent"]
    assert ov["recent"][0]["username"] == "alice@example.com"          # newest first
    carol = ov["recent"][1 + len(HOSTILE)]
    assert (carol["username"], carol["outcome"]) == ("carol@example.org", "denied")
    assert [r["username"] for r in ov["refused"]["rows"]] == ["carol@example.org"]
    assert ov["refused"]["rows"][0]["message"] == "locked <b>&amp; \"out\""
    assert ov["health"]["status"] == "critical"        # no daemon runs: as `status` says
    assert {c["check"] for c in ov["health"]["checks"]} >= {"daemon", "database", "spool"}
    assert [c["detail"] for c in ov["health"]["checks"] if c["check"] == "database"] == [
        "reachable, schema at head"]

    alice = web.json("/api/user?name=alice%40example.com")
    assert alice["username"] == "alice@example.com" and alice["found"]
    assert len(alice["history"]) == ALICE_IMAP + 1
    assert [(r["protocol"], r["last_remote_ip"]) for r in alice["last_by_protocol"]] == [
        ("imap", "198.51.100.0"), ("pop3", "2001:db8::1")]
    assert len(alice["ips"]) == ALICE_IMAP + 1
    # the rules that concern her: the domain rule (carol's does not; the expired
    # pop3 one is no longer loaded; mallory's address block is not hers)
    assert [(r["action"], r["state"]) for r in alice["rules"]] == [("allow", "on")]
    mallory = web.json("/api/user?name=mallory%40example.com")
    assert [(r["remote_network"], r["state"]) for r in mallory["rules"]] == [
        ("10.0.0.0/8", "on"), ("203.0.113.66/32", "on")]        # her domain's, her address's
    assert mallory["rules"][1]["id"] == expect["block"]
    assert alice["check"] == {"ip": "198.51.100.0", "local_ip": "192.0.2.25",
                              "protocol": "imap", "decision": "allow",
                              "rule": None, "reason": "no rule matched", "message": None,
                              "fields": [], "alerts": []}
    inside = web.json("/api/user?name=alice%40example.com&ip=10.1.2.3&protocol=pop3")
    assert (inside["check"]["decision"], inside["check"]["protocol"]) == ("allow", "pop3")
    assert inside["check"]["rule"] == alice["rules"][0]["id"]
    carol = web.json("/api/user?name=carol%40example.org")
    assert carol["check"]["decision"] == "deny"
    assert carol["check"]["rule"] == expect["carol_rule"]
    assert carol["check"]["message"] == "locked <b>&amp; \"out\""
    assert carol["last_by_protocol"] == [] and len(carol["history"]) == 1
    status, _, body = web.get("/api/user?name=nobody%40example.com")
    assert status == 404 and json.loads(body)["found"] is False
    assert web.get("/api/user")[0] == 400
    assert web.get("/api/user?name=a&protocol=smtp")[0] == 400
    assert web.get("/api/user?name=a&ip=10.0.0.256")[0] == 400

    assert [r["username"] for r in web.json("/api/inactive?days=30")["rows"]] == [
        "bob@example.com"]
    assert web.json("/api/inactive")["days"] == 90
    for bad in ("0", "x", "-1", "99999999"):
        status, _, body = web.get(f"/api/inactive?days={bad}")
        assert status == 400 and "days" in json.loads(body)["error"]
    rules = web.json("/api/rules")["rows"]
    assert [r["state"] for r in rules] == ["on", "on", "on", "expired"]
    assert rules[0]["priority"] == 50
    assert [r["username"] for r in web.json("/api/search?q=ALICE")["rows"]] == [
        "alice@example.com"]
    # LIKE's wildcards are searched for, not obeyed
    assert {r["username"] for r in web.json("/api/search?q=%25")["rows"]} == {
        "%s%n%x{}", "a+b&c=d%2F/..?#frag@example.com"}


def stored_names() -> list[str]:
    from app.login import username_text
    return [username_text(n)[0] for n in HOSTILE]


def test_hostile_usernames_are_escaped_and_their_links_come_back_exact(open_web):
    status, _, body = open_web.get("/", token=None)
    page = body.decode("utf-8")
    assert status == 200
    assert "<script" not in page and "\x1b" not in page and "\x07" not in page
    assert "\u202e" not in page
    for name in stored_names():
        # shown with control characters made visible, then HTML-escaped
        assert str(markupsafe.escape(safe_text(name))) in page, name[:40]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "esc\\x1b[31mred\\x07bell" in page and "bidi\\u202eflipped" in page
    assert text_form(b"latin1-\xe9\xff@example.com")[0] == "latin1-\\xe9\\xff@example.com"
    # every link to a user's page gives back exactly that user
    links = parsed(body).user_hrefs
    came_back = set()
    for href in links:
        assert href.startswith("/user?name=")
        status, _, api = open_web.get(href.replace("/user", "/api/user", 1), token=None)
        assert status == 200, href
        came_back.add(json.loads(api)["username"])
        status, _, user_page = open_web.get(href, token=None)
        assert status == 200 and b"<script" not in user_page
    assert came_back == set(stored_names()) | {"alice@example.com", "bob@example.com",
                                               "carol@example.org", "mallory@example.com"}


def test_every_link_on_every_page_resolves(open_web):
    """Crawl from the overview: every href on this site answers 200."""
    todo, seen = ["/", "/inactive?days=1", "/search?q=example"], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        status, _, body = open_web.get(path, token=None)
        assert status == 200, path
        if path.startswith(("/api/", "/static/")):
            continue
        for href in parsed(body).hrefs:
            target = urllib.parse.urljoin(path, href)
            if target.startswith("data:"):
                continue
            assert target.startswith("/") and not target.startswith("//"), href
            todo.append(target.split("#")[0])
    assert len(seen) > 30        # the pages, their twins, every user, the style sheet


def test_sqlite(sqlite_db, tmp_path):
    expect = fill(sqlite_db)
    server = Server(sqlite_db, tmp_path, TOKEN)
    try:
        ov = server.json("/api/overview")
        assert sum(r["allowed"] for r in ov["daily"]["rows"]) == expect["allowed_30d"]
        assert len(ov["recent"]) == expect["recent"]
        assert len(server.json("/api/user?name=alice%40example.com")["history"]) == \
            ALICE_IMAP + 1
        assert server.json("/api/search?q=alice")["rows"][0]["username"] == "alice@example.com"
        assert server.get("/")[0] == 200 and server.get("/", token=None)[0] == 303
    finally:
        server.stop()


# --- in a real browser -------------------------------------------------------------

def chromium(*args: str, tmp_path) -> str:
    binary = shutil.which("chromium")
    assert binary, "Debian's chromium is needed (scripts/test installs it)"
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    out = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--window-size=1280,1600", *args],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_chromium_renders_the_overview_and_a_user_page(open_web, known_db, tmp_path):
    base = f"http://127.0.0.1:{open_web.port}"
    ov = open_web.json("/api/overview", token=None)
    dom = parsed(chromium("--dump-dom", base + "/", tmp_path=tmp_path).encode())
    tags = dom.tags
    svg = [a for t, a in tags if t == "svg"]
    assert [a.get("id") for a in svg] == ["daily-chart"]
    bars = [a for t, a in tags if t == "rect" and "bar" in a.get("class", "").split()]
    assert len(bars) == len(ov["daily"]["rows"])             # one per day and protocol
    assert {a["class"] for a in bars} == {"bar p-imap", "bar p-pop3"}
    rows = [t for t in tags if t[0] == "tr"]
    # the tables: recent logins, refused, failed, blocks, new places, health, the
    # daily numbers, and their heads
    assert len(rows) == (len(ov["recent"]) + len(ov["refused"]["rows"])
                         + len(ov["failed"]["rows"]) + len(ov["blocks"]["rows"])
                         + len(ov["new_locations"]["rows"])
                         + len(ov["health"]["checks"]) + len(ov["daily"]["rows"]) + 7)
    assert len(ov["failed"]["rows"]) == len(ov["blocks"]["rows"]) == 1
    assert not [t for t in tags if t[0] == "script"]
    shot = tmp_path / "overview.png"
    chromium(f"--screenshot={shot}", base + "/", tmp_path=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    user = base + "/user?name=" + urllib.parse.quote("alice@example.com", safe="")
    dom = parsed(chromium("--dump-dom", user, tmp_path=tmp_path).encode())
    history_rows = [a for t, a in dom.tags if t == "tr"]
    alice = open_web.json("/api/user?name=alice%40example.com", token=None)
    # history, addresses, last per protocol, the one rule; a head row each
    assert len(history_rows) == (len(alice["history"]) + len(alice["ips"])
                                 + len(alice["last_by_protocol"]) + len(alice["rules"]) + 4)
    shot = tmp_path / "user.png"
    chromium(f"--screenshot={shot}", user, tmp_path=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
