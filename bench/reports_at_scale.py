"""Reports at real size: 10 million login_events, 200,000 users, PostgreSQL.

    python -m bench.reports_at_scale [--events 10000000] [--users 200000]

Uses LASTLOGIN_BENCH_DATABASE_URL (a server where it may CREATE DATABASE) or
starts a throw-away PostgreSQL like the test suite. Generates the data in
SQL (generate_series), times every report (median of 5 runs, after one warm
run), checks each plan uses an index where it should, and writes the table
into docs/performance.md between the REPORTS markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time

import sqlalchemy as sa

from app.db import make_engine, reports
from app.db.migrate import upgrade
from app.db.partitions import ensure_partitions, months_from
from bench.doc import write_section
from tests.harness.pg import create_database, server_url


GENERATE = """
INSERT INTO login_events (event_id, occurred_at, username, protocol, remote_ip, local_ip,
                          outcome, rule_id, auth_mech)
SELECT gen_random_uuid(),
       CASE WHEN u >= :active THEN now() - interval '200 days' - random() * interval '150 days'
            ELSE now() - random() * interval '180 days' END,
       'user' || u || '@d' || (u % 100) || '.example',
       CASE WHEN i % 10 < 7 THEN 'imap' ELSE 'pop3' END,
       ('10.' || (u % 200) || '.' || ((u / 200) % 256) || '.' || (i % 4))::inet,
       '192.0.2.25'::inet,
       CASE WHEN i % 200 = 0 THEN 'denied' ELSE 'allowed' END,
       CASE WHEN i % 200 = 0 THEN 1 END,
       'PLAIN'
FROM (SELECT i, (i * 7919) % :users AS u
      FROM generate_series(CAST(:lo AS bigint), CAST(:hi AS bigint)) AS i) s
"""

FOLD = """
INSERT INTO last_logins (username, protocol, first_seen, last_seen, last_remote_ip,
                         last_local_ip, login_count)
SELECT username, protocol, min(occurred_at), max(occurred_at),
       (array_agg(remote_ip ORDER BY occurred_at DESC))[1], '192.0.2.25', count(*)
FROM login_events WHERE outcome = 'allowed' GROUP BY username, protocol
"""


def generate(engine: sa.Engine, events: int, users: int) -> float:
    started = time.monotonic()
    now = dt.datetime.now(dt.timezone.utc)
    with engine.begin() as conn:
        ensure_partitions(conn, months_from(now - dt.timedelta(days=370), 14))
    step = 1_000_000
    for lo in range(1, events + 1, step):
        with engine.begin() as conn:
            conn.execute(sa.text(GENERATE), {"lo": lo, "hi": min(events, lo + step - 1),
                                             "users": users, "active": int(users * 0.95)})
        print(f"  {min(events, lo + step - 1):>10,} events", flush=True)
    with engine.begin() as conn:
        conn.execute(sa.text(FOLD))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    return time.monotonic() - started


def cases(now: dt.datetime, users: int):
    someone = f"user{users // 3}@d{(users // 3) % 100}.example"
    return [
        ("report last --user U", lambda c: reports.last(c, user=someone)),
        ("report last --domain D", lambda c: reports.last(c, domain="d42.example")),
        ("report last (default --limit 1000)", lambda c: reports.last(c, limit=1000)),
        ("report last --limit 0 (every user)", lambda c: reports.last(c)),
        ("report inactive --days 180", lambda c: reports.inactive(c, 180, now)),
        ("report history U", lambda c: reports.history(c, someone)),
        ("report ips U", lambda c: reports.ips(c, someone)),
        ("report refused --since 7d", lambda c: reports.refused(c, now - dt.timedelta(days=7))),
        ("report daily --days 7", lambda c: reports.daily(c, 7, now)),
        ("report daily --days 30", lambda c: reports.daily(c, 30, now)),
    ]


def timed(engine: sa.Engine, fn) -> tuple[float, int]:
    with engine.connect() as conn:
        fn(conn)                                   # warm the cache once
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            rows = fn(conn)
            runs.append(time.perf_counter() - started)
    return statistics.median(runs), len(rows)


def plan_of(engine: sa.Engine, sql: str, **params) -> str:
    with engine.connect() as conn:
        lines = conn.execute(sa.text("EXPLAIN " + sql), params).scalars().all()
    return " ".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    args = ap.parse_args()
    admin_url, server = server_url("LASTLOGIN_BENCH_DATABASE_URL")
    url = create_database(admin_url, "llbench")
    try:
        upgrade(url)
        engine = make_engine(url)
        print(f"generating {args.events:,} events for {args.users:,} users ...")
        gen = generate(engine, args.events, args.users)
        now = dt.datetime.now(dt.timezone.utc)
        results = [(name, *timed(engine, fn)) for name, fn in cases(now, args.users)]
        someone = f"user{args.users // 3}@d{(args.users // 3) % 100}.example"
        plans = {
            "history": plan_of(engine, "SELECT * FROM login_events WHERE username = :u "
                                       "ORDER BY occurred_at DESC LIMIT 1000", u=someone),
            "refused": plan_of(engine, "SELECT * FROM v_refused_logins WHERE occurred_at >= "
                                       "now() - interval '7 days'"),
        }
        with engine.connect() as conn:
            version = conn.exec_driver_sql("SHOW server_version").scalar()
        engine.dispose()
        write_doc(args, gen, results, plans, version)
        for name, secs, rows in results:
            print(f"{name:32} {secs * 1000:9.1f} ms  {rows:>8} rows")
    finally:
        if server:
            server.stop()


def write_doc(args, gen: float, results, plans, version: str) -> None:
    uses = {k: ("Index" in v) for k, v in plans.items()}
    lines = [
        f"Measured {dt.date.today().isoformat()} on {platform.node()} "
        f"({os.cpu_count()} cores, Python {platform.python_version()}, PostgreSQL {version}); "
        f"{args.events:,} login_events over 12 months for {args.users:,} users "
        f"(5 % of them idle for 200+ days), generated in {gen:.0f} s. "
        "Median of 5 runs after one warm run; `python -m bench.reports_at_scale`.",
        "",
        "| report | median | rows | under 1 s |",
        "|---|---:|---:|:---:|",
    ]
    for name, secs, rows in results:
        lines.append(f"| `{name}` | {secs * 1000:.1f} ms | {rows:,} | "
                     f"{'yes' if secs < 1 else '**no**'} |")
    lines += ["", "Plans: " + ", ".join(
        f"{k} {'uses an index' if v else '**does not use an index**'}" for k, v in uses.items())]
    write_section("REPORTS", "Reports at scale", lines)


if __name__ == "__main__":
    main()
