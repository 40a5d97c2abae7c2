"""Scaling figures: one PostgreSQL, one or two daemons writing; WAL and size per login.

    python -m bench.multihost [--seconds 8] [--rounds 3] [--concurrency 32]
                              [--users 5000] [--size-events 500000] [--smoke]

Against one throw-away PostgreSQL (fsync on; or LASTLOGIN_BENCH_DATABASE_URL):

1. Load, interleaved round by round: (A) one daemon taking ``concurrency``
   client connections, (B) two daemons with different host_name settings
   taking ``concurrency / 2`` each -- the same total offered load, the same
   pool of ``users`` users, so both daemons update the same last_logins
   rows. Per run: logins/s (all daemons together), logins per database
   transaction (the group commit: login_events rows over the change of
   xact_commit), WAL bytes per login (pg_current_wal_lsn before and after),
   CPU seconds per 1,000 logins of the daemons and of PostgreSQL. Every
   answered login is counted in the database afterwards.
2. Size: ``size-events`` realistic login events written straight through
   the daemon's batch statement (1,000 per batch) for ``users`` users, then
   table and index bytes of login_events (all partitions) and last_logins,
   scaled to one million events.

Writes the tables into docs/scaling.md between the MULTIHOST markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import ipaddress
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from app.db import make_engine
from app.login import LoginRecord
from app.db.writers import PostgresWriter
from app.protocol import build_request
from bench.doc import write_section
from bench.dovecot_modes import cpu_of_tree, cpu_seconds
from bench.handler import database, start_lastlogin
from bench.load import Run, drive
from tests.harness.postlogin import answered

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling.md"
SIZE_SQL = """
SELECT coalesce(sum(pg_table_size(relid)), 0), coalesce(sum(pg_indexes_size(relid)), 0)
FROM (SELECT relid FROM pg_partition_tree(CAST(:t AS regclass))
      UNION SELECT CAST(:t AS regclass)) AS tree
"""


@dataclass
class Sample:
    mode: str
    run: Run
    stored: int
    xacts: int
    wal: int
    daemon_cpu: float
    pg_cpu: float

    @property
    def per_xact(self) -> float:
        return self.stored / self.xacts if self.xacts else float("nan")

    @property
    def wal_per_login(self) -> float:
        return self.wal / self.stored if self.stored else float("nan")


def stats(engine: sa.Engine) -> tuple[int, int]:
    """(transactions committed in this database, current WAL position in bytes)."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        xacts = conn.exec_driver_sql(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).scalar_one()
        wal = conn.exec_driver_sql(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").scalar_one()
    return int(xacts), int(wal)


def stored(engine: sa.Engine, prefix: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM login_events WHERE auth_user LIKE :p"),
                            {"p": prefix + "%"}).scalar_one()


def pg_pid(engine: sa.Engine) -> int:
    """The postmaster's pid, or 0 when the server runs elsewhere (CPU not counted)."""
    with engine.connect() as conn:
        backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    try:
        stat = Path(f"/proc/{backend}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rfind(")") + 2:].split()[1])


def pg_cpu(postmaster: int) -> float:
    return cpu_of_tree(postmaster) if postmaster else float("nan")


def load_run(engine: sa.Engine, socks: list[str], daemons: list, mode: str, concurrency: int,
             seconds: float, users: int, prefix: str, postmaster: int) -> Sample:
    """``concurrency`` clients spread over ``socks``; the same user pool everywhere.

    Each login's auth_user field carries ``prefix`` so the run's rows can be
    counted (the usernames repeat across runs on purpose)."""
    def attempt(n: int, i: int) -> bool:
        path = socks[n % len(socks)]
        user = f"user{(n * 7919 + i * 104729) % users:06d}@example.com".encode()
        fields = [b"uid=5000", b"gid=5000", b"home=/var/vmail/u", b"auth_mech=PLAIN",
                  b"auth_user=" + f"{prefix}{n}-{i}".encode()]
        return answered(path, build_request(b"192.0.2.25", b"198.51.100.7", user, fields))

    x0, w0 = stats(engine)
    d0 = sum(cpu_seconds(d.proc.pid) for d in daemons)
    p0 = pg_cpu(postmaster)
    run = drive(attempt, Run(mode, concurrency), seconds)
    d1 = sum(cpu_seconds(d.proc.pid) for d in daemons)
    p1 = pg_cpu(postmaster)
    time.sleep(1.2)             # backends report their counters at most once a second
    x1, w1 = stats(engine)
    n = stored(engine, prefix)
    if n != run.logins:
        raise SystemExit(f"{prefix}: {run.logins} answered but {n} stored")
    return Sample(mode, run, n, x1 - x0, w1 - w0, d1 - d0, p1 - p0)


HOSTS = [f"mx{h:02d}.example.net" for h in range(8)]


def fake_batch(rng: random.Random, n: int, users: int, at: dt.datetime) -> list[LoginRecord]:
    """``n`` realistic records: 80 % imap, 2 % refused, random client addresses."""
    out = []
    for k in range(n):
        u = rng.randrange(users)
        out.append(LoginRecord(
            event_id=uuid.uuid4(), occurred_at=at - dt.timedelta(microseconds=n - k),
            username=f"user{u:06d}@example.com".encode(),
            protocol="imap" if rng.random() < 0.8 else "submission",
            remote_ip=str(ipaddress.IPv4Address(rng.getrandbits(32))),
            local_ip="192.0.2.25", outcome="allowed" if rng.random() < 0.98 else "denied",
            auth_mech=b"PLAIN", host=HOSTS[u % len(HOSTS)]))
    return out


def sweep(url: str, postmaster: int, sizes: list[int], writers: list[int], seconds: float,
          users: int) -> list[tuple[int, int, float, float, float]]:
    """The database alone: ``w`` writers sending batches of ``b`` records through
    the daemon's batch statement. (writers, batch, events/s, WAL per event,
    PostgreSQL CPU per 1,000 events) per combination."""
    import threading
    engine = make_engine(url)
    out = []
    for w in writers:
        for b in sizes:
            counts = [0] * w
            now = dt.datetime.now(dt.timezone.utc)
            # made beforehand: the clock measures the database, not the builder
            prepared = [[fake_batch(random.Random(i * 64 + j), b, users, now)
                         for j in range(max(4, 64_000 // b // 10))] for i in range(w)]
            stop = [0.0]
            writers_ = [PostgresWriter(engine) for _ in range(w)]
            for wr in writers_:
                wr._conn()          # connected before the clock (and the CPU count) starts

            def work(i: int) -> None:
                writer = writers_[i]
                j = 0
                while time.monotonic() < stop[0]:
                    counts[i] += writer.write(prepared[i][j % len(prepared[i])])
                    j += 1
                    if j % len(prepared[i]) == 0:      # a second pass: fresh event ids
                        prepared[i] = [[dataclasses.replace(r, event_id=uuid.uuid4())
                                        for r in batch] for batch in prepared[i]]

            _, w0 = stats(engine)
            p0 = pg_cpu(postmaster)
            t0 = time.monotonic()
            stop[0] = t0 + seconds
            threads = [threading.Thread(target=work, args=(i,)) for i in range(w)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
            p1 = pg_cpu(postmaster)              # before the backends exit
            for wr in writers_:
                wr.close()
            _, w1 = stats(engine)
            n = sum(counts)
            out.append((w, b, n / elapsed, (w1 - w0) / n, (p1 - p0) / n * 1000))
            print(f"sweep {w} writer(s) x batch {b}: {n / elapsed:,.0f} events/s", flush=True)
    engine.dispose()
    return out


def size_run(url: str, events: int, users: int) -> dict[str, float]:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE login_events, last_logins, login_alert_deliveries")
    rng = random.Random(21)
    writer = PostgresWriter(engine)
    start = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    done = 0
    while done < events:
        n = min(1000, events - done)
        done += writer.write(fake_batch(rng, n, users, start - dt.timedelta(seconds=events - done)))
    writer.close()
    seconds = time.monotonic() - t0
    out: dict[str, float] = {"events": events, "load_seconds": seconds}

    def measure(tag: str) -> None:
        with engine.connect() as conn:
            for t in ("login_events", "last_logins"):
                table, index = conn.execute(sa.text(SIZE_SQL), {"t": t}).one()
                out[f"{t}_table{tag}"], out[f"{t}_index{tag}"] = int(table), int(index)
            out["last_logins_rows"] = conn.exec_driver_sql(
                "SELECT count(*) FROM last_logins").scalar_one()

    measure("")
    # Compacted: what the rows themselves take, without the dead versions that
    # last_logins' updates leave until (auto)vacuum reuses their space.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM FULL last_logins")
    measure("_compact")
    engine.dispose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--size-events", type=int, default=500_000)
    ap.add_argument("--smoke", action="store_true", help="a few seconds, no doc written")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.rounds, args.size_events = 1.0, 1, 5000
    workdir = Path(tempfile.mkdtemp(prefix="llbench-mh-", dir="/tmp"))
    url, server = database()
    engine = make_engine(url)
    samples: list[Sample] = []
    try:
        postmaster = pg_pid(engine)
        for d in ("a", "b"):
            (workdir / d).mkdir()
        a = start_lastlogin(url, workdir / "a", host_name="mx-a")
        b = start_lastlogin(url, workdir / "b", host_name="mx-b")
        socks = {"a": a.sock("imap"), "b": b.sock("imap")}
        try:
            for rnd in range(args.rounds):
                for mode, daemons, paths in (("1 daemon", [a], [socks["a"]]),
                                             ("2 daemons", [a, b], [socks["a"], socks["b"]])):
                    s = load_run(engine, paths, daemons, mode, args.concurrency, args.seconds,
                                 args.users, f"r{rnd}{mode[0]}-", postmaster)
                    samples.append(s)
                    print(f"round {rnd + 1} {mode}: {s.run.rate:,.0f} logins/s, "
                          f"{s.per_xact:.1f} logins/commit, {s.wal_per_login:,.0f} B WAL/login",
                          flush=True)
        finally:
            a.stop()
            b.stop()
        swept = sweep(url, postmaster, [1, 10, 100, 1000], [1, 2],
                      0.5 if args.smoke else 3.0, 50_000)
        size = size_run(url, args.size_events, max(args.users, args.size_events // 10))
        print(size, flush=True)
        if args.smoke:
            print(f"smoke: {sum(x.stored for x in samples)} logins through 1 and 2 daemons, "
                  "every answered login stored once")
        else:
            write_doc(samples, swept, size, args)
    finally:
        engine.dispose()
        if server:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def write_doc(samples: list[Sample], swept, size: dict[str, float], args) -> None:
    med = statistics.median
    lines = [f"Measured {dt.date.today().isoformat()} on {platform.node()} ({os.cpu_count()} "
             f"cores, shared with other work; PostgreSQL with fsync on, on the same machine); "
             f"`python -m bench.multihost`: {args.rounds} rounds x {args.seconds:g} s per mode, "
             f"interleaved, {args.concurrency} client connections in all, "
             f"{args.users:,} users shared by both daemons, medians over rounds. Every answered "
             "login was counted in the database.", "",
             "| daemons writing | logins/s | logins per commit | WAL per login | "
             "daemon CPU per 1,000 logins | PostgreSQL CPU per 1,000 logins | runs (logins/s) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    base = None
    for mode in ("1 daemon", "2 daemons"):
        ss = [s for s in samples if s.mode == mode]
        rate = med(s.run.rate for s in ss)
        base = base or rate
        lines.append(
            f"| {mode} | {rate:,.0f} ({rate / base:.2f} x) | {med(s.per_xact for s in ss):.1f} | "
            f"{med(s.wal_per_login for s in ss):,.0f} B | "
            f"{med(s.daemon_cpu / s.stored * 1000 for s in ss):.2f} s | "
            f"{med(s.pg_cpu / s.stored * 1000 for s in ss):.2f} s | "
            f"{', '.join(f'{s.run.rate:,.0f}' for s in ss)} |")
    lines += ["", "The database alone (no daemon, no client sockets): writer threads sending "
                  "batches through the daemon's batch statement for 3 s each, 50,000 users:", "",
              "| writers | records per commit | events/s | WAL per event | "
              "PostgreSQL CPU per 1,000 events |", "|---:|---:|---:|---:|---:|"]
    for w, b, rate, wal, cpu in swept:
        lines.append(f"| {w} | {b:,} | {rate:,.0f} | {wal:,.0f} B | {cpu:.3f} s |")
    mib = 1 << 20
    n = size["events"]
    per_m = lambda b: b / n * 1e6 / mib          # noqa: E731
    users = size["last_logins_rows"]
    lines += ["", f"Size: {n:,.0f} login events ({users:,.0f} last_logins rows) written through "
                  f"the batch statement in {size['load_seconds']:.0f} s "
                  f"({n / size['load_seconds']:,.0f} events/s, 1,000 per statement), then "
                  "measured with pg_table_size / pg_indexes_size over every partition:", "",
              "| table | table per million | indexes per million | total per million |",
              "|---|---:|---:|---:|",
              f"| login_events (per million events) | {per_m(size['login_events_table']):,.0f} MiB "
              f"| {per_m(size['login_events_index']):,.0f} MiB | "
              f"{per_m(size['login_events_table'] + size['login_events_index']):,.0f} MiB |",
              f"| last_logins (per million user-protocol rows), as written, "
              f"{n / users:.0f} updates per row | "
              f"{size['last_logins_table'] / users * 1e6 / mib:,.0f} MiB | "
              f"{size['last_logins_index'] / users * 1e6 / mib:,.0f} MiB | "
              f"{(size['last_logins_table'] + size['last_logins_index']) / users * 1e6 / mib:,.0f}"
              " MiB |",
              f"| last_logins (per million rows), compacted (VACUUM FULL) | "
              f"{size['last_logins_table_compact'] / users * 1e6 / mib:,.0f} MiB | "
              f"{size['last_logins_index_compact'] / users * 1e6 / mib:,.0f} MiB | "
              f"{(size['last_logins_table_compact'] + size['last_logins_index_compact']) / users * 1e6 / mib:,.0f}"
              " MiB |"]
    write_section("MULTIHOST", "Measured on this machine", lines, DOC)


if __name__ == "__main__":
    main()
