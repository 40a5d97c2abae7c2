"""SQLite: app.db.writers.SqliteWriter with and without ix_login_events_username_country.

Usage: sqlite_bench.py ROUNDS N NB [WARM] [HIST]
  One file at head (migrate.upgrade), filled with lib.history(1, HIST) through
  app.db.store.record_logins (make_engine: WAL, synchronous=FULL; batches of 500), checkpointed,
  copied; DROP INDEX in the copy; VACUUM both. Then per round: N one-login commits of kind a
  (unlocated allowed, known user), N of kind b (allowed with a country, known user), NB commits of
  16 fresh-user unlocated logins, shuffled; each commit to both files in a random order, through
  each file's own SqliteWriter(make_engine(url)) (synchronous=FULL as make_engine sets it).
  CPU per commit: time.thread_time() around writer.write (this thread; sqlite3 runs in it);
  also time.process_time() and wall.
"""
import datetime as dt
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, "/work/notes/dropidx")
import lib  # noqa: E402
from app.db import make_engine  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.db.store import record_logins  # noqa: E402
from app.db.writers import SqliteWriter  # noqa: E402

ROUNDS, N, NB = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
WARM = int(sys.argv[4]) if len(sys.argv) > 4 else 300
HIST = int(sys.argv[5]) if len(sys.argv) > 5 else 50000
B = 16
DBS = ("with", "without")


def sizes(path, label):
    c = sqlite3.connect(path)
    rows = c.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY name").fetchall()
    n = c.execute("SELECT count(*) FROM login_events").fetchone()[0]
    sync = c.execute("PRAGMA journal_mode").fetchone()[0]
    c.close()
    total = sum(b for _, b in rows)
    le = [(nm, b) for nm, b in rows if nm == "login_events" or "login_events" in nm]
    print(f"\n## sizes {label}: file {os.path.getsize(path)} B (dbstat total {total} B); "
          f"login_events {n} rows; journal {sync}")
    for nm, b in le:
        print(f"   {nm:45} {b:>11} B  {b / n:7.1f} B/row  {100 * b / total:5.1f} % of the file")
    return dict(rows)


print(lib.provenance(), flush=True)
print(f"# run: sqlite_bench.py {' '.join(sys.argv[1:])}; started {dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC; "
      f"load {os.getloadavg()}; SQLite {sqlite3.sqlite_version}", flush=True)
work = tempfile.mkdtemp(prefix="lldropidx-", dir="/tmp")
try:
    paths = {k: os.path.join(work, f"{k}.db") for k in DBS}
    url0 = f"sqlite:///{paths['with']}"
    t = time.perf_counter()
    upgrade(url0)
    eng = make_engine(url0)
    hist = lib.history(1, HIST)
    for i in range(0, len(hist), 500):
        with eng.begin() as c:
            record_logins(c, hist[i:i + 500])
    eng.dispose()
    c = sqlite3.connect(paths["with"])
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    shutil.copyfile(paths["with"], paths["without"])
    c = sqlite3.connect(paths["without"])
    c.execute(f"DROP INDEX {lib.INDEX}")
    c.commit()
    c.close()
    for k in DBS:
        c = sqlite3.connect(paths[k])
        c.execute("VACUUM")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        idx = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index' AND "
                                       "tbl_name='login_events' ORDER BY name")]
        ver = c.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        print(f"file {k}: alembic {ver}; login_events indexes: {idx}", flush=True)
        c.close()
    print(f"# filled {HIST} logins in {time.perf_counter() - t:.1f} s", flush=True)
    for k in DBS:
        sizes(paths[k], f"after fill + VACUUM, {k} index")

    engines = {k: make_engine(f"sqlite:///{paths[k]}") for k in DBS}
    writers = {k: SqliteWriter(engines[k]) for k in DBS}
    for k in DBS:           # as the writer sees it
        conn = writers[k]._conn()
        print(f"writer {k}: journal_mode {conn.execute('PRAGMA journal_mode').fetchone()[0]}, "
              f"synchronous {conn.execute('PRAGMA synchronous').fetchone()[0]} (2 = FULL)", flush=True)

    rnd, orng = random.Random(7), random.Random(77)
    seq = 0
    counts = {k: [0, 0] for k in DBS}

    def tasks(na, nb, nc):
        global seq
        ts = ["a"] * na + ["b"] * nb + ["c"] * nc
        orng.shuffle(ts)
        out = []
        for kind in ts:
            seq += 100
            recs = ([lib.single(rnd, seq, "unloc")] if kind == "a" else
                    [lib.single(rnd, seq, "country")] if kind == "b" else lib.fresh_batch(rnd, seq, B))
            out.append((kind, recs))
        return out

    def commit(kind, recs, out=None):
        o = list(DBS)
        orng.shuffle(o)
        got = []
        for k in o:
            flagged = []
            c0, p0, w0 = time.thread_time_ns(), time.process_time_ns(), time.perf_counter()
            n = writers[k].write(recs, flagged)
            w, p, c = time.perf_counter() - w0, time.process_time_ns() - p0, time.thread_time_ns() - c0
            counts[k][0] += n
            counts[k][1] += len(flagged)
            got.append((n, sorted(map(str, flagged))))
            if out is not None:
                out[(kind, k)].append((c, p, w))
        assert got[0] == got[1], (kind, got)

    for kind, recs in tasks(WARM, WARM, WARM // 5):
        commit(kind, recs)
    print(f"warm-up: {WARM} a, {WARM} b, {WARM // 5} c commits", flush=True)
    res = {}
    for rd in range(ROUNDS):
        ts = tasks(N, N, NB)
        out = {(kd, k): [] for kd in "abc" for k in DBS}
        w0 = time.perf_counter()
        for kind, recs in ts:
            commit(kind, recs, out)
        print(f"round {rd}: {len(ts)} commits x 2 files in {time.perf_counter() - w0:.1f} s; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        for key, v in out.items():
            x = (sum(c for c, _, _ in v) / len(v) / 1e6, sum(p for _, p, _ in v) / len(v) / 1e6,
                 statistics.median(w for _, _, w in v) * 1e3, statistics.median(c for c, _, _ in v) / 1e6)
            res.setdefault(key, []).append(x)
            print(f"round {rd} {key[0]} {key[1]:8} thread CPU {x[0]:.4f} ms/commit  process CPU "
                  f"{x[1]:.4f}  wall p50 {x[2]:.3f} ms  thread CPU p50 {x[3]:.4f} ms", flush=True)
    print(f"\nstored / flagged per file: {counts}")
    print(f"\n## medians over {ROUNDS} rounds (a, b: {N} commits/round; c: {NB} commits of {B}); "
          "ratio without/with per round: median (min..max); diff = with - without, us per LOGIN")
    print(f"{'variant':8} {'thrCPU with':>11} {'without':>9} {'CPU w/o / with':>24} {'diff us/login':>24} "
          f"{'procCPU w/o/with':>24} {'wall p50 with':>13} {'without':>8} {'p50 w/o / with':>24}")
    for kind in "abc":
        a, b = res[(kind, "with")], res[(kind, "without")]
        per = B if kind == "c" else 1
        rc = [y[0] / x[0] for x, y in zip(a, b)]
        rp = [y[1] / x[1] for x, y in zip(a, b)]
        rw = [y[2] / x[2] for x, y in zip(a, b)]
        dc = [(x[0] - y[0]) * 1e3 / per for x, y in zip(a, b)]
        print(f"{kind:8} {statistics.median(x[0] for x in a):11.4f} {statistics.median(x[0] for x in b):9.4f} "
              f"{statistics.median(rc):8.3f} ({min(rc):.3f}..{max(rc):.3f}) "
              f"{statistics.median(dc):8.2f} ({min(dc):.2f}..{max(dc):.2f}) "
              f"{statistics.median(rp):8.3f} ({min(rp):.3f}..{max(rp):.3f}) "
              f"{statistics.median(x[2] for x in a):13.3f} {statistics.median(x[2] for x in b):8.3f} "
              f"{statistics.median(rw):8.3f} ({min(rw):.3f}..{max(rw):.3f})")
    for kind in "abc":
        a, b = res[(kind, "with")], res[(kind, "without")]
        r3 = [y[3] / x[3] for x, y in zip(a, b)]
        print(f"{kind}: thread CPU p50 per commit with {statistics.median(x[3] for x in a):.4f} ms, without "
              f"{statistics.median(x[3] for x in b):.4f} ms; ratio of per-commit medians without/with "
              f"{statistics.median(r3):.3f} ({min(r3):.3f}..{max(r3):.3f}); per round " + " ".join(f"{r:.3f}" for r in r3))
    print("per-round thread-CPU ratios without/with:")
    for kind in "abc":
        a, b = res[(kind, "with")], res[(kind, "without")]
        print(f"  {kind}: " + " ".join(f"{y[0] / x[0]:.3f}" for x, y in zip(a, b)))
    for k in DBS:
        writers[k].close()
        engines[k].dispose()
    for k in DBS:
        c = sqlite3.connect(paths[k])
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.close()
        sizes(paths[k], f"after the run (checkpointed, no VACUUM), {k} index")
    print(f"# ended {dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC; load {os.getloadavg()}")
finally:
    shutil.rmtree(work, ignore_errors=True)
