"""Backend CPU per commit of one-login statements, commit-by-commit interleaved (random order per
commit), each variant on its own connection (own backend), run as PostgresWriter runs them.
Records: the common case (one login, unlocated, no alerts), allowed unless the variant says denied.
Usage: bench.py ROUNDS N [+L4|mid]   (+L4: also L4 and L4d_denied, added after the first run;
mid: only L0, M_noagg, M_nodeliv, L2, L4, to split L0 - L2;
extra: L0, L4, L5 and the same without CHECK constraints / secondary indexes, and denied ones;
final: the candidates only: L0, L1, L2, L4, L5 and, for denied records, L0, L3, L4d, L5d)"""
import statistics
import sys
import time

sys.path.insert(0, "/work/notes/leanstmt")
from lib import Runner, common_records, cpu_ns, make_db  # noqa: E402
from stmts import A, S  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402

ROUNDS, N = int(sys.argv[1]), int(sys.argv[2])
ALL = {**S, **A}
DROP = ("ix_login_events_username_occurred_at", "ix_login_events_remote_ip_occurred_at",
        "ix_login_events_occurred_at", "ix_login_events_username_country",
        "ix_login_events_new_location_occurred_at", "ix_login_events_denied_occurred_at",
        "ix_login_events_failed_occurred_at")

pg = start_server()
try:
    dbs = {"p5": make_db(pg, "p5"), "p17": make_db(pg, "p17", past_months=12), "pk": make_db(pg, "pkonly")}
    r = Runner(dbs["pk"], {})
    for ix in DROP:
        r.conn.execute(f"DROP INDEX {ix}")
    r.close()
    # name -> (database, statement, share of denied records)
    spec = {
        "L0": ("p5", "L0", 0), "L1": ("p5", "L1", 0), "L1i": ("p5", "L1i", 0), "L2": ("p5", "L2", 0),
        "A_events": ("p5", "A_events", 0), "A_events_part": ("p5", "A_events_part", 0),
        "A_events@pkonly": ("pk", "A_events", 0), "A_last": ("p5", "A_last", 0),
        "A_floor": ("p5", "A_floor", 0),
        "L0@17parts": ("p17", "L0", 0), "L2@17parts": ("p17", "L2", 0),
        "L0_denied": ("p5", "L0", 1), "L2_denied": ("p5", "L2", 1), "L3_denied": ("p5", "L3", 1),
    }
    if sys.argv[3:] == ["+L4"]:
        spec["L4"] = ("p5", "L4", 0)
        spec["L4d_denied"] = ("p5", "L4d", 1)
    if sys.argv[3:] == ["mid"]:
        spec = {"L0": ("p5", "L0", 0), "M_noagg": ("p5", "M_noagg", 0), "M_nodeliv": ("p5", "M_nodeliv", 0),
                "L2": ("p5", "L2", 0), "L4": ("p5", "L4", 0)}
    if sys.argv[3:] == ["extra"]:
        dbs["nocheck"] = make_db(pg, "nocheck")
        r = Runner(dbs["nocheck"], {})
        for t, c in r.conn.execute("SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE contype = 'c' "
                                   "AND conrelid IN ('login_events'::regclass, 'last_logins'::regclass)").fetchall():
            print(f"nocheck: dropping {t}.{c}")
            r.conn.execute(f'ALTER TABLE {t} DROP CONSTRAINT "{c}"')
        r.close()
        spec = {"L0": ("p5", "L0", 0), "L4": ("p5", "L4", 0), "L5": ("p5", "L5", 0),
                "L4@nocheck": ("nocheck", "L4", 0), "L5@nocheck": ("nocheck", "L5", 0),
                "L4@pkonly": ("pk", "L4", 0), "L5@pkonly": ("pk", "L5", 0), "A_floor": ("p5", "A_floor", 0),
                "L0_denied": ("p5", "L0", 1), "L4d_denied": ("p5", "L4d", 1), "L5d_denied": ("p5", "L5d", 1)}
    if sys.argv[3:] == ["final"]:
        spec = {"L0": ("p5", "L0", 0), "L1": ("p5", "L1", 0), "L2": ("p5", "L2", 0), "L4": ("p5", "L4", 0),
                "L5": ("p5", "L5", 0), "L0_denied": ("p5", "L0", 1), "L3_denied": ("p5", "L3", 1),
                "L4d_denied": ("p5", "L4d", 1), "L5d_denied": ("p5", "L5d", 1)}
    seq = 0

    def recs(n, seed, denied):
        global seq
        out = common_records(n, seq, seed, denied)
        seq += n
        return out

    for db in dbs.values():      # every user and protocol in last_logins already
        r = Runner(db, S)
        for rec in recs(3000, 1, 0):
            r.run("L0", rec)
        r.close()
    names = list(spec)
    run = {k: Runner(dbs[spec[k][0]], {spec[k][1]: ALL[spec[k][1]]}) for k in names}
    for j, k in enumerate(names):        # warm: plans cached, catalog caches filled
        for rec in recs(300, 500 + j, spec[k][2]):
            run[k].run(spec[k][1], rec)
    import random
    res = {k: [] for k in names}
    for rnd in range(ROUNDS):
        rec = {k: recs(N, rnd * 100 + j, spec[k][2]) for j, k in enumerate(names)}
        order = random.Random(rnd)
        lat = {k: [] for k in names}
        c0 = {k: cpu_ns(run[k].pid) for k in names}
        w0 = time.perf_counter()
        for i in range(N):
            ks = names[:]
            order.shuffle(ks)
            for k in ks:
                t = time.perf_counter()
                run[k].run(spec[k][1], rec[k][i])
                lat[k].append(time.perf_counter() - t)
        c1 = {k: cpu_ns(run[k].pid) for k in names}
        print(f"round {rnd}: {N} commits x {len(names)} variants in {time.perf_counter() - w0:.1f} s", flush=True)
        for k in names:
            x = (statistics.median(lat[k]) * 1e3, (c1[k][0] - c0[k][0]) / N / 1e6,
                 (c1[k][1] - c0[k][1]) / N * 1e3)
            res[k].append(x)
            print(f"round {rnd} {k:16} p50 {x[0]:.3f} ms  backend CPU {x[1]:.4f} ms (schedstat) "
                  f"{x[2]:.3f} ms (stat ticks)", flush=True)
    print(f"\nmedians over {ROUNDS} rounds of {N} commits per variant (commit-by-commit interleaving); "
          "CPU = backend on-CPU time per commit from /proc/PID/schedstat; ratios: per round vs L0 of "
          "the same round (L0_denied for *_denied), median of the rounds")
    print(f"{'variant':16} {'p50 ms':>7} {'CPU ms':>7} {'CPU ratio':>9} {'p50 ratio':>9} {'CPU min..max ms':>16}")
    for k in names:
        b = res["L0_denied" if k.endswith("_denied") else "L0"]
        rs = res[k]
        cr = statistics.median(a[1] / c[1] for a, c in zip(rs, b))
        pr = statistics.median(a[0] / c[0] for a, c in zip(rs, b))
        print(f"{k:16} {statistics.median(x[0] for x in rs):7.3f} {statistics.median(x[1] for x in rs):7.4f} "
              f"{cr:9.2f} {pr:9.2f} {min(x[1] for x in rs):8.4f}..{max(x[1] for x in rs):.4f}")
    for r in run.values():
        r.close()
finally:
    import os
    import shutil
    if os.path.exists(os.path.join(pg.base, "log")):   # the server's log, kept beside the output
        shutil.copy(os.path.join(pg.base, "log"), f"bench-server-{'-'.join(sys.argv[1:])}.log")
    pg.stop()
