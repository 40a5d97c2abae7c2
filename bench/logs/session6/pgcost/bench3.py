"""Focused run: baseline vs E_lean and E_split (three one-row statements chosen by the record),
plans (force_custom_plan), partitions (17) and indexes (attribution), commit-by-commit interleaving.
Also an equivalence check of E_split vs PG_ONE first. Usage: bench3.py ROUNDS N"""
import dataclasses
import random
import statistics
import sys
import time

sys.path.insert(0, "/work/notes/pgcost")
from lib import connect, cpu, cpu_tree, make_db, postmaster, write  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402
from variants import SPLIT, V, make_records, split_kind  # noqa: E402

ROUNDS, N = int(sys.argv[1]), int(sys.argv[2])
base = lambda r: V["base"]            # noqa: E731
lean = lambda r: V["E_lean"]          # noqa: E731
split = lambda r: SPLIT[split_kind(r)]  # noqa: E731


def unlocated(recs):
    return [dataclasses.replace(r, country=None, asn=None) for r in recs]


pg = start_server()
try:
    # equivalence of E_split with PG_ONE: same records (replays, alerts, denied, all kinds)
    recs = make_records(800, 0, 7, alerts=True, denied=True)
    recs += unlocated(make_records(200, 800, 8, alerts=True, denied=True))
    rnd = random.Random(3)
    seq = list(recs)
    for r in rnd.sample(recs, 150):
        seq.insert(rnd.randrange(len(seq) + 1), r)
    got = {}
    for name, f in (("base", base), ("E_split", split)):
        c, _ = connect(make_db(pg, f"eq_{name.lower()}"))
        ret = [write(c, f(r), r) for r in seq]
        tables = [c.execute(q).fetchall() for q in (
            "SELECT * FROM login_events ORDER BY event_id",
            "SELECT * FROM last_logins ORDER BY username, protocol",
            "SELECT * FROM login_alert_deliveries ORDER BY alert_id, username")]
        got[name] = (ret, tables)
        c.close()
        print(f"equiv {name}: inserted {sum(x[0] for x in ret)} of {len(seq)} writes, flagged "
              f"{sum(len(x[1]) for x in ret)}, rows {[len(t) for t in tables]}, kinds "
              f"{ {k: sum(split_kind(r) == k for r in seq) for k in SPLIT} }")
    print("equiv E_split == base:", got["E_split"] == got["base"], flush=True)

    url5 = make_db(pg, "p5")
    url17 = make_db(pg, "p17", past_months=12)
    urlfew = make_db(pg, "fewidx")
    c, _ = connect(urlfew)
    for ix in ("ix_login_events_remote_ip_occurred_at", "ix_login_events_occurred_at",
               "ix_login_events_new_location_occurred_at", "ix_login_events_denied_occurred_at",
               "ix_login_events_failed_occurred_at"):
        c.execute(f"DROP INDEX {ix}")
    c.close()
    pm = postmaster(pg)
    spec = {  # name -> (url, plan_cache_mode, statement chooser, records transform)
        "base": (url5, "force_generic_plan", base, None),
        "base_custom": (url5, "force_custom_plan", base, None),
        "E_lean": (url5, "force_generic_plan", lean, None),
        "E_split": (url5, "force_generic_plan", split, None),
        "base_nogeo": (url5, "force_generic_plan", base, unlocated),
        "E_split_nogeo": (url5, "force_generic_plan", split, unlocated),
        "base@17parts": (url17, "force_generic_plan", base, None),
        "E_split@17parts": (url17, "force_generic_plan", split, None),
        "base@3idx": (urlfew, "force_generic_plan", base, None),
        "plain_upsert": (url5, "force_generic_plan", None, None),
    }
    for u in (url5, url17, urlfew):
        c, _ = connect(u)
        if u == url5:
            c.execute("CREATE TABLE t (u text PRIMARY KEY, n bigint)")
        for r in make_records(3000, 0, 1):
            write(c, V["base"], r)
        c.close()
    seq = 3000
    conns = {k: connect(s[0], s[1]) for k, s in spec.items()}
    names = list(spec)

    def recs_for(k, n, seed):
        global seq
        rs = make_records(n, seq, seed)
        seq += n
        return spec[k][3](rs) if spec[k][3] else rs

    for k in names:
        if spec[k][2]:
            for r in recs_for(k, 300, 500 + names.index(k)):
                write(conns[k][0], spec[k][2](r), r)
    res = {k: [] for k in names}
    kinds = {k: {} for k in names}
    for rnd in range(ROUNDS):
        rec = {k: recs_for(k, N, rnd * 100 + j) for j, k in enumerate(names)}
        order = random.Random(rnd)
        lat = {k: [] for k in names}
        b0 = {k: cpu(conns[k][1]) for k in names}
        t0, w0 = cpu_tree(pm), time.perf_counter()
        for i in range(N):
            ks = names[:]
            order.shuffle(ks)
            for k in ks:
                c, f = conns[k][0], spec[k][2]
                t = time.perf_counter()
                if f is None:
                    c.execute("INSERT INTO t VALUES (%s, 1) ON CONFLICT (u) DO UPDATE SET n = t.n + 1",
                              (f"u{i % 64}",), prepare=True)
                else:
                    r = rec[k][i]
                    write(c, f(r), r)
                d = time.perf_counter() - t
                lat[k].append(d)
                if f is not None:
                    kinds[k].setdefault(split_kind(rec[k][i]), []).append(d)
        b1 = {k: cpu(conns[k][1]) for k in names}
        t1, w1 = cpu_tree(pm), time.perf_counter()
        print(f"round {rnd}: {N} commits x {len(names)} variants in {w1 - w0:.1f} s; server tree CPU "
              f"{t1 - t0:.2f} s, sum of the backends {sum(b1[k] - b0[k] for k in names):.2f} s", flush=True)
        for k in names:
            r = (statistics.median(lat[k]) * 1e3, (b1[k] - b0[k]) / N * 1e3)
            res[k].append(r)
            print(f"round {rnd} {k:16} p50 {r[0]:.3f} ms  backend CPU {r[1]:.3f} ms", flush=True)
    print(f"\nmedians over {ROUNDS} rounds of {N} commits each (commit-by-commit interleaving); "
          "ratios: per round vs base of the same round, median")
    print(f"{'variant':16} {'p50 ms':>7} {'backend CPU ms':>15} {'CPU ratio':>10} {'p50 ratio':>10}  "
          "p50 by record kind (all rounds)")
    for k in names:
        rs = res[k]
        cr = statistics.median(a[1] / b[1] for a, b in zip(rs, res["base"]))
        pr = statistics.median(a[0] / b[0] for a, b in zip(rs, res["base"]))
        kk = "  ".join(f"{kind} {statistics.median(v) * 1e3:.3f} (n={len(v)})" for kind, v in sorted(kinds[k].items()))
        print(f"{k:16} {statistics.median(r[0] for r in rs):7.3f} {statistics.median(r[1] for r in rs):15.3f} "
              f"{cr:10.2f} {pr:10.2f}  {kk}")
    for c, _ in conns.values():
        c.close()
finally:
    pg.stop()
