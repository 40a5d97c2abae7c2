"""The dashboard at real size: 10 million login_events, `lastlogin web` over HTTP.

    python -m bench.web [--events 10000000] [--users 200000] [--url URL]

Generates the data of bench/reports_at_scale.py (or uses the already
generated database at --url), starts `lastlogin web` as a process of its own
on 127.0.0.1 and times each page and JSON twin over HTTP: the first
overview (which waits for the reading of the 30 days' counts in full that
starts with the server; the reading every 15 minutes after it runs in the
background) and the overview after it (median of 10), beside the query
`report daily --days 30` runs, timed in the same run. Checks that the
overview's queries use an index and writes the table into docs/web.md
between the WEB markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from app.db import make_engine, reports
from app.db.migrate import upgrade
from bench.doc import write_section
from bench.reports_at_scale import generate
from tests.harness.pg import create_database, free_port, server_url

DOC = Path(__file__).resolve().parents[1] / "docs" / "web.md"
TARGET_MS = 300.0


def start_web(url: str, tmp: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    env.update(LASTLOGIN_DATABASE_URL=url, LASTLOGIN_WEB_LISTEN=f"127.0.0.1:{port}",
               LASTLOGIN_SOCKET_DIR=os.path.join(tmp, "run"),
               LASTLOGIN_DATA_DIR=os.path.join(tmp, "data"), LASTLOGIN_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "app", "web", "--utc"], env=env)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("lastlogin web did not start")
            time.sleep(0.05)


def fetch(port: int, path: str) -> tuple[float, int, int]:
    """(seconds, status, bytes) of one GET on a fresh connection."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return time.perf_counter() - started, r.status, len(body)


def median_of(port: int, path: str, runs: int = 10) -> tuple[float, int]:
    fetch(port, path)                                    # warm once
    results = [fetch(port, path) for _ in range(runs)]
    assert all(s == 200 for _, s, _ in results), (path, results[0])
    return statistics.median(t for t, _, _ in results), results[0][2]


def timed_query(engine: sa.Engine, fn, runs: int = 5) -> float:
    with engine.connect() as conn:
        fn(conn)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            fn(conn)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def plans(engine: sa.Engine) -> dict[str, str]:
    """The overview's queries as PostgreSQL plans them."""
    hour_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)
    compiled = {}
    with engine.connect() as conn:
        for name, sql, params in (
                ("recent hours", "SELECT date_trunc('hour', timezone('UTC', occurred_at)), "
                 "protocol, outcome, count(*) FROM login_events WHERE occurred_at >= :t "
                 "GROUP BY 1, 2, 3", {"t": hour_ago}),
                ("recent logins", "SELECT * FROM login_events ORDER BY occurred_at DESC "
                 "LIMIT 50", {}),
                ("refused, 7 days", "SELECT * FROM v_refused_logins WHERE occurred_at >= :t "
                 "ORDER BY occurred_at DESC LIMIT 51", {"t": hour_ago - dt.timedelta(days=7)})):
            lines = conn.execute(sa.text("EXPLAIN " + sql), params).scalars().all()
            compiled[name] = " ".join(lines)
    return compiled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--url", help="a database bench.reports_at_scale's data is already in")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/web.md")
    args = ap.parse_args()
    server = None
    gen = None
    url = args.url
    if not url:
        admin_url, server = server_url("LASTLOGIN_BENCH_DATABASE_URL")
        url = create_database(admin_url, "llbenchweb")
        upgrade(url)
        print(f"generating {args.events:,} events for {args.users:,} users ...")
        gen = generate(make_engine(url), args.events, args.users)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            events = conn.execute(sa.text("SELECT count(*) FROM login_events")).scalar_one()
            version = conn.exec_driver_sql("SHOW server_version").scalar()
        now = dt.datetime.now(dt.timezone.utc)
        baseline = timed_query(engine, lambda c: reports.daily(c, 30, now))
        someone = f"user{args.users // 3}@d{(args.users // 3) % 100}.example"
        with tempfile.TemporaryDirectory() as tmp:
            proc, port = start_web(url, tmp)
            try:
                first, status, _ = fetch(port, "/api/overview")
                assert status == 200, status
                pages = [("overview (JSON), later requests", "/api/overview"),
                         ("overview (page)", "/"),
                         ("user page", "/user?name=" + someone.replace("@", "%40")),
                         ("user (JSON)", "/api/user?name=" + someone.replace("@", "%40")),
                         ("rules", "/rules"),
                         ("search", "/search?q=user4242"),
                         ("inactive --days 180 (page)", "/inactive?days=180")]
                results = [(name, *median_of(port, path, 3 if "inactive" in name else 10))
                           for name, path in pages]
            finally:
                proc.terminate()
                proc.wait(30)
        plan = plans(engine)
    finally:
        engine.dispose()
        if server:
            server.stop()
    lines = table(events, version, gen, first, baseline, results, plan)
    if args.no_doc:
        print("\n".join(lines))
    else:
        write_section("WEB", "Speed", lines, DOC)


def table(events, version, gen, first, baseline, results, plan) -> list[str]:
    made = f", generated in {gen:.0f} s" if gen else ""
    out = [
        f"Measured {dt.date.today().isoformat()} on {platform.node()} ({os.cpu_count()} "
        f"cores, Python {platform.python_version()}, PostgreSQL {version}); {events:,} "
        f"login_events (bench/reports_at_scale.py's data{made}). Over HTTP to `lastlogin "
        "web` on 127.0.0.1, a new connection each; median of 10 after one warm request "
        "(3 for inactive); `python -m bench.web`.",
        "",
        "| request | time | bytes | under 300 ms |",
        "|---|---:|---:|:---:|",
        f"| overview (JSON), first request after start: waits for the first 30-day reading "
        f"| {first * 1000:.0f} ms "
        f"| | {'yes' if first * 1000 < TARGET_MS else '**no**'} |",
    ]
    for name, secs, size in results:
        ok = "yes" if secs * 1000 < TARGET_MS else "**no**"
        out.append(f"| {name} | {secs * 1000:.0f} ms | {size:,} | {ok} |")
    out += ["", f"The same run, the query alone: `report daily --days 30` (the 30 days in "
                f"full) {baseline * 1000:.0f} ms.",
            "", "Plans: " + ", ".join(
                f"{k} {'uses an index' if 'Index' in v else '**does not use an index**'}"
                for k, v in plan.items()) + "."]
    return out


if __name__ == "__main__":
    main()
