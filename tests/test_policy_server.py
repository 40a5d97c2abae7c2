"""The Dovecot auth policy endpoint, over HTTP, against a real daemon on PostgreSQL.

One daemon for the module (policy_listen, an API key, blocks after 3
failures, 192.0.2.0/24 exempt); each test uses addresses and users of its
own, so their counters never meet.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import ipaddress
import json
import logging
import re
import socket

import pytest
import sqlalchemy as sa

from app import policyhttp
from app.attempts import parse_attempt
from app.authpolicy import AuthPolicy, PolicySteps
from app.config import Settings
from app.db import make_engine
from app.db.rules import add_rule, purge_expired_auto
from app.db.schema import access_rules, last_logins, login_events
from app.maintenance import Maintenance
from app.policy import DENY
from app.policyhttp import PolicyServer
from app.snapshot import ConfigCache, load_snapshot
from tests.harness.cli import lastlogin
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.db import empty_tables
from tests.harness.pg import free_port

KEY = "s3cret-'\"key"
HEADERS = {"X-API-Key": KEY, "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def served(pg_url):
    engine = make_engine(pg_url)
    empty_tables(engine)
    port = free_port()
    metrics_port = free_port()
    daemon = make_daemon(pg_url, protocols="imap", policy_listen=f"127.0.0.1:{port}",
                         metrics_listen=f"127.0.0.1:{metrics_port}",
                         policy_api_key=KEY, block_after_failures="3",
                         block_window="10min", block_for="1h",
                         block_exempt_networks="192.0.2.0/24", block_usernames="true")
    daemon.metrics_port = metrics_port
    daemon.start()
    try:
        yield daemon, port, engine
    finally:
        daemon.stop()
        empty_tables(engine)
        engine.dispose()


def post(conn: http.client.HTTPConnection, command: str, doc, headers=HEADERS):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    conn.request("POST", f"/?command={command}", body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def attempt(login, remote, success=None, **extra):
    doc = {"login": login, "pwhash": "0af", "remote": remote, "local": "127.0.0.1",
           "device_id": "", "protocol": "imap", "session_id": "sess-" + login, "tls": False}
    if success is not None:
        doc.update(success=success, policy_reject=False)
    doc.update(extra)
    return doc


def connect(port):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=5)


def test_checks_on_one_kept_alive_connection(served):
    _, port, _ = served
    conn = connect(port)
    got = [post(conn, "allow", attempt(f"u{i}@example.com", "198.51.100.1")) for i in range(3)]
    first = conn.sock
    assert got == [(200, {"status": 0, "msg": ""})] * 3
    assert post(conn, "allow", attempt("u3", "198.51.100.1")) == (200, {"status": 0, "msg": ""})
    assert conn.sock is first           # the same TCP connection all along
    conn.close()


def test_requests_without_the_key_are_refused_and_serving_goes_on(served):
    daemon, port, _ = served
    for headers in ({"Content-Type": "application/json"},
                    {"X-API-Key": "wrong", "Content-Type": "application/json"}):
        conn = connect(port)
        assert post(conn, "allow", attempt("nokey", "198.51.100.2"), headers) == (
            401, {"status": -1, "msg": "missing or wrong API key"})
        conn.close()
    conn = connect(port)
    bearer = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert post(conn, "allow", attempt("bearer", "198.51.100.2"), bearer)[1]["status"] == 0
    # Dovecot's documented form: auth_policy_server_api_header = Authorization: Basic <b64>
    for value in (f"Basic {KEY}", f"basic {KEY}", KEY):
        auth = {"Authorization": value, "Content-Type": "application/json"}
        assert post(conn, "allow", attempt("basic", "198.51.100.2"), auth)[1]["status"] == 0
    conn = connect(port)
    bad = {"Authorization": f"Basic {KEY}x", "Content-Type": "application/json"}
    assert post(conn, "allow", attempt("basic", "198.51.100.2"), bad)[0] == 401
    conn.close()
    conn = connect(port)
    assert wait_for(lambda: daemon.logs().count("http=401 reason=\"missing or wrong API key\"")
                    == 3, timeout=5), daemon.logs()[-2000:]
    assert KEY not in daemon.logs()


def test_oversized_malformed_and_unknown_requests(served):
    daemon, port, _ = served
    conn = connect(port)
    status, body = post(conn, "allow", b'{"login": "' + b"x" * 20000 + b'"}')
    assert (status, body["status"]) == (413, -1)
    conn.close()
    conn = connect(port)
    for bad, reason in ((b"{not json", "body: not JSON"),
                        (b'["a list"]', "body: must be a JSON object"),
                        (b'{"remote": "1.2.3.4"}', "login: missing"),
                        (b'{"login": 7}', "login: must be a string"),
                        (b"[" * 8000 + b"]" * 8000, "body: not JSON Dovecot sends"),
                        (b'{"login": "u", "n": ' + b"9" * 5000 + b"}", "body: not JSON")):
        status, body = post(conn, "allow", bad)
        assert status == 400 and body["status"] == -1 and body["msg"].startswith(reason), body
    # a report without success, an unknown command
    assert post(conn, "report", attempt("r", "198.51.100.3"))[0] == 400
    assert post(conn, "delete", attempt("r", "198.51.100.3"))[0] == 404
    # the same connection still answers (the bodies were read whole)
    assert post(conn, "allow", attempt("after", "198.51.100.3")) == (200, {"status": 0,
                                                                           "msg": ""})
    conn.close()
    # not HTTP at all
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01 hello\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400")
    logs = daemon.logs()
    assert "http=413" in logs and 'reason="body: not JSON' in logs
    assert "reason=\"not HTTP/1.1" in logs
    assert post(connect(port), "allow", attempt("still", "198.51.100.3"))[1]["status"] == 0


def rows(engine, **where):
    t = login_events
    q = sa.select(t).where(*[t.c[k] == v for k, v in where.items()]).order_by(t.c.occurred_at)
    with engine.connect() as c:
        return c.execute(q).mappings().all()


def test_failures_become_failed_rows_and_successes_do_not(served):
    _, port, engine = served
    conn = connect(port)
    name = "Bob\t'; DROP TABLE x;--\\\u00e9"
    assert post(conn, "report", attempt(name, "::ffff:198.51.100.4", success=False)) == (
        200, {"status": 0, "msg": ""})
    assert post(conn, "report", attempt("carol", "198.51.100.4", success=True))[0] == 200
    assert post(conn, "report", attempt("dave", "198.51.100.4", success=False,
                                        fail_type="credentials", protocol="sieve"))[0] == 200
    assert wait_for(lambda: len(rows(engine, remote_ip="198.51.100.4")) == 2, timeout=5)
    got = rows(engine, remote_ip="198.51.100.4")
    assert [(r["username"], r["outcome"], r["protocol"], r["message"], r["session_id"])
            for r in got] == [
        (name, "failed", "imap", "authentication failed", "sess-" + name),
        ("dave", "failed", "managesieve", "authentication failed: credentials", "sess-dave")]
    assert str(got[0]["local_ip"]) == "127.0.0.1" and got[0]["host"]
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(last_logins)).scalar() == 0
        view = c.execute(sa.text("SELECT failed_logins, last_remote_ip FROM v_failed_logins "
                                 "WHERE username = 'dave'")).one()
    assert (view[0], str(view[1])) == (1, "198.51.100.4")


def auto_rules(engine):
    with engine.connect() as c:
        return c.execute(sa.select(access_rules).where(access_rules.c.created_by == "auto")
                         ).mappings().all()


def test_an_address_is_blocked_after_three_failures_until_its_rule_is_removed(served):
    daemon, port, engine = served
    conn = connect(port)
    ip = "203.0.113.9"
    for i in range(2):
        post(conn, "report", attempt(f"guess{i}", ip, success=False))
    assert post(conn, "allow", attempt("someone", ip))[1]["status"] == 0
    post(conn, "report", attempt("guess2", ip, success=False))
    # enforced at once, from memory, for any user from that address
    assert post(conn, "allow", attempt("someone", ip)) == (200, {"status": -1, "msg": ""})
    assert post(conn, "allow", attempt("someone", "203.0.113.10"))[1]["status"] == 0
    assert wait_for(lambda: len(auto_rules(engine)) == 1, timeout=5)
    rule = auto_rules(engine)[0]
    assert (rule["action"], str(rule["remote_network"]), rule["priority"]) == (
        "deny", "203.0.113.9/32", 50)
    assert rule["comment"] == ("3 failed authentications within 10min "
                               "(block_after_failures=3)")
    hours = (rule["valid_until"] - rule["created_at"]).total_seconds() / 3600
    assert 0.99 < hours < 1.01
    env = {"LASTLOGIN_DATABASE_URL": daemon.env["LASTLOGIN_DATABASE_URL"]}
    listed = json.loads(lastlogin("rule", "list", "--format", "json", env=env).stdout)
    assert [(r["id"], r["created_by"]) for r in listed if r["created_by"] == "auto"] == [
        (rule["id"], "auto")]
    daemon.wait_config(engine)
    assert post(conn, "allow", attempt("someone", ip))[1]["status"] == -1
    assert "event=auto_block remote_ip=203.0.113.9 failures=3 window=10min" in daemon.logs()
    removed = lastlogin("rule", "remove", str(rule["id"]), env=env)
    assert removed.returncode == 0, removed.stderr
    assert wait_for(lambda: post(conn, "allow", attempt("someone", ip))[1]["status"] == 0,
                    timeout=1.0, interval=0.02)


def test_a_user_is_blocked_after_three_failures_from_anywhere(served):
    _, port, engine = served
    conn = connect(port)
    for i in range(3):
        post(conn, "report", attempt("Victim@Example.com", f"203.0.113.{20 + i}",
                                     success=False))
    assert post(conn, "allow", attempt("victim@example.com", "203.0.113.99"))[1][
        "status"] == -1
    assert wait_for(lambda: any(r["username"] == "Victim@Example.com"
                                for r in auto_rules(engine)), timeout=5)


def test_an_exempt_network_is_never_blocked(served):
    _, port, engine = served
    conn = connect(port)
    before = len(auto_rules(engine))
    for i in range(6):
        post(conn, "report", attempt(f"webmail{i % 2}", "192.0.2.7", success=False))
    assert post(conn, "allow", attempt("webmail0", "192.0.2.7"))[1]["status"] == 0
    assert wait_for(lambda: len(rows(engine, remote_ip="192.0.2.7")) == 6,    # recorded all
                    timeout=5)                                                # the same
    assert len(auto_rules(engine)) == before


def test_network_rules_apply_before_authentication(served):
    daemon, port, engine = served
    env = {"LASTLOGIN_DATABASE_URL": daemon.env["LASTLOGIN_DATABASE_URL"]}
    added = lastlogin("rule", "add", "deny", "--network", "198.18.0.0/15",
                      "--message", "Not from there", env=env)
    assert added.returncode == 0, added.stderr
    daemon.wait_config(engine)
    conn = connect(port)
    assert post(conn, "allow", attempt("anyone", "198.19.1.1")) == (
        200, {"status": -1, "msg": "Not from there"})
    assert post(conn, "allow", attempt("anyone", "198.51.100.9"))[1]["status"] == 0
    assert re.search(r"event=policy_check user=anyone remote_ip=198\.19\.1\.1 service=imap "
                     r"status=-1 reason=\"?rule \d+", daemon.logs())


def test_report_failed_by_address_and_by_user(served):
    daemon, port, engine = served
    conn = connect(port)
    for login, ip in (("rf1", "100.64.0.1"), ("rf2", "100.64.0.1"), ("rf1", "100.64.0.2")):
        post(conn, "report", attempt(login, ip, success=False))
    assert wait_for(lambda: len(rows(engine, remote_ip="100.64.0.2")) == 1, timeout=5)
    env = {"LASTLOGIN_DATABASE_URL": daemon.env["LASTLOGIN_DATABASE_URL"]}
    out = lastlogin("report", "failed", "--since", "1h", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    by_ip = {r["remote_ip"]: r for r in json.loads(out.stdout)}
    assert (by_ip["100.64.0.1"]["failures"], by_ip["100.64.0.1"]["users"]) == (2, 2)
    assert (by_ip["100.64.0.2"]["failures"], by_ip["100.64.0.2"]["users"]) == (1, 1)
    assert by_ip["100.64.0.1"]["first_failure"] <= by_ip["100.64.0.1"]["last_failure"]
    out = lastlogin("report", "failed", "--by", "user", "--format", "json", env=env)
    by_user = {r["username"]: r for r in json.loads(out.stdout)}
    assert (by_user["rf1"]["failures"], by_user["rf1"]["addresses"]) == (2, 2)
    bad = lastlogin("report", "failed", "--by", "country", env=env)
    assert bad.returncode == 2 and "Invalid value for '--by'" in bad.stderr


def test_metrics_count_checks_rejections_failures_and_blocks(served):
    import urllib.request
    daemon, port, _ = served
    # what it counts, made here (the module's tests may run on other workers)
    conn, ip = connect(port), "198.51.100.78"
    assert post(conn, "allow", attempt("metrics", ip))[1]["status"] == 0
    for i in range(3):                                  # block_after_failures = 3
        post(conn, "report", attempt(f"metrics{i}", ip, success=False))
    assert post(conn, "allow", attempt("metrics", ip))[1]["status"] < 0
    conn.close()
    conn = connect(port)
    assert post(conn, "allow", attempt("metrics", ip), {"Content-Type": "application/json"}
                )[0] == 401
    conn.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics",
                                  timeout=5).read().decode()
    values = dict(re.findall(r"^(lastlogin_(?:policy|auto)\S*) (\S+)$", text, re.M))
    assert float(values['lastlogin_policy_checks_total{result="allowed"}']) >= 1
    assert float(values['lastlogin_policy_checks_total{result="rejected"}']) >= 1
    assert float(values["lastlogin_policy_failures_total"]) >= 3
    assert float(values["lastlogin_policy_requests_refused_total"]) >= 1
    assert float(values["lastlogin_auto_blocks_active"]) >= 1


# --- the decision in memory: AuthPolicy on its own (no HTTP, no daemon) ----------
# Attempts of service "smtp" have no stored protocol, so a report reaches no
# recorder: these tests exercise the counting and blocking alone.




def _doc(command, login, remote, **extra):
    doc = {"login": login, "remote": remote, "protocol": "smtp"} | extra
    return parse_attempt(command, json.dumps(doc).encode())


def _fail(policy, login, remote):
    asyncio.run(policy.report(_doc("report", login, remote, success=False)))


def _ok(policy, login, remote):
    asyncio.run(policy.report(_doc("report", login, remote, success=True)))


def _status(policy, login, remote):
    return policy.check(_doc("allow", login, remote)).status


def _policy(engine=None, cache=None, **steps):
    base = dict(block_after=3, exempt=(ipaddress.ip_network("192.0.2.0/24"),))
    return AuthPolicy(None, cache or ConfigCache(), engine, PolicySteps(**(base | steps)))


def test_username_blocks_are_off_by_default():
    policy = _policy()
    for i in range(5):          # an attacker, from many addresses, with the victim's name
        _fail(policy, "vic@example.com", f"203.0.113.{40 + i}")
    assert _status(policy, "vic@example.com", "198.51.100.200") == 0
    assert policy.active_auto_blocks() == 0


def test_automatic_blocks_never_apply_to_exempt_networks():
    policy = _policy(block_usernames=True)
    for i in range(3):
        _fail(policy, "vic@example.com", f"203.0.113.{40 + i}")
    assert _status(policy, "vic@example.com", "198.51.100.200") == -1   # blocked elsewhere
    assert _status(policy, "vic@example.com", "192.0.2.7") == 0         # webmail: never


def test_a_success_clears_the_users_failure_count():
    policy = _policy(block_usernames=True)
    for i in range(2):
        _fail(policy, "typo@example.com", f"198.51.100.{i + 1}")
    _ok(policy, "Typo@Example.com", "198.51.100.1")
    _fail(policy, "typo@example.com", "198.51.100.3")
    assert _status(policy, "typo@example.com", "198.51.100.4") == 0
    assert policy.active_auto_blocks() == 0


def test_post_login_does_not_apply_automatic_blocks_to_exempt_networks(pg_db):
    from app.protocol import LoginRequest
    from app.service import explain
    engine = make_engine(pg_db)
    now = dt.datetime.now(dt.timezone.utc)
    with engine.begin() as c:
        add_rule(c, action=DENY, priority=50, username="vic@example.com", created_by="auto",
                 valid_until=now + dt.timedelta(hours=1), now=now)
    with engine.connect() as c:
        snap = load_snapshot(c)
    engine.dispose()
    exempt = (ipaddress.ip_network("192.0.2.0/24"),)
    req = lambda ip: LoginRequest(b"127.0.0.1", ip.encode(), b"vic@example.com", [])  # noqa
    assert not explain(snap, "imap", req("198.51.100.1"), now, exempt=exempt).decision.allowed
    assert explain(snap, "imap", req("192.0.2.7"), now, exempt=exempt).decision.allowed


def test_automatic_blocks_are_looked_up_not_scanned_and_expired_ones_are_not_loaded(pg_db):
    engine = make_engine(pg_db)
    now = dt.datetime.now(dt.timezone.utc)
    with engine.begin() as c:
        for i in range(300):
            add_rule(c, action=DENY, priority=50, remote_network=f"10.{i // 250}.{i % 250}.1/32",
                     created_by="auto", valid_until=now + dt.timedelta(hours=1), now=now)
        hour = dt.timedelta(hours=1)         # a block that ended an hour ago
        add_rule(c, action=DENY, priority=50, remote_network="10.9.9.9/32", created_by="auto",
                 valid_from=now - 2 * hour, valid_until=now - hour, now=now - 2 * hour)
    later = now
    with engine.connect() as c:
        snap = load_snapshot(c, later)
    # not in the ordered list; in O(1) dicts; the expired one not at all
    assert snap.rules == () and len(snap.auto) == 300
    cache = ConfigCache()
    cache.snapshot = snap
    policy = _policy(cache=cache)
    assert _status(policy, "x", "10.0.7.1") == -1 and _status(policy, "x", "10.0.7.2") == 0
    Maintenance(engine, 0).run_once()           # the daily job deletes the expired block
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(access_rules)).scalar() == 300
        assert purge_expired_auto(c, later) == 0
    engine.dispose()


def test_held_blocks_are_bounded():
    from app import authpolicy
    policy = _policy(block_after=1)
    old, authpolicy.MAX_HELD = authpolicy.MAX_HELD, 5
    try:
        for i in range(8):
            _fail(policy, "g", f"203.0.113.{i + 1}")
    finally:
        authpolicy.MAX_HELD = old
    assert len(policy._held) == 5
    assert _status(policy, "g", "203.0.113.8") == -1


def test_without_rules_loaded_a_held_block_rejects_and_others_get_the_unloaded_decision():
    policy = _policy(default_action="deny", unloaded_action="allow")
    for i in range(3):
        _fail(policy, f"g{i}", "203.0.113.1")
    verdict = policy.check(_doc("allow", "legit", "198.51.100.1"))
    assert (verdict.status, verdict.reason) == (0, "no rules loaded yet")
    assert _status(policy, "legit", "203.0.113.1") == -1


def test_blocks_that_cannot_be_stored_are_logged_held_and_counted(pg_db, caplog):
    engine = make_engine(pg_db)
    policy = _policy(engine=engine, block_usernames=True)
    unhandled = []

    async def run():
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: unhandled.append(ctx))
        for name in ("tab\there", "\udc80lone", "nul\u0000x"):
            for i in range(3):
                await policy.report(_doc("report", name, f"198.51.100.{60 + i}",
                                         success=False))
        await policy.drain(10)

    with caplog.at_level(logging.ERROR, logger="lastlogin.policy"):
        asyncio.run(run())
    engine.dispose()
    assert unhandled == []
    assert caplog.text.count("event=auto_block_not_stored") == 3
    assert policy.unstored_auto_blocks() == 3
    assert _status(policy, "tab\there", "198.51.100.99") == -1


def test_ipv6_is_counted_and_blocked_by_its_64(pg_db):
    engine = make_engine(pg_db)
    policy = _policy(engine=engine)

    async def run():
        for i in range(3):
            await policy.report(_doc("report", f"g{i}", f"2001:db8:1:2::{i + 1:x}",
                                     success=False))
        await policy.drain(10)

    asyncio.run(run())
    with engine.connect() as c:
        nets = [str(r.remote_network) for r in c.execute(sa.select(access_rules))]
    engine.dispose()
    assert nets == ["2001:db8:1:2::/64"]
    assert _status(policy, "x", "2001:db8:1:2:ffff::9") == -1
    assert _status(policy, "x", "2001:db8:1:3::1") == 0


def test_username_counters_are_bounded_by_size():
    policy = _policy(block_usernames=True)
    for i in range(50):
        _fail(policy, f"{i}" + "x" * 16000, f"203.0.113.{i % 2}")
    keys = list(policy.by_user._hits)
    assert len(keys) == 50 and {len(k) for k in keys} == {16}
    assert policy.by_user.max_keys <= 20_000


# --- the HTTP endpoint in-process (no daemon): bounds on connections -------------


ALLOW_REQ = (b"POST /?command=allow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 43\r\n\r\n" + b'{"login": "u", "remote": "198.51.100.1"   }')


async def _endpoint(**settings):
    server = PolicyServer(Settings(policy_listen="127.0.0.1:0", **settings),
                          AuthPolicy(None, ConfigCache(), None))
    await server.start()
    return server, server._server.sockets[0].getsockname()[1]


async def _until_closed(reader, within: float) -> bytes | None:
    """All the server sends until it closes the connection (None: still open
    after ``within`` s)."""
    data = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(4096):
                data += chunk
        return data
    except ConnectionError:
        return data
    except TimeoutError:
        return None


async def _answer(reader) -> tuple[int, dict | None]:
    """One HTTP answer: its status and JSON body (None for a 1xx)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status < 200:
        return status, None
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
    return status, json.loads(await reader.readexactly(length))


def _req(body: bytes, command: str = "allow", extra: bytes = b"") -> bytes:
    return (f"POST /?command={command} HTTP/1.1\r\nHost: x\r\n".encode() + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


async def _closed(reader, within: float) -> bool:
    """Does the server close the connection (EOF or reset) within ``within`` s?"""
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def test_a_trickled_request_head_gets_408_at_request_timeout():
    async def run():
        server, port = await _endpoint(request_timeout=0.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /?command=allow HTTP/1.1\r\nHost: x\r\nX-Pad: ")

        async def trickle():
            for _ in range(100):                # a byte every 50 ms: no read waits 0.5 s
                await asyncio.sleep(0.05)
                writer.write(b"a")
        task = asyncio.create_task(trickle())
        got = await _until_closed(reader, 4.0)
        task.cancel()
        writer.close()
        server.close()
        await server.wait_closed(1)
        return got
    got = asyncio.run(run())
    assert got is not None, "one header byte at a time held the connection past its deadline"
    assert got.startswith(b"HTTP/1.1 408 ") and got.endswith(
        b'{"status": -1, "msg": "request not complete within request_timeout"}'), got


def test_idle_keep_alive_is_closed_and_full_server_evicts_the_oldest_idle(monkeypatch):
    monkeypatch.setattr(policyhttp, "IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(policyhttp, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(policyhttp, "MAX_PER_PEER", 100)

    async def run():
        server, port = await _endpoint(request_timeout=5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(ALLOW_REQ)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        idle_closed = await _closed(reader, 3.0)        # kept alive, then idle: closed
        writer.close()
        # three idle connections fill the server; a fourth evicts the oldest
        conns = []
        for _ in range(3):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.02)
        r4, w4 = await asyncio.open_connection("127.0.0.1", port)
        w4.write(ALLOW_REQ)
        answered = (await r4.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        oldest_cut = await _closed(conns[0][0], 0.2)
        newest_kept = not await _closed(conns[2][0], 0.05)
        for _, w in conns + [(r4, w4)]:
            w.close()
        server.close()
        await server.wait_closed(1)
        return idle_closed, answered, oldest_cut, newest_kept, server.evicted
    assert asyncio.run(run()) == (True, True, True, True, 1)


def test_one_peer_cannot_take_every_connection(monkeypatch):
    monkeypatch.setattr(policyhttp, "MAX_PER_PEER", 2)

    async def run():
        server, port = await _endpoint(request_timeout=5)
        first = await asyncio.open_connection("127.0.0.1", port)
        # a connection busy with a request is not evictable; an idle one is
        first[1].write(b"POST /?command=allow HTTP/1.1\r\n")
        await asyncio.sleep(0.05)
        second = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)
        third = await asyncio.open_connection("127.0.0.1", port)
        third[1].write(ALLOW_REQ)
        ok = (await third[0].readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        cut = await _closed(second[0], 0.5)
        busy_kept = not await _closed(first[0], 0.05)
        for _, w in (first, second, third):
            w.close()
        server.close()
        await server.wait_closed(1)
        return ok, cut, busy_kept
    assert asyncio.run(run()) == (True, True, True)


class _GatedRecorder:
    """A recorder that commits only when the test opens the gate (to see that the
    answer does not wait for it); counts the records handed to it."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.records = []

    async def record(self, rec, timeout):
        self.records.append(rec.event_id)
        await self.gate.wait()
        return "committed"


def test_a_report_is_answered_before_the_commit_and_drained_at_shutdown():
    async def run():
        recorder = _GatedRecorder()
        policy = AuthPolicy(recorder, ConfigCache(), None)
        doc = {"login": "slow", "remote": "198.51.100.5", "protocol": "imap",
               "success": False, "policy_reject": False}
        verdict = await asyncio.wait_for(
            policy.report(parse_attempt("report", json.dumps(doc).encode())), 1.0)
        pending = len(policy._tasks)
        asyncio.get_running_loop().call_later(0.05, recorder.gate.set)
        await policy.drain(5)
        return verdict.status, pending, len(recorder.records), len(policy._tasks)
    assert asyncio.run(run()) == (0, 1, 1, 0)


def test_closing_the_endpoint_leaves_no_task_behind():
    errors = []

    async def run():
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
        server, port = await _endpoint(request_timeout=5)
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        conns[0][1].write(ALLOW_REQ)
        await conns[0][0].readuntil(b"\r\n\r\n")
        conns[1][1].write(b"POST /?command=allow HTTP/1.1\r\n")   # mid-request
        await asyncio.sleep(0.05)
        server.close()
        await server.wait_closed(0.3)
        left = server.open_connections
        for _, w in conns:
            w.close()
        return left
    assert asyncio.run(run()) == 0 and errors == []


def _run(main, loop: str):
    if loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    return asyncio.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pipelined_requests_in_one_write_are_answered_in_order(loop):
    body = b'{"login": "u", "remote": "198.51.100.1"}'

    async def main():
        server, port = await _endpoint(request_timeout=5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_req(body) + _req(body, "nope") + _req(body))
        got = [await _answer(reader) for _ in range(3)]
        writer.write(_req(body))                        # and the connection goes on
        got.append(await _answer(reader))
        writer.close()
        server.close()
        await server.wait_closed(1)
        return got
    ok = (200, {"status": 0, "msg": ""})
    assert _run(main, loop) == [ok, (404, {"status": -1, "msg":
                                          "command 'nope' (allow or report)"}), ok, ok]


def test_smuggling_framing_is_refused_and_the_connection_closed():
    body = b'{"login": "u"}'
    bad = {b"Transfer-Encoding: chunked\r\n": 400,          # with Content-Length
           b"Content-Length: 14\r\n": 400,                  # twice
           b"X-Folded: a\r\n b\r\n": 400,                    # obs-fold
           b"X-Bare: lf\n": 400,
           b"X-Pad: " + b"p" * policyhttp.MAX_HEAD + b"\r\n": 431}

    async def main():
        server, port = await _endpoint(request_timeout=5)
        got = []
        for extra in bad:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_req(body, extra=extra) + _req(body))
            got.append(await _until_closed(reader, 5))
            writer.close()
        server.close()
        await server.wait_closed(1)
        return got
    for (extra, status), answer in zip(bad.items(), asyncio.run(main())):
        assert answer.startswith(b"HTTP/1.1 %d " % status), (extra[:30], answer)
        assert answer.count(b"Content-Type") == 1, answer    # the request behind: never read


def test_expect_100_continue_and_oversized_bodies_refused_from_their_length():
    body = b'{"login": "u", "remote": "198.51.100.1"}'
    expect = b"Expect: 100-continue\r\n"
    huge = b"Content-Length: %d\r\n" % (policyhttp.MAX_BODY + 1)

    async def main():
        server, port = await _endpoint(request_timeout=30, policy_api_key="k")
        key = b"X-API-Key: k\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_req(body, extra=key + expect)[:-len(body)])      # the head alone
        got = [await _answer(reader)]
        writer.write(body)                                              # 100: then the body
        got.append(await _answer(reader))
        # a refusal comes at once, instead of 100 Continue; the body is never awaited
        writer.write(_req(body, extra=expect)[:-len(body)])            # no API key
        got.append(await _until_closed(reader, 5))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_req(b"", extra=key + huge).replace(b"Content-Length: 0\r\n", b""))
        got.append(await _until_closed(reader, 5))
        server.close()
        await server.wait_closed(1)
        return got
    cont, ok, unkeyed, large = asyncio.run(main())
    assert (cont, ok) == ((100, None), (200, {"status": 0, "msg": ""}))
    assert unkeyed.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in unkeyed
    assert large.startswith(b"HTTP/1.1 413 ") and large.endswith(
        b'"msg": "body of 16385 bytes (at most 16384)"}')


def test_transfer_encoding_is_refused_and_a_request_is_bounded_from_its_first_byte(monkeypatch):
    # a chunked body whose trailer line never ends: httptools would buffer it
    # (quadratically) until request_timeout, on the daemon's only loop
    endless = (b"POST /?command=allow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"\r\n0\r\nX-Trailer: " + b"t" * (200 << 10))

    async def main():
        server, port = await _endpoint(request_timeout=30)
        got = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(endless)
            got.append(await _until_closed(reader, 5))
            writer.close()
            # and were the head let through: the bytes fed for the request stop it
            monkeypatch.setattr(PolicyServer, "head", lambda self, c: None)
        server.close()
        await server.wait_closed(1)
        return got
    refused, bounded = asyncio.run(main())
    assert refused.startswith(b"HTTP/1.1 411 ") and refused.endswith(
        b'"msg": "Transfer-Encoding not accepted (send Content-Length)"}'), refused
    assert bounded is not None and bounded.startswith(b"HTTP/1.1 413 ") and (
        b"request over %d bytes" % policyhttp.MAX_REQUEST) in bounded, bounded


def test_connections_without_the_key_cannot_push_out_dovecots(monkeypatch):
    from app.metrics import Metrics
    monkeypatch.setattr(policyhttp, "MAX_PER_PEER", 3)
    keyed = _req(b'{"login": "u", "remote": "198.51.100.1"}', extra=b"X-API-Key: k\r\n")

    async def main():
        server, port = await _endpoint(request_timeout=30, policy_api_key="k")
        server.policy.metrics = metrics = Metrics()

        async def conn(send: bytes = b""):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(send)
            await asyncio.sleep(0.05)
            return r, w
        a = await conn(keyed)
        got = [await _answer(a[0])]
        a[1].write(keyed[:1])                   # proven, and busy with its next request
        b, c = await conn(b"P"), await conn(b"P")   # one byte each: no key shown
        d = await conn(keyed)                   # evicts b (not c: the oldest unproven)
        got.append(await _answer(d[0]))
        e = await conn(keyed)                   # evicts c, not d (proven, idle)
        got.append(await _answer(e[0]))
        a[1].write(keyed[1:])
        got.append(await _answer(a[0]))
        cut = [await _closed(x[0], 0.5) for x in (b, c)]
        for x in (a, d, e):                     # all proven and busy: nothing to evict
            x[1].write(b"P")
        f = await conn()
        cut.append(await _closed(f[0], 0.5))
        for x in (a, b, c, d, e, f):
            x[1].close()
        server.close()
        await server.wait_closed(1)
        sample = metrics.registry.get_sample_value
        return got, cut, (sample("lastlogin_policy_connections_evicted_total"), sample(
            "lastlogin_policy_connections_refused_total", {"reason": "too_many_from_peer"}))
    got, cut, counted = asyncio.run(main())
    assert got == [(200, {"status": 0, "msg": ""})] * 4
    assert cut == [True, True, True] and counted == (2, 1)
    group = policyhttp.peer_group
    assert group("2001:db8:1:2::5") == group("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert group("2001:db8:1:3::5") != group("2001:db8:1:2::5")
    assert group("::ffff:192.0.2.1") == group("192.0.2.1") == "192.0.2.1"


def test_an_upgrade_gets_one_answer_and_is_counted_once():
    from app.metrics import Metrics
    body = b'{"login": "u", "remote": "198.51.100.1"}'
    upgrade = b"Connection: Upgrade\r\nUpgrade: h2c\r\n"

    async def main():
        server, port = await _endpoint(request_timeout=5)
        server.policy.metrics = metrics = Metrics()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_req(body, extra=upgrade) + _req(body))
        got = await _until_closed(reader, 5)
        server.close()
        await server.wait_closed(1)
        return got, metrics.registry.get_sample_value("lastlogin_policy_requests_refused_total")
    got, refused = asyncio.run(main())
    assert got.startswith(b"HTTP/1.1 400 ") and got.count(b"HTTP/1.1") == 1, got
    assert got.endswith(b'"msg": "Upgrade not supported"}') and refused == 1


def test_http10_is_closed_unless_it_asks_for_keep_alive():
    body = b'{"login": "u", "remote": "198.51.100.1"}'

    def req10(extra=b""):
        return _req(body, extra=extra).replace(b"HTTP/1.1", b"HTTP/1.0", 1)

    async def main():
        server, port = await _endpoint(request_timeout=5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req10())
        plain = await _until_closed(reader, 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req10(b"Connection: keep-alive\r\n"))
        kept = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", kept)[1]))
        writer.write(req10(b"Connection: keep-alive\r\n"))
        again = await _answer(reader)
        writer.close()
        server.close()
        await server.wait_closed(1)
        return plain, kept, again
    plain, kept, again = asyncio.run(main())
    assert plain.startswith(b"HTTP/1.1 200 ") and b"Connection: close\r\n" in plain, plain
    assert b"Connection: keep-alive\r\n" in kept and again == (200, {"status": 0, "msg": ""})


def test_an_internal_error_is_answered_500_and_its_lines_are_throttled(monkeypatch, caplog):
    def broken(command, body):
        raise RuntimeError("a bug")
    monkeypatch.setattr(policyhttp, "parse_attempt", broken)

    async def main():
        server, port = await _endpoint(request_timeout=5)
        got = []
        for _ in range(policyhttp.LOG_BURST + 3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(ALLOW_REQ)
            got.append((await _until_closed(reader, 5))[:12])
            writer.close()
        server.close()
        await server.wait_closed(1)
        return got
    with caplog.at_level(logging.WARNING, logger="lastlogin.policy"):
        got = asyncio.run(main())
    assert got == [b"HTTP/1.1 500"] * (policyhttp.LOG_BURST + 3)
    failed = [r for r in caplog.records if "event=policy_request_failed" in r.getMessage()]
    assert len(failed) == policyhttp.LOG_BURST
    assert "event=policy_refusals_not_logged request_failed count=3" in caplog.text


def test_the_sweep_goes_on_after_an_error(monkeypatch):
    monkeypatch.setattr(policyhttp, "SWEEP", 0.1)
    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
        server, port = await _endpoint(request_timeout=0.3)
        flush = server.throttle.flush

        def fails_once(now):
            server.throttle.flush = flush
            raise RuntimeError("a bug")
        server.throttle.flush = fails_once
        await asyncio.sleep(0.15)                # the first sweep has failed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        closed = await _closed(reader, 3)        # still closed at its deadline
        writer.close()
        server.close()
        await server.wait_closed(1)
        return closed
    assert asyncio.run(main()) is True and len(errors) == 1


def test_a_connection_closed_with_answers_unread_is_cut_within_the_grace(monkeypatch):
    """Evicted (or expired) with a small answer still buffered, a connection
    is closed gently -- but it no longer counts against MAX_CONNECTIONS, so a
    client that never reads cannot keep it open: it is cut after CLOSE_GRACE."""
    monkeypatch.setattr(policyhttp, "CLOSE_GRACE", 0.3)

    async def main():
        server, port = await _endpoint(request_timeout=30)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        try:
            await asyncio.sleep(0.05)
            me = next(iter(server._conns))
            me.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            while not 0 < me.transport.get_write_buffer_size() <= policyhttp.FEED:
                try:
                    s.send(ALLOW_REQ * 4)           # answers pile up, never read
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.01)
            sock = me.transport.get_extra_info("socket")
            server._cut(me)                         # what eviction does
            assert sock.fileno() != -1              # the answer may still go out...
            for _ in range(100):
                if sock.fileno() == -1:
                    break
                await asyncio.sleep(0.05)
            assert sock.fileno() == -1              # ...but not for ever
        finally:
            s.close()
            server.close()
            await server.wait_closed(1)

    asyncio.run(main())
