"""Review of 2e042ae: is the commit floor the least a committing handler can do?

Interleaved (random order each round), own throw-away PostgreSQL, the C load
client of bench.handler: null (do-nothing), floor (bench/null_handler.py --commit,
psycopg AsyncConnection), floor-raw (floor_raw.py: the same commit done as
lastlogin's lane does it, psycopg.pq), lastlogin (asyncio). Handler CPU per login
(/proc utime+stime), PostgreSQL CPU per login, logins/s; every committing mode's
rows counted against the logins answered.

    python exp_floor.py ROUNDS SECONDS LEVELS
"""
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.handler import (CClient, NullHandler, database, drive, measured, postmaster_pid,
                           start_lastlogin, stored_events)

HERE = Path(__file__).resolve().parent
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
LEVELS = [int(c) for c in (sys.argv[3] if len(sys.argv) > 3 else "1,8,64").split(",")]


class RawFloor:
    def __init__(self, workdir: Path, conninfo: str):
        self.path = str(workdir / "rawfloor.sock")
        self.log = open(workdir / "rawfloor.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "floor_raw.py"), self.path, conninfo],
                                     env={**os.environ, "PYTHONPATH": "/work/main"},
                                     stdout=subprocess.PIPE, stderr=self.log, cwd="/work/main")
        line = self.proc.stdout.readline().decode()
        if "READY" not in line:
            raise RuntimeError(f"raw floor did not start: {line!r}")

    def sock(self, _p):
        return self.path

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def main():
    assert "LASTLOGIN_BENCH_DATABASE_URL" not in os.environ
    workdir = Path(tempfile.mkdtemp(prefix="r9floor-", dir="/tmp"))
    url, server = database()
    postmaster = postmaster_pid(server)
    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    client = CClient(workdir)
    handlers = {}
    try:
        handlers["null"] = NullHandler(workdir)
        handlers["floor"] = NullHandler(workdir, str(workdir / "floor.sock"), commit=url)
        handlers["floor-raw"] = RawFloor(workdir, conninfo)
        handlers["lastlogin"] = start_lastlogin(url, workdir, name="ll", event_loop="asyncio")
        path = {m: (h.path if m in ("null", "floor") else h.sock("imap")) for m, h in handlers.items()}
        res = {}   # (mode, c) -> list of (rate, handler ms/login, db ms/login, p50 ms)
        for rnd in range(ROUNDS):
            for c in LEVELS:
                order = list(handlers)
                random.shuffle(order)
                for k, mode in enumerate(order):
                    prefix = f"r{rnd}c{c}{mode.replace('-', '')}x"
                    h = handlers[mode]
                    run = measured(h.proc.pid, postmaster,
                                   lambda: drive(path[mode], mode, c, SECONDS, None, prefix + "-", client))
                    assert not run.failures, (mode, c, run.failures)
                    if mode != "null":
                        stored = stored_events(url, prefix + "-", floor=mode.startswith("floor"))
                        assert stored == run.logins, (mode, c, run.logins, stored)
                    lat = sorted(run.latencies)
                    res.setdefault((mode, c), []).append(
                        (run.logins / run.seconds, run.cpu / run.logins * 1000,
                         (run.db_cpu or 0) / run.logins * 1000, lat[len(lat) // 2] * 1000))
                print(f"round {rnd + 1} c={c}: " + ", ".join(
                    f"{m} {res[(m, c)][-1][0]:.0f}/s h{res[(m, c)][-1][1]:.3f} db{res[(m, c)][-1][2]:.3f}"
                    for m in handlers), flush=True)
        print(f"\nmedians over {ROUNDS} rounds (min..max); {SECONDS} s per mode; C client")
        print("| c | mode | logins/s | handler ms CPU/login | PostgreSQL ms CPU/login | p50 ms |")
        print("|---:|---|---:|---:|---:|---:|")
        for c in LEVELS:
            for m in handlers:
                cols = list(zip(*res[(m, c)]))
                f = lambda xs, d=3: f"{statistics.median(xs):.{d}f} ({min(xs):.{d}f}..{max(xs):.{d}f})"  # noqa
                print(f"| {c} | {m} | {f(cols[0], 0)} | {f(cols[1])} | {f(cols[2])} | {f(cols[3])} |")
        print("\nper-round ratios of handler CPU/login, median (min..max):")
        for c in LEVELS:
            for a, b in (("floor", "lastlogin"), ("floor-raw", "floor"), ("floor-raw", "lastlogin")):
                r = [x[1] / y[1] for x, y in zip(res[(a, c)], res[(b, c)])]
                print(f"  c={c} {a}/{b}: {statistics.median(r):.2f} ({min(r):.2f}..{max(r):.2f})")
            for a, b in (("floor", "lastlogin"), ("floor-raw", "floor")):
                r = [(x[1] + x[2]) / (y[1] + y[2]) for x, y in zip(res[(a, c)], res[(b, c)])]
                print(f"  c={c} {a}/{b} handler+PostgreSQL: {statistics.median(r):.2f} "
                      f"({min(r):.2f}..{max(r):.2f})")
    finally:
        for h in handlers.values():
            h.stop()
        if server:
            server.stop()


if __name__ == "__main__":
    main()
