"""PostgreSQL 15: the writer's statements with and without ix_login_events_username_country.

Usage: pg_bench.py ROUNDS N NB [WARM] [WARMB] [HIST]
  two DBs at head (migrate.upgrade), filled with the same HIST-login history (record_logins, batches
  of 500), cloned from one template; DROP INDEX in one; VACUUM ANALYZE both.
  a: one unlocated allowed login per commit (writers.one_statement -> lastlogin_lean_allowed)
  b: one allowed login with a country (-> lastlogin_lean_country)
  c: 64 fresh-user unlocated allowed logins per commit (-> lastlogin_batch, pg_params)
  Per round: N a-commits, N b-commits, NB c-commits, shuffled; each commit goes to both DBs in a
  random order. Backend CPU per exec from /proc/<pid>/schedstat around it; client wall per exec.
"""
import datetime as dt
import os
import random
import statistics
import sys
import time

sys.path.insert(0, "/work/notes/dropidx")
import lib  # noqa: E402
from lib import W, Runner, cpu_ns, pconn  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.db.store import record_logins  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402

ROUNDS, N, NB = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
WARM = int(sys.argv[4]) if len(sys.argv) > 4 else 300
WARMB = int(sys.argv[5]) if len(sys.argv) > 5 else 60
HIST = int(sys.argv[6]) if len(sys.argv) > 6 else 50000
B = 64
DBS = ("with", "without")
EXPECT = {"a": W._LEAN_ALLOWED, "b": W._LEAN_COUNTRY, "c": W._BATCH}

SIZES = """
SELECT i.indexrelid::regclass::text AS parent,
       (SELECT sum(pg_relation_size(t.relid)) FROM pg_partition_tree(i.indexrelid) t) AS bytes
FROM pg_index i WHERE i.indrelid = 'login_events'::regclass ORDER BY 1"""
TABLE = """SELECT (SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree('login_events')),
                  (SELECT sum(pg_table_size(relid)) FROM pg_partition_tree('login_events')),
                  (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('login_events')),
                  (SELECT count(*) FROM login_events),
                  (SELECT count(*) FROM pg_partition_tree('login_events') WHERE isleaf)"""


def sizes(url, label):
    c = pconn(url)
    rows = c.execute(SIZES).fetchall()
    heap, tbl, total, n, parts = c.execute(TABLE).fetchone()
    lp = c.execute("SELECT pg_total_relation_size('login_places'), pg_total_relation_size('last_logins'),"
                   " (SELECT count(*) FROM login_places), (SELECT count(*) FROM last_logins)").fetchone()
    c.close()
    idx = sum(b for _, b in rows)
    print(f"\n## sizes {label}: login_events {n} rows in {parts} leaf partitions; heap (main fork) "
          f"{heap} B, table (heap+fsm+vm+toast) {tbl} B, all indexes {idx} B, total {total} B")
    for name, b in rows:
        print(f"   {name:45} {b:>11} B  {b / n:7.1f} B/row  {100 * b / total:5.1f} % of total  "
              f"{100 * b / idx:5.1f} % of indexes")
    print(f"   login_places total {lp[0]} B ({lp[2]} rows), last_logins total {lp[1]} B ({lp[3]} rows)")
    return dict(rows), total


print(lib.provenance(), flush=True)
print(f"# run: pg_bench.py {' '.join(sys.argv[1:])}; started {dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC; "
      f"load {os.getloadavg()}", flush=True)
pg = start_server()
print(f"# server {pg.bindir} port {pg.port} base {pg.base}", flush=True)
try:
    t = time.perf_counter()
    admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql("CREATE DATABASE tpl")
        print("# " + c.exec_driver_sql("SELECT version()").scalar_one(), flush=True)
    tpl = pg.url("tpl")
    upgrade(tpl)
    hist = lib.history(1, HIST)
    eng = sa.create_engine(tpl)
    for i in range(0, len(hist), 500):
        with eng.begin() as c:
            record_logins(c, hist[i:i + 500])
    eng.dispose()
    with admin.connect() as c:
        for k in DBS:
            c.exec_driver_sql(f'CREATE DATABASE "{k}" TEMPLATE tpl')
    admin.dispose()
    urls = {k: pg.url(k) for k in DBS}
    c = pconn(urls["without"])
    c.execute(f"DROP INDEX {lib.INDEX}")
    c.close()
    for k in DBS:
        c = pconn(urls[k])
        c.execute("VACUUM ANALYZE")
        ver = c.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        has = c.execute("SELECT count(*) FROM pg_class WHERE relkind IN ('i','I') AND relname ~ "
                        "'username_country'").fetchone()[0]
        parts = c.execute("SELECT string_agg(relid::text, ' ') FROM pg_partition_tree('login_events') "
                          "WHERE isleaf").fetchone()[0]
        print(f"db {k}: alembic {ver}; relations named *username_country*: {has}; partitions: {parts}",
              flush=True)
        c.close()
    print(f"# filled {HIST} logins in {time.perf_counter() - t:.1f} s", flush=True)
    size0 = {k: sizes(urls[k], f"after fill, {k} index") for k in DBS}

    run = {k: Runner(urls[k]) for k in DBS}
    stats = {"inserted": {k: 0 for k in DBS}, "flagged": {k: 0 for k in DBS}}

    def commit(kind, recs, order, out=None):
        got = []
        for k in order:
            name, values = run[k].dump(recs)
            assert name == EXPECT[kind], (kind, name)
            c0 = cpu_ns(run[k].pid)
            w0 = time.perf_counter()
            n, f = run[k].run(name, values)
            w = time.perf_counter() - w0
            c1 = cpu_ns(run[k].pid)
            stats["inserted"][k] += n or 0
            stats["flagged"][k] += f
            got.append((n, f))
            if out is not None:
                out[(kind, k)].append((c1 - c0, w))
        assert got[0] == got[1], (kind, got)

    seq = 0
    rnd = random.Random(7)
    orng = random.Random(77)

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

    for kind, recs in tasks(WARM, WARM, WARMB):
        o = list(DBS)
        orng.shuffle(o)
        commit(kind, recs, o)
    print(f"warm-up: {WARM} a, {WARM} b, {WARMB} c commits", flush=True)

    res = {}      # (kind, db) -> list per round of (cpu ms/commit mean, wall p50 ms, cpu p50 ms)
    for rd in range(ROUNDS):
        ts = tasks(N, N, NB)
        out = {(kd, k): [] for kd in "abc" for k in DBS}
        w0 = time.perf_counter()
        for kind, recs in ts:
            o = list(DBS)
            orng.shuffle(o)
            commit(kind, recs, o, out)
        print(f"round {rd}: {len(ts)} commits x 2 DBs in {time.perf_counter() - w0:.1f} s; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        for key, v in out.items():
            x = (sum(c for c, _ in v) / len(v) / 1e6, statistics.median(w for _, w in v) * 1e3,
                 statistics.median(c for c, _ in v) / 1e6)
            res.setdefault(key, []).append(x)
            print(f"round {rd} {key[0]} {key[1]:8} backend CPU mean {x[0]:.4f} ms/commit "
                  f"(p50 {x[2]:.4f})  wall p50 {x[1]:.3f} ms", flush=True)

    print(f"\ninserted: {stats['inserted']}; flagged new locations: {stats['flagged']}")
    print(f"\n## medians over {ROUNDS} rounds (a, b: {N} commits/round; c: {NB} commits of {B}); "
          "ratio without/with per round: median (min..max); diff = with - without, us per LOGIN, "
          "median (min..max) of per-round values")
    print(f"{'variant':8} {'CPU with':>9} {'without':>9} {'CPU w/o / with':>24} {'CPU diff us/login':>26} "
          f"{'wall p50 with':>13} {'without':>8} {'p50 w/o / with':>24}")
    for kind in "abc":
        a, b = res[(kind, "with")], res[(kind, "without")]
        per = B if kind == "c" else 1
        rc = [y[0] / x[0] for x, y in zip(a, b)]
        rw = [y[1] / x[1] for x, y in zip(a, b)]
        dc = [(x[0] - y[0]) * 1e3 / per for x, y in zip(a, b)]
        print(f"{kind:8} {statistics.median(x[0] for x in a):9.4f} {statistics.median(x[0] for x in b):9.4f} "
              f"{statistics.median(rc):8.3f} ({min(rc):.3f}..{max(rc):.3f}) "
              f"{statistics.median(dc):9.2f} ({min(dc):.2f}..{max(dc):.2f}) "
              f"{statistics.median(x[1] for x in a):13.3f} {statistics.median(x[1] for x in b):8.3f} "
              f"{statistics.median(rw):8.3f} ({min(rw):.3f}..{max(rw):.3f})")
    print("per-round CPU ratios without/with:")
    for kind in "abc":
        a, b = res[(kind, "with")], res[(kind, "without")]
        print(f"  {kind}: " + " ".join(f"{y[0] / x[0]:.3f}" for x, y in zip(a, b)))

    # WAL per commit: a separate, shorter interleaved pass, LSN read on a third connection
    mon = pconn(urls["with"])
    mon.execute("CHECKPOINT")
    wal = {(kd, k): [] for kd in "abc" for k in DBS}
    for kind, recs in tasks(400, 400, 40):
        o = list(DBS)
        orng.shuffle(o)
        for k in o:
            name, values = run[k].dump(recs)
            l0 = mon.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
            run[k].run(name, values)
            l1 = mon.execute("SELECT pg_current_wal_insert_lsn() - %s::pg_lsn", (str(l0),)).fetchone()[0]
            wal[(kind, k)].append(int(l1))
    mon.close()
    print("\n## WAL bytes per commit (pass after the rounds, CHECKPOINT first; 400 a, 400 b, 40 c "
          "commits per DB, interleaved; LSN from a monitor connection): mean / median; per login")
    for kind in "abc":
        per = B if kind == "c" else 1
        a, b = wal[(kind, "with")], wal[(kind, "without")]
        print(f"  {kind}: with mean {statistics.mean(a):9.0f} median {statistics.median(a):8.0f}; "
              f"without mean {statistics.mean(b):9.0f} median {statistics.median(b):8.0f}; "
              f"diff per login: mean {(statistics.mean(a) - statistics.mean(b)) / per:.0f} B, "
              f"median {(statistics.median(a) - statistics.median(b)) / per:.0f} B")

    for r in run.values():
        r.close()
    for k in DBS:
        c = pconn(urls[k])
        c.execute("VACUUM ANALYZE")
        c.close()
    size1 = {k: sizes(urls[k], f"after the run (+VACUUM ANALYZE), {k} index") for k in DBS}

    # would any other query use the index? EXPLAIN on both DBs
    heavy = lib.USERS[0].decode()
    qs = {
        "catch_up_places (store._CATCH_UP_BY_DIALECT['postgresql'], since = history start)":
            __import__("app.db.store", fromlist=["x"])._CATCH_UP_BY_DIALECT["postgresql"]
            .replace(":since", "'2026-11-01T00:00:00Z'"),
        "reports.history (username = ?, order by occurred_at desc limit 1000), heavy user":
            "SELECT occurred_at, protocol, outcome, remote_ip, country, local_ip FROM login_events "
            f"WHERE username = '{heavy}' ORDER BY occurred_at DESC LIMIT 1000",
        "reports.history, light user":
            "SELECT occurred_at, protocol, outcome, remote_ip, country, local_ip FROM login_events "
            "WHERE username = 'user0199.hhhhhhh@example.org' ORDER BY occurred_at DESC LIMIT 1000",
        "privacy.export_user (username IN (names) ORDER BY occurred_at, event_id)":
            f"SELECT * FROM login_events WHERE username IN ('{heavy}') ORDER BY occurred_at, event_id",
        "hypothetical: username AND country":
            f"SELECT 1 FROM login_events WHERE username = '{heavy}' AND country = 'DE' LIMIT 1",
    }
    for k in DBS:
        c = pconn(urls[k])
        print(f"\n## EXPLAIN, {k}-index DB, after the run (reads: ANALYZE, BUFFERS; best of 20 runs)")
        for label, q in qs.items():
            analyze = not q.lstrip().upper().startswith("INSERT")
            best, plan = None, None
            for _ in range(20 if analyze else 1):
                c.execute("BEGIN")
                plan = [r[0] for r in c.execute(("EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN ") + q).fetchall()]
                c.execute("ROLLBACK")
                if analyze:
                    t = float([x for x in plan if x.startswith("Execution Time")][0].split()[2])
                    best = t if best is None or t < best else best
            used = any("username_country" in line for line in plan)
            print(f"-- {label}: reads {lib.INDEX}: {used}" + (f"; best execution {best:.3f} ms" if analyze else ""))
            for line in plan[:14]:
                print("   " + line)
        c.close()
    print(f"# ended {dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC; load {os.getloadavg()}")
finally:
    pg.stop()
