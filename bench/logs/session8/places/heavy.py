"""Heavy user (session 7's diag.py case): u3@example.com with ~620 earlier allowed logins (its share of a
G=20000-login history in the G*10 ms before T0 + HEAVY=300 of its own, located, spread over the same
span, so its rows are spread over the heap as in session 7's 40000-row diag) logs in with an ASN only, a NEW ASN each time (200000+k), and -- as a
control in the same loop -- with its home ASN (seen).  PG_LEAN_ASN old (9cc8bb6) vs new (HEAD), each on
its OWN database (cloned from one template per partition count, filled through HEAD's
store.record_logins), committed (the user's history grows by 2 logins per rep, identically in every DB).
Backend CPU per commit from /proc/PID/schedstat read before and after each exec_prepared; per round the
mean per commit; ratio new/old per round, median (min..max).  Flags compared per commit.
Afterwards: EXPLAIN (ANALYZE, BUFFERS) of each DB's LEAN_ASN (generic plan) for one more new-ASN login,
rolled back, 5 times: the last one's execution time and top-node buffers.
Usage: heavy.py ROUNDS REPS [HEAVY_N=300 [G=20000]]"""
import datetime as dt
import os
import random
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402
from lib import ASNS, COUNTRIES, T0, USERS, Runner, cpu_ns, fill, history, make_db  # noqa: E402
from app.login import LoginRecord  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402

ROUNDS, REPS = int(sys.argv[1]), int(sys.argv[2])
HEAVY = int(sys.argv[3]) if len(sys.argv) > 3 else 300     # u3's own logins, on top of its share of G
G = int(sys.argv[4]) if len(sys.argv) > 4 else 20000        # the general history (session 7's mix)
U = 3


def heavy_history(seed, n):
    """n allowed logins of u3 spread over the G*10 ms before T0 (the general history's span):
    50 % country (+ home ASN 70 %), 50 % ASN only; home place 85 %, 3 usual others 15 %."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        when = T0 - dt.timedelta(milliseconds=10 * G * (n - i) / n + 3)
        pick = (lambda pool: pool[U % 10] if rnd.random() < 0.85 else pool[(U + 1 + rnd.randrange(3)) % 10])
        if rnd.random() < 0.5:
            country, asn = pick(COUNTRIES), (ASNS[U % 10] if rnd.random() < 0.7 else None)
        else:
            country, asn = None, pick(ASNS)
        out.append(LoginRecord(
            event_id=uuid.UUID(int=rnd.getrandbits(128), version=4), occurred_at=when, username=USERS[U],
            protocol=rnd.choice(["imap", "imap", "pop3"]), remote_ip="198.51.100.7", local_ip="192.0.2.25",
            outcome="allowed", auth_mech=b"PLAIN", host="mx1", session_id=f"h{i}", country=country, asn=asn))
    return out


def asn_login(rnd, k, asn):
    return LoginRecord(
        event_id=uuid.UUID(int=rnd.getrandbits(128), version=4),
        occurred_at=T0 + dt.timedelta(milliseconds=10 * k), username=USERS[U], protocol="imap",
        remote_ip="198.51.100.7", local_ip="192.0.2.25", outcome="allowed", auth_mech=b"PLAIN",
        host="mx1", session_id=f"k{k}", country=None, asn=asn)


print(lib.provenance(), flush=True)
print(f"# run: heavy.py {' '.join(sys.argv[1:])}; started {dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC; "
      f"load {os.getloadavg()}", flush=True)
pg = start_server()
try:
    hist = sorted(heavy_history(5, HEAVY) + history(1, G), key=lambda r: r.occurred_at)
    for parts in (5, 17):
        url = make_db(pg, f"tpl{parts}", past_months=parts - 5)
        fill(url, hist)
        c = lib.pconn(url)
        x = c.execute("SELECT count(*), count(*) FILTER (WHERE username = %s), "
                      "count(*) FILTER (WHERE username = %s AND outcome = 'allowed'), "
                      "(SELECT count(*) FROM pg_inherits WHERE inhparent = 'login_events'::regclass) "
                      "FROM login_events", [USERS[U].decode()] * 2).fetchone()
        print(f"template tpl{parts}: {x[3]} partitions, {x[0]} login_events rows, u3: {x[1]} rows "
              f"({x[2]} allowed)", flush=True)
        c.close()
    names = [f"p{p}_{v}" for p in (5, 17) for v in ("old", "new")]
    run = {k: Runner(make_db(pg, f"h{k}", template=f"tpl{k.split('_')[0][1:]}"), k.split("_")[1]) for k in names}
    cases = ("asn_new", "asn_seen")
    mism = 0
    flagged = {(k, c): 0 for k in names for c in cases}
    res = {(k, c): [] for k in names for c in cases}
    seq = 0
    warm = random.Random(3)
    for w in range(20):           # warm-up: plans, caches (same records in every DB)
        seq += 1
        rec = asn_login(warm, seq, ASNS[U % 10])
        for k in names:
            run[k].run("LEAN_ASN", rec)
    for rd in range(ROUNDS):
        rnd = random.Random(500 + rd)
        order = random.Random(rd)
        cpu = {(k, c): 0 for k in names for c in cases}
        w0 = time.perf_counter()
        for i in range(REPS):
            seq += 1
            recs = {"asn_new": asn_login(rnd, seq, 200000 + seq)}
            seq += 1
            recs["asn_seen"] = asn_login(rnd, seq, ASNS[U % 10])
            cs = list(cases)
            order.shuffle(cs)
            for c in cs:
                ks = names[:]
                order.shuffle(ks)
                out = {}
                for k in ks:
                    r = run[k]
                    a = cpu_ns(r.pid)
                    _, f = r.run("LEAN_ASN", recs[c])
                    cpu[(k, c)] += cpu_ns(r.pid) - a
                    out[k] = f
                    flagged[(k, c)] += len(f)
                if len(set(out.values())) != 1:
                    mism += 1
                    print("MISMATCH", rd, i, c, {k: sorted(map(str, v)) for k, v in out.items()})
        print(f"round {rd}: {REPS} x 2 commits x {len(names)} DBs in {time.perf_counter() - w0:.1f} s, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        for key in cpu:
            res[key].append(cpu[key] / REPS / 1e6)
            print(f"round {rd} {key[0]:8} {key[1]:9} backend CPU {cpu[key] / REPS / 1e6:.4f} ms/commit")
    c = run["p5_new"].conn
    rows = c.execute("SELECT count(*) FROM login_events WHERE username = %s", [USERS[U].decode()]).fetchone()[0]
    print(f"\nu3 rows at the end: {rows}; flagged: { {f'{k}/{c}': v for (k, c), v in flagged.items()} }")
    print(f"*** FLAG EQUIVALENCE (old vs new, 5 vs 17 partitions): {mism} mismatching commits of "
          f"{ROUNDS * REPS * 2 + 20} ***")
    print(f"\nbackend CPU ms per commit, median over {ROUNDS} rounds of {REPS}; new/old per round, "
          "median (min..max)")
    for p in (5, 17):
        for c in cases:
            o, n = res[(f"p{p}_old", c)], res[(f"p{p}_new", c)]
            r = [b / a for a, b in zip(o, n)]
            print(f"p{p:<3} {c:9} old {statistics.median(o):.4f}  new {statistics.median(n):.4f}  "
                  f"new/old {statistics.median(r):.3f} ({min(r):.3f}..{max(r):.3f})")
    import psycopg
    print("\nEXPLAIN (ANALYZE, BUFFERS) of LEAN_ASN, one more new-ASN login of u3, rolled back (5x, last shown):")
    for k in names:
        mod = lib.MODS[k.split("_")[1]]
        sql, pn = mod._positional(mod.PG_LEAN_ASN)
        ec = lib.pconn(run[k].conn.info.dsn and f"postgresql://{run[k].conn.info.user}@{run[k].conn.info.host}:{run[k].conn.info.port}/{run[k].conn.info.dbname}",
                       cursor_factory=psycopg.ClientCursor)
        ec.execute("SET plan_cache_mode = force_generic_plan")
        ec.execute(f"PREPARE s AS {sql.decode()}")
        p = mod.pg_params_one(asn_login(random.Random(9), seq + 1, 900000))
        ec.execute("BEGIN")
        for _ in range(5):
            ec.execute("SAVEPOINT a")
            plan = [x[0] for x in ec.execute(
                f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE s({', '.join(['%s'] * len(pn))})", [p[n] for n in pn])]
            ec.execute("ROLLBACK TO SAVEPOINT a")
        ec.execute("ROLLBACK")
        ec.close()
        print(f"  {k:8} {[l.strip() for l in plan if 'Execution Time' in l][0]}; top: {plan[1].strip()}")
    for r in run.values():
        r.close()
    print(f"# ended {dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC; load {os.getloadavg()}")
finally:
    pg.stop()
