"""Backend CPU per commit of the writer's one-login statements (app.db.writers at /work/main HEAD),
commit-by-commit interleaved (random order per commit), each variant on its own connection (own
backend), run as PostgresWriter runs them (prepared by name, force_generic_plan, TEXT params).
Method and runner from /work/notes/leanstmt (bench.py, lib.py).
Usage: bench.py ROUNDS N [hist]
  A: unlocated allowed:  ONE_UNLOCATED (base) vs LEAN_ALLOWED
  B: denied:             ONE_UNLOCATED (base) vs LEAN_OTHER
  C: located, country:   ONE (base) vs LEAN_COUNTRY;  ASN only: ONE (base) vs LEAN_ASN      (5 partitions)
  D: C on a database with 17 partitions (12 past months, empty; the same history as C's)
  hist: also D on 17 partitions whose history is spread over the 12 past months + this one (D17h)"""
import datetime as dt
import random
import statistics
import sys
import time

sys.path.insert(0, "/work/notes/locstmt")
from lib import STMTS, T0, Runner, cpu_ns, located_record, make_db, unlocated_record  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402

ROUNDS, N = int(sys.argv[1]), int(sys.argv[2])
HIST = sys.argv[3:] == ["hist"]

# name -> (database, statement, kind of record, baseline)
spec = {
    "A_ONE_UNLOCATED": ("p5", "ONE_UNLOCATED", "unloc", None),
    "A_LEAN_ALLOWED": ("p5", "LEAN_ALLOWED", "unloc", "A_ONE_UNLOCATED"),
    "B_ONE_UNLOCATED": ("p5", "ONE_UNLOCATED", "denied", None),
    "B_LEAN_OTHER": ("p5", "LEAN_OTHER", "denied", "B_ONE_UNLOCATED"),
    "C_ONE_country": ("p5", "ONE", "country", None),
    "C_LEAN_COUNTRY": ("p5", "LEAN_COUNTRY", "country", "C_ONE_country"),
    "C_ONE_asn": ("p5", "ONE", "asn", None),
    "C_LEAN_ASN": ("p5", "LEAN_ASN", "asn", "C_ONE_asn"),
    "D17_ONE_country": ("p17", "ONE", "country", None),
    "D17_LEAN_COUNTRY": ("p17", "LEAN_COUNTRY", "country", "D17_ONE_country"),
    "D17_ONE_asn": ("p17", "ONE", "asn", None),
    "D17_LEAN_ASN": ("p17", "LEAN_ASN", "asn", "D17_ONE_asn"),
}
if HIST:
    spec = {k: v for k, v in spec.items() if k[0] in "CD"}
    for k, v in list(spec.items()):
        if k.startswith("D17"):
            spec[k.replace("D17", "D17h")] = ("p17h", v[1], v[2], v[3] and v[3].replace("D17", "D17h"))
# cross-baselines printed too: D17 / C of the same statement (does it stay flat?)
FLAT = [(k, k.replace("D17h_", "C_").replace("D17_", "C_")) for k in spec if k.startswith("D17")]


def record(rnd, kind, when, i):
    if kind == "unloc":
        return unlocated_record(rnd, when, i)
    if kind == "denied":
        return unlocated_record(rnd, when, i, "denied")
    return located_record(rnd, when, kind, i)


def history(seed, n, spread):
    """n earlier logins: 50 % with a country (and maybe an ASN), 20 % ASN only, 30 % unlocated;
    in the last 3000*10 ms before T0, or (spread) over the 12 months before T0's and T0's month."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if spread:
            when = T0 - dt.timedelta(days=390) + dt.timedelta(seconds=390 * 86400 * i / n)
        else:
            when = T0 - dt.timedelta(milliseconds=10 * (n - i))
        kind = rnd.choices(["country", "asn", "unloc"], [5, 2, 3])[0]
        out.append(record(rnd, kind, when, -i))
    return out


import lib  # noqa: E402
print(lib.provenance(), flush=True)
pg = start_server()
try:
    dbs = {"p5": make_db(pg, "p5"), "p17": make_db(pg, "p17", past_months=12)}
    if HIST:
        dbs["p17h"] = make_db(pg, "p17h", past_months=12)
    for name, db in dbs.items():
        r = Runner(db, {"ONE": STMTS["ONE"]})
        for rec in history(1, 3000, name == "p17h"):
            r.run("ONE", rec)
        parts = r.conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'login_events'::regclass").fetchone()[0]
        dist = r.conn.execute("SELECT tableoid::regclass::text, count(*) FROM login_events GROUP BY 1 ORDER BY 1").fetchall()
        print(f"db {name}: {parts} partitions; history rows per partition {dist}", flush=True)
        r.close()
    names = list(spec)
    # every connection prepares all six of the writer's one-login statements, as the writer does
    run = {k: Runner(dbs[spec[k][0]], STMTS) for k in names}
    seq = 0

    def when():
        global seq
        seq += 1
        return T0 + dt.timedelta(milliseconds=10 * seq)

    rnd = random.Random(7)
    for k in names:        # warm: plans cached, catalog caches filled
        for i in range(300):
            run[k].run(spec[k][1], record(rnd, spec[k][2], when(), i))
    res = {k: [] for k in names}
    flagged = {k: 0 for k in names}
    for rd in range(ROUNDS):
        rnd = random.Random(1000 + rd)
        # records in step: the i-th record of every variant has about the same time
        rec = {k: [] for k in names}
        for i in range(N):
            for k in names:
                rec[k].append(record(rnd, spec[k][2], when(), i))
        order = random.Random(rd)
        lat = {k: [] for k in names}
        c0 = {k: cpu_ns(run[k].pid) for k in names}
        w0 = time.perf_counter()
        for i in range(N):
            ks = names[:]
            order.shuffle(ks)
            for k in ks:
                t = time.perf_counter()
                x = run[k].run(spec[k][1], rec[k][i])
                lat[k].append(time.perf_counter() - t)
                if not isinstance(x, int) and x[3]:
                    flagged[k] += len(x[3])
        c1 = {k: cpu_ns(run[k].pid) for k in names}
        print(f"round {rd}: {N} commits x {len(names)} variants in {time.perf_counter() - w0:.1f} s", flush=True)
        for k in names:
            x = (statistics.median(lat[k]) * 1e3, (c1[k][0] - c0[k][0]) / N / 1e6,
                 (c1[k][1] - c0[k][1]) / N * 1e3)
            res[k].append(x)
            print(f"round {rd} {k:20} p50 {x[0]:.3f} ms  backend CPU {x[1]:.4f} ms (schedstat) "
                  f"{x[2]:.3f} ms (stat ticks)", flush=True)
    print(f"\nflagged new locations per variant over the rounds: {flagged}")
    print(f"\nmedians over {ROUNDS} rounds of {N} commits per variant (commit-by-commit interleaving); "
          "CPU = backend on-CPU time per commit from /proc/PID/schedstat; ratios: per round vs the "
          "baseline of the same round, median of the rounds")
    print(f"{'variant':20} {'baseline':16} {'CPU ms':>7} {'CPU ratio':>9} {'p50 ms':>7} {'p50 ratio':>9} {'CPU min..max ms':>16}")

    def ratio(k, b, i):
        return statistics.median(a[i] / c[i] for a, c in zip(res[k], res[b]))

    for k in names:
        b = spec[k][3] or k
        rs = res[k]
        print(f"{k:20} {b:16} {statistics.median(x[1] for x in rs):7.4f} {ratio(k, b, 1):9.3f} "
              f"{statistics.median(x[0] for x in rs):7.3f} {ratio(k, b, 0):9.3f} "
              f"{min(x[1] for x in rs):8.4f}..{max(x[1] for x in rs):.4f}")
    print("\n17 partitions against 5, the same statement (per-round ratios, median):")
    for k, b in FLAT:
        print(f"{k:20} / {b:16} CPU {ratio(k, b, 1):.3f}  p50 {ratio(k, b, 0):.3f}")
    for r in run.values():
        r.close()
finally:
    import os
    import shutil
    if os.path.exists(os.path.join(pg.base, "log")):
        shutil.copy(os.path.join(pg.base, "log"), f"bench-server-{'-'.join(sys.argv[1:])}.log")
    pg.stop()
