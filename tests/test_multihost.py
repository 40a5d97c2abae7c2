"""Many mail servers, one database: one daemon per mail host, one PostgreSQL.

Two real daemons with different host_name settings take logins of the same
users at the same time; then the counts must be exact (login_events rows =
logins acknowledged, sum(login_count) = allowed), each row must name the
host that saw it, and neither daemon may have met a deadlock or a
serialization failure. A rule added through one host's CLI must be enforced
by the other within a second (NOTIFY). And the host is kept everywhere a
record travels: both write paths, the spool (old lines without it still
decode), the reports' --host filter and --by-host grouping.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.rules import config_version_of
from app.db.schema import last_logins, login_events
from app.db.store import _fold
from app.db.writers import PostgresWriter, SqlAlchemyWriter
from app.spool import decode, encode
from tests.builders import T0, record, request_bytes
from tests.harness.db import empty_tables
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.postlogin import send_request

REPO = str(Path(__file__).resolve().parents[1])
USERS = [f"user{i:02d}@example.com" for i in range(50)]
N = 1000        # logins per host
# What a daemon must never log while another writes the same rows (a failed
# batch write logs event=record_failed with the database's error).
CONFLICT = re.compile(r"deadlock|could not serialize|serialization|event=record_failed",
                      re.IGNORECASE)


@pytest.fixture
def shared_pg(pg_cluster):
    """A database of this test's own on the suite's PostgreSQL, at head."""
    url = pg_cluster.create_database()
    upgrade(url)
    return url


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def hammer(daemon, names: list[str], workers: int = 8) -> list[bool]:
    """Log ``names`` in through ``daemon`` from ``workers`` threads; allowed or not, each."""
    results: list[bool | None] = [None] * len(names)
    it = iter(enumerate(names))
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                nxt = next(it, None)
            if nxt is None:
                return
            i, name = nxt
            ex = send_request(daemon.sock("imap"), request_bytes(name.encode()), timeout=30)
            results[i] = not ex.refused
            ex.client.close()

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results), "a login got no answer"
    return [bool(r) for r in results]


def counts(url: str) -> tuple[int, int, dict[str | None, int], bool]:
    """(login_events rows, sum(login_count), rows per host, whether every
    last_host is the host of that user's newest allowed login)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(sa.func.count()).select_from(login_events)).scalar()
            total = conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar()
            per_host = dict(conn.execute(sa.select(login_events.c.host, sa.func.count())
                                         .group_by(login_events.c.host)).all())
            last = {(r.username, r.protocol): (r.last_seen, r.last_host)
                    for r in conn.execute(sa.select(last_logins))}
            newest: dict[tuple[str, str], tuple[object, set[str]]] = {}
            e = login_events
            for r in conn.execute(sa.select(e.c.username, e.c.protocol, e.c.occurred_at, e.c.host)
                                  .where(e.c.outcome == "allowed")):
                at, hosts = newest.get((r.username, r.protocol), (None, set()))
                if at is None or r.occurred_at > at:
                    newest[(r.username, r.protocol)] = (r.occurred_at, {r.host})
                elif r.occurred_at == at:
                    hosts.add(r.host)
    finally:
        engine.dispose()
    consistent = last.keys() == newest.keys() and all(
        last[k][0] == newest[k][0] and last[k][1] in newest[k][1] for k in last)
    return int(rows), int(total or 0), per_host, consistent


def test_two_hosts_one_database_exact_counts_and_rules_spread(shared_pg, tmp_path):
    a = make_daemon(shared_pg, protocols="imap", host_name="mx-a.example.net",
                    data_dir=str(tmp_path / "a"), batch_max="50")
    b = make_daemon(shared_pg, protocols="imap", host_name="mx-b.example.net",
                    data_dir=str(tmp_path / "b"), batch_max="50")
    a.start()
    b.start()
    try:
        # The same 50 users through both hosts at once: 2 x 1,000 logins.
        names = [USERS[i % len(USERS)] for i in range(N)]
        got: dict[str, list[bool]] = {}
        ta = threading.Thread(target=lambda: got.__setitem__("a", hammer(a, names)))
        tb = threading.Thread(target=lambda: got.__setitem__("b", hammer(b, names[::-1])))
        ta.start(), tb.start()
        ta.join(180), tb.join(180)
        assert got["a"] == [True] * N and got["b"] == [True] * N

        want = (2 * N, 2 * N, {"mx-a.example.net": N, "mx-b.example.net": N}, True)
        # (a commit slower than record_timeout on a busy machine is spooled and
        # replayed within a second or two: that is allowed, a failed write is not)
        assert wait_for(lambda: counts(shared_pg) == want, timeout=15), counts(shared_pg)
        engine = make_engine(shared_pg)
        with engine.connect() as conn:
            per_user = dict(conn.execute(sa.select(last_logins.c.username,
                                                   last_logins.c.login_count)).all())
        assert per_user == {u: 2 * N // len(USERS) for u in USERS}
        for d in (a, b):
            bad = [ln for ln in d.logs().splitlines() if CONFLICT.search(ln)]
            assert bad == [], bad

        # A rule added through host A's CLI is enforced by host B within a second.
        env = {**a.env, "LASTLOGIN_DATA_DIR": str(tmp_path / "a")}
        victim = USERS[7]
        assert not send_request(b.sock("imap"), request_bytes(victim.encode())).refused
        with engine.connect() as conn:
            before = config_version_of(conn)
        out = cli(env, "rule", "add", "deny", "--user", victim, "--message", "Moved away.")
        assert out.returncode == 0, out.stderr
        added = time.monotonic()
        with engine.connect() as conn:
            wanted = config_version_of(conn)
        assert wanted > before
        loaded_at = wait_for(lambda: b.loaded_version() >= wanted and time.monotonic(),
                             timeout=1.0, interval=0.01)
        assert loaded_at, f"host B did not load the rule within 1 s:\n{b.logs()}"
        assert loaded_at - added < 1.0
        assert send_request(b.sock("imap"), request_bytes(victim.encode())).refused
        # and host A too (it was told by the same NOTIFY)
        assert send_request(a.sock("imap"), request_bytes(victim.encode())).refused
        engine.dispose()

        # Reports: filter by host, group by host.
        out = cli(env, "report", "daily", "--by-host", "--utc", "--format", "json")
        assert out.returncode == 0, out.stderr
        daily = {(r["host"], r["protocol"]): (r["allowed"], r["denied"])
                 for r in json.loads(out.stdout)}
        assert daily == {("mx-a.example.net", "imap"): (N, 1),
                         ("mx-b.example.net", "imap"): (N + 1, 1)}
        out = cli(env, "report", "history", victim, "--host", "mx-b.example.net",
                  "--format", "json")
        hist = json.loads(out.stdout)
        assert Counter((r["host"], r["outcome"]) for r in hist) == {
            ("mx-b.example.net", "allowed"): N // len(USERS) + 1,
            ("mx-b.example.net", "denied"): 1}
        out = cli(env, "report", "refused", "--host", "mx-a.example.net", "--format", "json")
        assert [(r["username"], r["host"], r["message"]) for r in json.loads(out.stdout)] == [
            (victim, "mx-a.example.net", "Moved away.")]
        out = cli(env, "report", "last", "--host", "nowhere.example.net")
        assert out.returncode == 1 and out.stdout.splitlines()[1:] == []
    finally:
        a.stop()
        b.stop()


def test_host_name_defaults_to_the_machine_and_is_checked():
    from app.config import ConfigError, load_settings
    assert load_settings(environ={}).host_name == os.uname().nodename
    assert load_settings(environ={"LASTLOGIN_HOST_NAME": " mx1 "}).host_name == "mx1"
    for bad in ("", "tab\there", "x" * 256):
        with pytest.raises(ConfigError) as err:
            load_settings(environ={"LASTLOGIN_HOST_NAME": bad})
        assert err.value.key == "host_name"


@pytest.mark.parametrize("backend,path", [("postgresql", "batch"), ("postgresql", "sqlalchemy"),
                                          ("sqlite", "sqlalchemy")])
def test_both_write_paths_store_the_host_and_fold_the_newest(request, backend, path):
    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
    engine = make_engine(url)
    empty_tables(engine)
    writer = PostgresWriter(engine) if path == "batch" else SqlAlchemyWriter(engine)
    later = T0 + dt.timedelta(minutes=5)
    recs = [record(b"alice", at=later, host="mx-b"), record(b"alice", at=T0, host="mx-a"),
            record(b"bob", host=None), record(b"carol", outcome="denied", host="mx-c")]
    try:
        assert writer.write(recs) == 4
        # an older login from another host afterwards does not move last_host
        assert writer.write([record(b"alice", at=T0 - dt.timedelta(hours=1),
                                    host="mx-z")]) == 1
    finally:
        writer.close()
    with engine.connect() as conn:
        hosts = Counter(conn.execute(sa.select(login_events.c.host)).scalars())
        last = dict(conn.execute(sa.select(last_logins.c.username,
                                             last_logins.c.last_host)).all())
    empty_tables(engine)
    engine.dispose()
    assert hosts == {"mx-a": 1, "mx-b": 1, "mx-c": 1, "mx-z": 1, None: 1}
    assert last == {"alice": "mx-b", "bob": None}


def test_the_spool_keeps_the_host_and_reads_old_lines(tmp_path):
    rec = record(b"alice", host="mx-a.example.net")
    assert decode(encode(rec)) == rec
    old = record(b"bob")                         # a line written before hosts existed
    line = encode(old)
    assert b'"host"' not in line
    assert decode(line).host is None and decode(line) == old


def test_fold_orders_rows_by_key():
    """The SQLAlchemy path upserts last_logins in key order (no lock-order deadlock)."""
    rows = [record(n, protocol=p).event_row()
            for n, p in ((b"zed", "imap"), (b"amy", "pop3"), (b"kim", "imap"), (b"amy", "imap"))]
    assert [(r["username"], r["protocol"]) for r in _fold(rows)] == [
        ("amy", "imap"), ("amy", "pop3"), ("kim", "imap"), ("zed", "imap")]


def test_a_multi_host_url_is_taken_in_the_form_sqlalchemy_reads():
    from app.config import ConfigError, load_settings
    good = "postgresql://ll@/ll?host=db1:5432&host=db2:5432&target_session_attrs=read-write"
    assert load_settings(environ={"LASTLOGIN_DATABASE_URL": good}).database_url == (
        "postgresql+psycopg" + good[len("postgresql"):])
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"LASTLOGIN_DATABASE_URL": "postgresql://ll@db1:5432,db2:5432/ll"})
    assert err.value.key == "database_url" and "host=h1:5432&host=h2:5432" in err.value.reason
    # the same check for the reports' URL
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"LASTLOGIN_REPORT_DATABASE_URL": "postgresql://ll@a,b/ll"})
    assert err.value.key == "report_database_url"


def test_scaling_benchmark_smoke(pg_cluster):
    """bench/multihost.py runs, and every login it answered was stored (it exits
    non-zero otherwise). No timing is asserted; docs/scaling.md has the figures."""
    url = pg_cluster.create_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    env.update(LASTLOGIN_BENCH_DATABASE_URL=url, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "bench.multihost", "--smoke"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every answered login stored once" in out.stdout
