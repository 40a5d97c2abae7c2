"""GeoIP: country and ASN stored, new locations flagged and notified, rules by
place, the new-locations report -- through a real daemon on real PostgreSQL,
with small MaxMind-format databases built here (tests/harness/geoipdb.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import sys

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.schema import last_logins, login_events
from app.geoip import GeoIP, GeoIPError, Place
from tests.builders import request_bytes
from tests.harness import geoipdb
from tests.harness.cli import lastlogin
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.db import empty_tables
from tests.harness.postlogin import send_request

NOTIFY_SCRIPT = """#!{python}
import os, sys, uuid
data = sys.stdin.buffer.read()
path = os.path.join({out!r}, uuid.uuid4().hex + ".json")
with open(path + ".tmp", "wb") as fh:
    fh.write(data)
os.rename(path + ".tmp", path)
"""


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    return geoipdb.build(str(tmp_path_factory.mktemp("geoip")))


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    """(notify program, directory where it leaves what it read)."""
    base = tmp_path_factory.mktemp("notify")
    out = base / "out"
    out.mkdir()
    script = base / "notify.py"
    script.write_text(NOTIFY_SCRIPT.format(python=sys.executable, out=str(out)))
    script.chmod(stat.S_IRWXU)
    return str(script), out


@pytest.fixture(scope="module")
def daemon(pg_url, dbs, notes):
    d = make_daemon(pg_url, geoip_country_db=dbs[0], geoip_asn_db=dbs[1],
                    notify_command=notes[0], notify_timeout="5")
    d.start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def eng(pg_url, daemon, notes):
    engine = make_engine(pg_url)
    empty_tables(engine)
    for f in notes[1].iterdir():
        f.unlink()
    daemon.wait_config(engine)
    yield engine
    engine.dispose()


def env_of(pg_url, dbs=None) -> dict[str, str]:
    env = {"LASTLOGIN_DATABASE_URL": pg_url}
    if dbs:
        env.update(LASTLOGIN_GEOIP_COUNTRY_DB=dbs[0], LASTLOGIN_GEOIP_ASN_DB=dbs[1])
    return env


def login(daemon, user: bytes, ip: str):
    ex = send_request(daemon.sock("imap"), request_bytes(user, remote_ip=ip.encode()))
    ex.client.close()
    return ex


def events(engine, user: str):
    e = login_events
    with engine.connect() as conn:
        return conn.execute(sa.select(e.c.remote_ip, e.c.country, e.c.asn, e.c.new_location,
                                      e.c.outcome).where(e.c.username == user)
                            .order_by(e.c.occurred_at)).all()


def notified(out) -> list[dict]:
    return [json.loads(f.read_bytes()) for f in sorted(out.glob("*.json"))]


# --- the lookup itself -----------------------------------------------------------

def test_lookup_v4_v6_and_unknown(dbs):
    g = GeoIP(*dbs)
    assert g.lookup(geoipdb.DE) == Place("DE", 3320)
    assert g.lookup(geoipdb.JP6) == Place("JP", 2516)
    assert g.lookup(geoipdb.ASN_ONLY) == Place(None, 64500)
    assert g.lookup(geoipdb.UNKNOWN) == Place(None, None)
    assert g.lookup("10.1.2.3") == Place(None, None)
    assert g.lookup(None) == Place(None, None)


def test_a_missing_or_foreign_file_is_one_line(tmp_path, dbs):
    with pytest.raises(GeoIPError) as exc:
        GeoIP(str(tmp_path / "nope.mmdb"))
    assert str(exc.value) == f"geoip_country_db: no such file: {tmp_path / 'nope.mmdb'}"
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a database" * 10)
    with pytest.raises(GeoIPError) as exc:
        GeoIP("", str(junk))
    assert str(exc.value).startswith(f"geoip_asn_db: {junk} is not a MaxMind database")


def test_serve_refuses_to_start_with_a_missing_database(pg_url, tmp_path):
    out = lastlogin("serve", env={"LASTLOGIN_DATABASE_URL": pg_url,
                                  "LASTLOGIN_SOCKET_DIR": str(tmp_path),
                                  "LASTLOGIN_GEOIP_COUNTRY_DB": str(tmp_path / "gone.mmdb")})
    assert out.returncode == 2
    assert out.stderr == (f"lastlogin: no such file: {tmp_path / 'gone.mmdb'} "
                          "(geoip_country_db)\n")


def test_a_replaced_file_is_reopened(tmp_path, dbs, monkeypatch):
    import shutil
    import app.geoip as geoip
    path = tmp_path / "c.mmdb"
    shutil.copy(dbs[1], path)               # the ASN database where countries are expected
    g = GeoIP(str(path))
    assert g.lookup(geoipdb.DE).country is None
    shutil.copy(dbs[0], tmp_path / "new.mmdb")
    os.rename(tmp_path / "new.mmdb", path)  # as geoipupdate replaces it
    monkeypatch.setattr(geoip, "CHECK_EVERY", 0.0)
    assert g.lookup(geoipdb.DE).country == "DE"


# --- through the daemon --------------------------------------------------------------

def test_country_and_asn_stored_for_v4_and_v6(daemon, eng):
    assert not login(daemon, b"alice@example.org", geoipdb.DE).refused
    assert not login(daemon, b"bob@example.org", geoipdb.JP6).refused
    assert not login(daemon, b"carol@example.org", geoipdb.UNKNOWN).refused
    assert events(eng, "alice@example.org") == [(geoipdb.DE, "DE", 3320, False, "allowed")]
    assert events(eng, "bob@example.org") == [(geoipdb.JP6, "JP", 2516, False, "allowed")]
    assert events(eng, "carol@example.org") == [(geoipdb.UNKNOWN, None, None, False,
                                                 "allowed")]
    with eng.connect() as conn:
        assert conn.execute(sa.select(last_logins.c.last_country).where(
            last_logins.c.username == "bob@example.org")).scalar_one() == "JP"


def test_new_location_flagged_and_notified_exactly_once(daemon, eng, notes):
    user = b"dave@example.org"
    for ip in (geoipdb.DE, geoipdb.DE6, geoipdb.AT, geoipdb.AT, geoipdb.ASN_ONLY,
               geoipdb.ASN_ONLY):
        assert not login(daemon, user, ip).refused
    flags = [(r.country, r.asn, r.new_location) for r in events(eng, "dave@example.org")]
    assert flags == [("DE", 3320, False),       # the first login ever: not new
                     ("DE", 3320, False),       # a known country (over IPv6)
                     ("AT", 8447, True),        # new
                     ("AT", 8447, False),
                     (None, 64500, True),       # no country: a new ASN
                     (None, 64500, False)]
    assert wait_for(lambda: len(notified(notes[1])) >= 2, timeout=10)
    got = sorted(notified(notes[1]), key=lambda d: d["occurred_at"])
    assert len(got) == 2
    first = got[0]
    assert {k: first[k] for k in ("event", "username", "protocol", "remote_ip", "country",
                                  "asn", "previous_countries")} == {
        "event": "new_location", "username": "dave@example.org", "protocol": "imap",
        "remote_ip": geoipdb.AT, "country": "AT", "asn": 8447, "previous_countries": ["DE"]}
    assert got[1]["country"] is None and got[1]["asn"] == 64500
    assert got[1]["previous_countries"] == ["AT", "DE"]
    assert "event=notified" in daemon.logs()


def test_no_notification_for_a_first_login_or_a_known_country(daemon, eng, notes):
    for ip in (geoipdb.FR, geoipdb.FR, geoipdb.UNKNOWN):
        assert not login(daemon, b"erin@example.org", ip).refused
    assert [r.new_location for r in events(eng, "erin@example.org")] == [False] * 3
    # a login that is new, after them, proves the notifier had its chance
    assert not login(daemon, b"erin@example.org", geoipdb.DE).refused
    assert wait_for(lambda: notified(notes[1]), timeout=10)
    assert [d["country"] for d in notified(notes[1])] == ["DE"]


def test_rules_by_place_enforced_and_shown_by_check(daemon, eng, pg_url, dbs):
    env = env_of(pg_url, dbs)
    assert lastlogin("rule", "add", "allow", "--domain", "example.net", "--country", "de,AT",
                     "--priority", "10", env=env).returncode == 0
    assert lastlogin("rule", "add", "deny", "--domain", "example.net", "--priority", "20",
                     "--message", "not from there", env=env).returncode == 0
    assert lastlogin("rule", "add", "deny", "--asn", "AS2516", "--priority", "5",
                     env=env).returncode == 0
    daemon.wait_config(eng)
    assert not login(daemon, b"frank@example.net", geoipdb.DE).refused
    assert not login(daemon, b"frank@example.net", geoipdb.AT).refused
    assert login(daemon, b"frank@example.net", geoipdb.FR).refused
    assert login(daemon, b"frank@example.net", geoipdb.UNKNOWN).refused     # place unknown
    assert login(daemon, b"grace@example.com", geoipdb.JP6).refused          # by ASN
    assert not login(daemon, b"grace@example.com", geoipdb.FR).refused
    assert [r.outcome for r in events(eng, "frank@example.net")] == [
        "allowed", "allowed", "denied", "denied"]
    out = lastlogin("check", "frank@example.net", geoipdb.FR, env=env)
    assert out.returncode == 1
    assert out.stdout.splitlines()[:3] == ["country:  FR", "asn:      3215", "decision: deny"]
    out = lastlogin("check", "frank@example.net", geoipdb.AT, env=env)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[:3] == ["country:  AT", "asn:      8447", "decision: allow"]
    assert lines[3].startswith("rule:     ") and lines[3].endswith(" (priority 10)")
    with eng.connect() as conn:
        stored = conn.execute(sa.text("SELECT countries, asns FROM access_rules "
                                      "ORDER BY id")).all()
    assert stored == [("AT,DE", None), (None, None), (None, "2516")]


def test_a_rule_written_in_sql_by_place_applies(daemon, eng):
    with eng.begin() as conn:
        conn.execute(sa.text("INSERT INTO access_rules (action, countries, message) "
                             "VALUES ('deny', 'JP', 'no')"))
        conn.execute(sa.text("INSERT INTO access_rules (action, asns) "
                             "VALUES ('deny', 'many')"))
    daemon.wait_config(eng)
    assert login(daemon, b"heidi@example.org", geoipdb.JP6).refused
    assert not login(daemon, b"heidi@example.org", geoipdb.DE).refused
    assert wait_for(lambda: "not an AS number: 'many'" in daemon.logs())


def test_a_rule_by_place_needs_a_database(pg_url, eng):
    out = lastlogin("rule", "add", "deny", "--country", "DE", env=env_of(pg_url))
    assert (out.returncode, out.stderr) == (
        2, "lastlogin: no GeoIP database is configured (geoip_country_db): the rule could "
           "never match (--country)\n")
    out = lastlogin("rule", "add", "deny", "--country", "DEU", env=env_of(pg_url, ("x", "y")))
    assert out.returncode == 2 and "not a two-letter country code: 'DEU'" in out.stderr


def test_report_new_locations(daemon, eng, pg_url):
    for ip in (geoipdb.DE, geoipdb.AT, geoipdb.FR):
        assert not login(daemon, b"ivan@example.org", ip).refused
    assert not login(daemon, b"judy@example.org", geoipdb.DE).refused
    env = env_of(pg_url)
    out = lastlogin("report", "new-locations", "--format", "json", "--utc", env=env)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["username"], r["country"], r["asn"]) for r in rows] == [
        ("ivan@example.org", "FR", 3215), ("ivan@example.org", "AT", 8447)]
    out = lastlogin("report", "new-locations", "--format", "csv", "--user", "judy@example.org",
                    env=env)
    assert out.returncode == 1 and out.stdout == (
        "occurred_at,username,protocol,remote_ip,country,asn,host\n")
    out = lastlogin("report", "new-locations", "--since", "1h", env=env)
    assert out.returncode == 0
    assert len(out.stdout.splitlines()) == 3 and " FR " in out.stdout


def test_status_reports_the_loaded_databases(daemon, eng, pg_url, dbs):
    env = {**env_of(pg_url, dbs), "LASTLOGIN_SOCKET_DIR": daemon.socket_dir}
    out = lastlogin("status", "--format", "json", env=env)
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["geoip"]["status"] == "ok"
    assert checks["geoip"]["detail"].startswith(f"loaded: geoip_country_db={dbs[0]} "
                                                "(GeoLite2-Country, built ")


def test_an_alert_shows_the_previous_login(daemon, eng, pg_url):
    env = env_of(pg_url)
    assert lastlogin("alert", "add", "Last login: %{last_login_time} from %{last_login_ip} "
                     "(%{last_login_country})", "--user", "kim@example.org",
                     env=env).returncode == 0
    daemon.wait_config(eng)
    ex = send_request(daemon.sock("imap"), request_bytes(b"kim@example.org",
                                                         remote_ip=geoipdb.DE.encode()))
    assert ex.client_saw() == b"* OK [ALERT] Last login: from ()\r\n"   # none yet
    with eng.connect() as conn:
        first = conn.execute(sa.select(login_events.c.occurred_at)).scalar_one()
    ex = send_request(daemon.sock("imap"), request_bytes(b"kim@example.org",
                                                         remote_ip=geoipdb.AT.encode()))
    when = first.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert ex.client_saw() == (f"* OK [ALERT] Last login: {when} from {geoipdb.DE} (DE)\r\n"
                               ).encode()
