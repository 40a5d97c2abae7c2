"""Interleaved rounds: N one-login commits per variant, each variant on its own autocommit
connection (own backend), interleaved COMMIT BY COMMIT (random order in each step), so drift
and other load on the shared machine hit every variant alike. PG CPU per commit from /proc/<backend>/stat (the backend alone) and
from the whole server tree; p50 wall of the execute+fetch. Usage: bench.py ROUNDS N"""
import statistics
import sys
import time

sys.path.insert(0, "/work/notes/pgcost")
from lib import connect, cpu, cpu_tree, make_db, postmaster, write  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402
from variants import V, make_records  # noqa: E402

ROUNDS, N = int(sys.argv[1]), int(sys.argv[2])
pg = start_server()
try:
    url5 = make_db(pg, "p5")
    url17 = make_db(pg, "p17", past_months=12)
    pm = postmaster(pg)
    # name -> (url, plan_cache_mode, statement)
    spec = {
        "base": (url5, "force_generic_plan", V["base"]),
        "base_auto": (url5, "auto", V["base"]),
        "A_noprobes": (url5, "force_generic_plan", V["A_noprobes"]),
        "A_nofold": (url5, "force_generic_plan", V["A_nofold"]),
        "A_nodeliv": (url5, "force_generic_plan", V["A_nodeliv"]),
        "A_eventsonly": (url5, "force_generic_plan", V["A_eventsonly"]),
        "E_noinputprobes": (url5, "force_generic_plan", V["E_noinputprobes"]),
        "E_paramprobes": (url5, "force_generic_plan", V["E_paramprobes"]),
        "E_fold1": (url5, "force_generic_plan", V["E_fold1"]),
        "E_final2": (url5, "force_generic_plan", V["E_final2"]),
        "E_lean": (url5, "force_generic_plan", V["E_lean"]),
        "E_lean_auto": (url5, "auto", V["E_lean"]),
        "base@17parts": (url17, "force_generic_plan", V["base"]),
        "E_lean@17parts": (url17, "force_generic_plan", V["E_lean"]),
        "plain_upsert": (url5, "force_generic_plan", None),
    }
    conns = {}
    seq = 0
    for k, (u, mode, stmt) in spec.items():
        c, pid = connect(u, mode)
        conns[k] = (c, pid)
        if stmt is None:
            c.execute("CREATE TABLE IF NOT EXISTS t (u text PRIMARY KEY, n bigint)")
    # history: 3000 logins in each database, then a warm-up of 300 per variant
    for u in (url5, url17):
        c, _ = connect(u)
        for r in make_records(3000, seq, 1):
            write(c, V["base"], r)
        c.close()
    seq += 3000

    import random
    names = list(spec)
    recs_of = {}
    for k in names:                      # warm-up
        for r in make_records(300, seq, hash(k) % 1000):
            write(conns[k][0], spec[k][2], r) if spec[k][2] else None
        seq += 300
    res = {k: [] for k in names}
    for rnd in range(ROUNDS):
        recs_of = {}
        for j, k in enumerate(names):
            recs_of[k] = make_records(N, seq, rnd * 100 + j)
            seq += N
        order = random.Random(rnd)
        lat = {k: [] for k in names}
        b0 = {k: cpu(conns[k][1]) for k in names}
        t0, w0 = cpu_tree(pm), time.perf_counter()
        for i in range(N):
            ks = names[:]
            order.shuffle(ks)
            for k in ks:
                c, stmt = conns[k][0], spec[k][2]
                t = time.perf_counter()
                if stmt is None:
                    c.execute("INSERT INTO t VALUES (%s, 1) ON CONFLICT (u) DO UPDATE SET n = t.n + 1",
                              (f"u{i % 64}",), prepare=True)
                else:
                    write(c, stmt, recs_of[k][i])
                lat[k].append(time.perf_counter() - t)
        b1 = {k: cpu(conns[k][1]) for k in names}
        t1, w1 = cpu_tree(pm), time.perf_counter()
        print(f"round {rnd}: {N} commits x {len(names)} variants in {w1 - w0:.1f} s; server tree CPU "
              f"{t1 - t0:.2f} s, sum of the backends {sum(b1[k] - b0[k] for k in names):.2f} s", flush=True)
        for k in names:
            r = (statistics.median(lat[k]) * 1e3, (b1[k] - b0[k]) / N * 1e3, 0.0)
            res[k].append(r)
            print(f"round {rnd} {k:16} p50 {r[0]:.3f} ms  backend CPU {r[1]:.3f} ms", flush=True)

    print(f"\nmedians over {ROUNDS} rounds of {N} commits; ratio = backend CPU / base's in the same round "
          "(median of per-round ratios)")
    print(f"{'variant':16} {'p50 ms':>7} {'backend CPU ms':>15} {'CPU ratio':>10} {'p50 ratio':>10}")
    for k in names:
        rs = res[k]
        cr = statistics.median(a[1] / b[1] for a, b in zip(rs, res["base"]))
        pr = statistics.median(a[0] / b[0] for a, b in zip(rs, res["base"]))
        print(f"{k:16} {statistics.median(r[0] for r in rs):7.3f} {statistics.median(r[1] for r in rs):15.3f} "
              f"{cr:10.2f} {pr:10.2f}")
    for c, _ in conns.values():
        c.close()
finally:
    pg.stop()
