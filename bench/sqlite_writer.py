"""The embedded SQLite default: the writer's CPU and time per login.

    python -m bench.sqlite_writer [--logins 400] [--rounds 3] [--no-doc]

Writes the same records, in batches of 1 (concurrency 1: one commit per
login) and 16 (logins sharing a commit), through the SQLAlchemy path
(``SqlAlchemyWriter``, what the daemon used before) and the sqlite3 writer
(``SqliteWriter``, what it uses now), each with ``synchronous=FULL`` (the
default: a commit is on disk before the login is answered) and ``NORMAL``
(WAL fsync'ed only at checkpoints), interleaved round by round on one WAL
database file. Process CPU (``time.process_time``) and wall time per login,
medians over rounds; every record is counted in the database afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sqlite3
import statistics
import tempfile
import time

import sqlalchemy as sa

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.writers import SqlAlchemyWriter, SqliteWriter
from app.login import ALLOWED, LoginRecord, new_event_id
from bench.doc import write_section

WRITERS = {"SQLAlchemy": SqlAlchemyWriter, "sqlite3": SqliteWriter}


def record(name: str) -> LoginRecord:
    return LoginRecord(new_event_id(), dt.datetime.now(dt.timezone.utc), name.encode(), "imap",
                       "198.51.100.7", "192.0.2.25", ALLOWED, auth_mech=b"PLAIN")


def one(url: str, writer_cls, sync: str, batch: int, logins: int,
        prefix: str) -> tuple[float, float]:
    """(CPU ms, wall ms) per login for ``logins`` logins in batches of ``batch``."""
    engine = make_engine(url)           # its connect hook sets synchronous=FULL ...
    if sync != "FULL":                  # ... and this one, after it, the other
        sa.event.listen(engine, "connect",
                        lambda c, _r: c.execute(f"PRAGMA synchronous={sync}"))
    writer = writer_cls(engine)
    writer.write([record(f"{prefix}warm")])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(logins // batch):
        writer.write([record(f"{prefix}{i}-{j}@example.com") for j in range(batch)])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    writer.close()
    engine.dispose()
    return cpu / logins * 1000, wall / logins * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logins", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="llsqlite-", dir="/tmp")
    url = f"sqlite:///{workdir}/lastlogin.db"
    upgrade(url)
    results: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    expected = 0
    for rnd in range(args.rounds):
        for batch in (1, 16):
            for sync in ("FULL", "NORMAL"):
                for name, cls in WRITERS.items():
                    got = one(url, cls, sync, batch, args.logins, f"r{rnd}{name}{sync}{batch}-")
                    expected += args.logins // batch * batch + 1
                    results.setdefault((name, sync, batch), []).append(got)
                    print(f"round {rnd + 1} batch {batch} {sync} {name}: "
                          f"{got[0]:.3f} ms CPU, {got[1]:.3f} ms wall per login", flush=True)
    engine = make_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM login_events")).scalar_one()
    if stored != expected:
        raise SystemExit(f"{expected} records written, {stored} stored")
    lines = [f"Measured {dt.date.today().isoformat()} on {platform.node()} (Python "
             f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}); "
             f"`python -m bench.sqlite_writer`: {args.rounds} rounds x {args.logins} logins per "
             "writer, synchronous setting and batch size, interleaved, medians; WAL journal; "
             f"{stored:,} records written, {stored:,} counted.", "",
             "| batch (logins per commit) | synchronous | SQLAlchemy writer CPU | sqlite3 writer CPU "
             "| CPU ratio | SQLAlchemy wall | sqlite3 wall |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for batch in (1, 16):
        for sync in ("FULL", "NORMAL"):
            a = results[("SQLAlchemy", sync, batch)]
            b = results[("sqlite3", sync, batch)]
            ac, bc = statistics.median(x[0] for x in a), statistics.median(x[0] for x in b)
            aw, bw = statistics.median(x[1] for x in a), statistics.median(x[1] for x in b)
            lines.append(f"| {batch} | {sync} | {ac:.3f} ms | {bc:.3f} ms | {bc / ac:.2f} | "
                         f"{aw:.2f} ms | {bw:.2f} ms |")
    if args.no_doc:
        print("\n".join(lines))
    else:
        write_section("SQLITE", "The embedded SQLite writer", lines)


if __name__ == "__main__":
    main()
