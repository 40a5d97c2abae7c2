"""Old (9cc8bb6) vs new (HEAD f024ad9) new-location statements: backend CPU per commit and client p50,
commit-by-commit interleaved in a random order per commit, each variant on its OWN database (all at
HEAD's schema, cloned from one template per partition count that was filled with the same 3000-login
history through HEAD's store.record_logins), each variant of a kind fed the SAME records.
Session 7's method (bench/logs/session7/locstmt/bench.py).

Usage: bench.py ROUNDS N [WARM] [nobatch] [hist=3000]   (hist: size of the pre-filled history)
  country  PG_LEAN_COUNTRY  old vs new, 5 and 17 partitions
  asn      PG_LEAN_ASN      old vs new, 5 and 17 partitions
  allowed  PG_LEAN_ALLOWED  old vs new, 5 partitions (control; unlocated allowed logins)
  batch    PG_BATCH, 16 located logins per commit, old vs new, 5 and 17 partitions
Flag check: per commit, the set of event ids flagged new (result row's last column) of old and new
(and of 5 vs 17 partitions) must be equal."""
import datetime as dt
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402
from lib import T0, Runner, cpu_ns, fill, history, located_record, make_db, record  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402

ROUNDS, N = int(sys.argv[1]), int(sys.argv[2])
WARM = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 300
BATCH = "nobatch" not in sys.argv
HIST = next((int(a[5:]) for a in sys.argv if a.startswith("hist=")), 3000)
B = 16

KINDS = {"country": "LEAN_COUNTRY", "asn": "LEAN_ASN", "allowed": "LEAN_ALLOWED", "batch": "BATCH"}
spec = {}      # variant -> (kind, parts, ver)
for kind in KINDS:
    if kind == "batch" and not BATCH:
        continue
    for parts in ((5,) if kind == "allowed" else (5, 17)):
        for ver in ("old", "new"):
            spec[f"{kind}_p{parts}_{ver}"] = (kind, parts, ver)
names = list(spec)


def make_records(rnd, kind, seq):
    when = T0 + dt.timedelta(milliseconds=10 * seq)
    if kind == "allowed":
        return record(rnd, "unloc", when, seq)
    if kind in ("country", "asn"):
        return located_record(rnd, when, kind, seq)
    return [located_record(rnd, when + dt.timedelta(microseconds=500 * j),
                           "country" if rnd.random() < 0.6 else "asn", seq * 100 + j) for j in range(B)]


print(lib.provenance(), flush=True)
print(f"# run: bench.py {' '.join(sys.argv[1:])}; started {dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC; "
      f"load {os.getloadavg()}", flush=True)
pg = start_server()
try:
    t = time.perf_counter()
    hist = history(1, HIST)
    for parts in (5, 17):
        url = make_db(pg, f"tpl{parts}", past_months=parts - 5)
        fill(url, hist)
        c = lib.pconn(url)
        np_ = c.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'login_events'::regclass").fetchone()[0]
        counts = c.execute("SELECT (SELECT count(*) FROM login_events), (SELECT count(*) FROM last_logins), "
                           "(SELECT count(*) FROM login_places)").fetchone()
        print(f"template tpl{parts}: {np_} partitions; login_events, last_logins, login_places rows {counts}",
              flush=True)
        c.close()
    urls = {k: make_db(pg, k, template=f"tpl{spec[k][1]}") for k in names}
    print(f"databases ready in {time.perf_counter() - t:.1f} s: {names}", flush=True)
    run = {k: Runner(urls[k], spec[k][2]) for k in names}
    seq = 0
    mism = []          # (phase, commit, kind, parts, what, a, b)
    flagged = {k: 0 for k in names}
    inserted = {k: 0 for k in names}

    def commit(i, recs, order, phase, lat=None):
        out = {}
        for k in order:
            kind = spec[k][0]
            t0 = time.perf_counter()
            n, f = run[k].run(KINDS[kind], recs[kind])
            if lat is not None:
                lat[k].append(time.perf_counter() - t0)
            out[k] = f
            inserted[k] += n or 0
            flagged[k] += len(f or ())
        for kind in {spec[k][0] for k in names}:
            ks = [k for k in names if spec[k][0] == kind]
            ref = out[ks[0]]
            for k in ks[1:]:
                if out[k] != ref:
                    mism.append((phase, i, ks[0], k, sorted(map(str, ref or ())), sorted(map(str, out[k] or ()))))

    rnd = random.Random(7)
    order = random.Random(77)
    for i in range(WARM):
        seq += 1
        recs = {kind: make_records(rnd, kind, seq) for kind in KINDS}
        ks = names[:]
        order.shuffle(ks)
        commit(i, recs, ks, "warm")
    print(f"warm-up: {WARM} commits per variant; flag mismatches so far {len(mism)}", flush=True)
    res = {k: [] for k in names}
    for rd in range(ROUNDS):
        rnd = random.Random(1000 + rd)
        recs_all = []
        for i in range(N):
            seq += 1
            recs_all.append({kind: make_records(rnd, kind, seq) for kind in KINDS})
        order = random.Random(rd)
        lat = {k: [] for k in names}
        c0 = {k: cpu_ns(run[k].pid) for k in names}
        w0 = time.perf_counter()
        for i in range(N):
            ks = names[:]
            order.shuffle(ks)
            commit(i, recs_all[i], ks, f"round{rd}", lat)
        c1 = {k: cpu_ns(run[k].pid) for k in names}
        print(f"round {rd}: {N} commits x {len(names)} variants in {time.perf_counter() - w0:.1f} s; "
              f"load {os.getloadavg()[0]:.2f}; flag mismatches so far {len(mism)}", flush=True)
        for k in names:
            x = (statistics.median(lat[k]) * 1e3, (c1[k] - c0[k]) / N / 1e6)
            res[k].append(x)
            print(f"round {rd} {k:18} p50 {x[0]:.3f} ms  backend CPU {x[1]:.4f} ms/commit", flush=True)

    print(f"\ninserted events per variant (warm-up + rounds): {inserted}")
    print(f"flagged new locations per variant (warm-up + rounds): {flagged}")
    print(f"\n*** FLAG EQUIVALENCE: {len(mism)} mismatching commits "
          f"(old vs new, and 5 vs 17 partitions, of each kind; {WARM + ROUNDS * N} commits each) ***")
    for m in mism[:20]:
        print("MISMATCH", m)

    # login_places of the new DBs against the history's definition
    for k in names:
        if spec[k][2] != "new":
            continue
        bad = run[k].conn.execute(
            "WITH d AS (SELECT username, 'country' AS kind, country AS place, min(occurred_at) AS first_seen "
            "FROM login_events WHERE outcome = 'allowed' AND country IS NOT NULL GROUP BY 1, 2, 3 "
            "UNION ALL SELECT username, 'asn', asn::text, min(occurred_at) FROM login_events "
            "WHERE outcome = 'allowed' AND asn IS NOT NULL GROUP BY 1, 2, 3) "
            "SELECT (SELECT count(*) FROM login_places), (SELECT count(*) FROM d), "
            "(SELECT count(*) FROM ((SELECT * FROM d EXCEPT SELECT username, kind, place, first_seen FROM login_places) "
            "UNION ALL (SELECT username, kind, place, first_seen FROM login_places EXCEPT SELECT * FROM d)) x)").fetchone()
        print(f"login_places check {k}: table {bad[0]} rows, derived from login_events {bad[1]}, differing {bad[2]}")

    print(f"\nmedians over {ROUNDS} rounds of {N} commits per variant (commit-by-commit interleaving, "
          f"{len(names)} variants, each its own DB and backend); CPU = backend on-CPU time per commit "
          "(/proc/PID/schedstat); ratio new/old: per round, median (min..max over rounds)")
    print(f"{'kind':8} {'parts':>5} {'old CPU':>8} {'new CPU':>8} {'CPU new/old':>22} "
          f"{'old p50':>8} {'new p50':>8} {'p50 new/old':>22}")

    def ratios(a, b, i):
        return [x[i] / y[i] for x, y in zip(res[a], res[b])]

    for kind in KINDS:
        for parts in (5, 17):
            o, n = f"{kind}_p{parts}_old", f"{kind}_p{parts}_new"
            if o not in res:
                continue
            rc, rp = ratios(n, o, 1), ratios(n, o, 0)
            print(f"{kind:8} {parts:5} {statistics.median(x[1] for x in res[o]):8.4f} "
                  f"{statistics.median(x[1] for x in res[n]):8.4f} "
                  f"{statistics.median(rc):7.3f} ({min(rc):.3f}..{max(rc):.3f}) "
                  f"{statistics.median(x[0] for x in res[o]):8.3f} {statistics.median(x[0] for x in res[n]):8.3f} "
                  f"{statistics.median(rp):7.3f} ({min(rp):.3f}..{max(rp):.3f})")
    print("\nper-round CPU ratios new/old:")
    for kind in KINDS:
        for parts in (5, 17):
            o, n = f"{kind}_p{parts}_old", f"{kind}_p{parts}_new"
            if o in res:
                print(f"  {kind}_p{parts}: " + " ".join(f"{r:.3f}" for r in ratios(n, o, 1)))
    print("\n17 partitions / 5, the same statement (per-round CPU ratios, median (min..max)):")
    for kind in ("country", "asn", "batch"):
        for ver in ("old", "new"):
            a, b = f"{kind}_p17_{ver}", f"{kind}_p5_{ver}"
            if a in res:
                r = ratios(a, b, 1)
                print(f"  {kind:8} {ver}: {statistics.median(r):.3f} ({min(r):.3f}..{max(r):.3f})")
    for r in run.values():
        r.close()
    print(f"# ended {dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC; load {os.getloadavg()}")
finally:
    pg.stop()
