"""The user's own data: store_ip, `user export`, `user forget` -- through a real
daemon on real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.schema import login_events
from tests.builders import request_bytes
from tests.harness import geoipdb
from tests.harness.cli import lastlogin
from tests.harness.daemon import make_daemon
from tests.harness.db import empty_tables
from tests.harness.postlogin import send_request

FULL_V4, FULL_V6 = geoipdb.DE, geoipdb.JP6          # 192.0.2.77, 2001:db8:2:0:1::9


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    return geoipdb.build(str(tmp_path_factory.mktemp("geoip")))


@pytest.fixture(scope="module")
def daemon(pg_url, dbs):
    d = make_daemon(pg_url, geoip_country_db=dbs[0], geoip_asn_db=dbs[1],
                    store_ip="truncated")
    d.start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def eng(pg_url, daemon):
    engine = make_engine(pg_url)
    empty_tables(engine)
    daemon.wait_config(engine)
    yield engine
    engine.dispose()


def login(daemon, user: bytes, ip: str) -> None:
    ex = send_request(daemon.sock("imap"), request_bytes(user, remote_ip=ip.encode()))
    ex.client.close()
    assert not ex.refused


def test_truncated_addresses_in_the_database_and_the_log(daemon, eng):
    login(daemon, b"alice@example.org", FULL_V4)
    login(daemon, b"alice@example.org", FULL_V6)
    with eng.connect() as conn:
        rows = conn.execute(sa.select(login_events.c.remote_ip, login_events.c.country)
                            .order_by(login_events.c.occurred_at)).all()
        last = conn.execute(sa.text("SELECT last_remote_ip FROM last_logins")).scalar_one()
    # country and ASN come from the full address, before it is cut
    assert rows == [("192.0.2.0", "DE"), ("2001:db8:2::", "JP")]
    assert str(last) == "2001:db8:2::"
    logs = daemon.logs()
    assert "rip=192.0.2.0 " in logs
    assert FULL_V4 not in logs and FULL_V6 not in logs and "2001:db8:2:0:1" not in logs


def test_truncated_addresses_in_the_spool(tmp_path, dbs):
    spool = tmp_path / "spool"
    d = make_daemon("postgresql+psycopg://nobody@127.0.0.1:1/nowhere", store_ip="truncated",
                    geoip_country_db=dbs[0], spool_dir=str(spool), data_dir=str(tmp_path))
    d.start()
    try:
        login(d, b"bob@example.org", FULL_V4)
        login(d, b"bob@example.org", FULL_V6)
    finally:
        assert d.stop() == 0
    written = b"".join(p.read_bytes() for p in spool.rglob("*") if p.is_file())
    assert written.count(b'"remote_ip":"192.0.2.0"') == 1
    assert written.count(b'"remote_ip":"2001:db8:2::"') == 1
    assert written.count(b'"country":"DE"') == 1
    assert FULL_V4.encode() not in written and b"2001:db8:2:0:1" not in written
    assert FULL_V4 not in d.logs()


def test_store_ip_none_keeps_no_address(pg_url, dbs, eng, tmp_path):
    d = make_daemon(pg_url, geoip_country_db=dbs[0], store_ip="none")
    d.start()
    try:
        login(d, b"carol@example.org", FULL_V4)
    finally:
        assert d.stop() == 0
    with eng.connect() as conn:
        assert conn.execute(sa.select(login_events.c.remote_ip, login_events.c.country)
                            ).all() == [(None, "DE")]


def test_export_holds_every_row_and_forget_leaves_none(daemon, eng, pg_url):
    env = {"LASTLOGIN_DATABASE_URL": pg_url}
    for ip in (geoipdb.DE, geoipdb.AT, geoipdb.FR):
        login(daemon, b"Dave@Example.org", ip)
    login(daemon, b"dave@example.org", geoipdb.DE)
    login(daemon, b"davey@example.org", geoipdb.DE)          # someone else
    assert lastlogin("rule", "add", "deny", "--user", "DAVE@example.org", "--protocol",
                     "pop3", env=env).returncode == 0
    assert lastlogin("override", "set", "mail", "maildir:/x", "--user", "dave@example.org",
                     env=env).returncode == 0
    assert lastlogin("alert", "add", "hi", "--user", "dave@example.org",
                     env=env).returncode == 0

    out = lastlogin("user", "export", "dave@EXAMPLE.org", env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert list(doc)[:2] == ["username", "logins"]
    assert [(r["username"], r["country"]) for r in doc["logins"]] == [
        ("Dave@Example.org", "DE"), ("Dave@Example.org", "AT"), ("Dave@Example.org", "FR"),
        ("dave@example.org", "DE")]
    assert sorted(r["username"] for r in doc["last_logins"]) == ["Dave@Example.org",
                                                                "dave@example.org"]
    assert [len(doc[k]) for k in ("rules", "overrides", "alerts")] == [1, 1, 1]
    # the places each spelling logged in from, as its logins say
    places = {(r["username"], kind, str(r[kind if kind == "asn" else "country"]))
              for r in doc["logins"] for kind in ("country", "asn") if r[kind] is not None}
    assert {(r["username"], "country", "AT") for r in doc["logins"]} & places
    assert sorted((r["username"], r["kind"], r["place"]) for r in doc["places"]) == sorted(places)
    out = lastlogin("user", "export", "dave@example.org", "--format", "csv", env=env)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["table"] for r in rows].count("logins") == 4
    assert len(rows) == 4 + 2 + len(places) + 3

    out = lastlogin("user", "forget", "dave@example.org", env=env)
    assert out.returncode == 2 and "give --yes" in out.stderr
    out = lastlogin("user", "forget", "dave@example.org", "--yes", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["removed 4 rows from login_events",
                                       "removed 2 rows from last_logins",
                                       "removed 0 rows from login_alert_deliveries",
                                       f"removed {len(places)} rows from login_places"]
    out = lastlogin("user", "export", "dave@example.org", env=env)
    doc = json.loads(out.stdout)
    assert doc["logins"] == [] and doc["last_logins"] == [] and doc["places"] == []
    assert [len(doc[k]) for k in ("rules", "overrides", "alerts")] == [1, 1, 1]
    out = lastlogin("user", "forget", "dave@example.org", "--yes", "--with-config", env=env)
    assert out.stdout.splitlines()[-3:] == ["removed 1 rows from access_rules",
                                            "removed 1 rows from userdb_overrides",
                                            "removed 1 rows from login_alerts"]
    out = lastlogin("user", "export", "dave@example.org", env=env)
    assert out.returncode == 1 and not any(json.loads(out.stdout)[k] for k in (
        "logins", "last_logins", "places", "alert_deliveries", "rules", "overrides", "alerts"))
    with eng.connect() as conn:         # the other user is untouched
        assert conn.execute(sa.select(sa.func.count()).select_from(login_events)
                            ).scalar_one() == 1
