"""Settings, partition/index counts, EXPLAIN (ANALYZE, BUFFERS) of the generic plans, and an
equivalence check of the E_* variants against PG_ONE (same records incl. replays, alerts, denied)."""
import re
import sys

sys.path.insert(0, "/work/notes/pgcost")
import psycopg  # noqa: E402

from lib import connect, make_db, write  # noqa: E402
from app.db.writers import pg_params_one  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402
from variants import V, make_records  # noqa: E402

pg = start_server()
try:
    url = make_db(pg, "info")
    conn, pid = connect(url)
    print(conn.execute("SELECT version()").fetchone()[0])
    for s in ("jit", "jit_above_cost", "plan_cache_mode", "synchronous_commit", "fsync",
              "shared_buffers", "enable_partition_pruning"):
        print(s, "=", conn.execute(f"SHOW {s}").fetchone()[0])
    print("partitions of login_events:", conn.execute(
        "SELECT string_agg(c.relname, ', ' ORDER BY c.relname) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'login_events'::regclass"
    ).fetchone()[0])
    for t in ("login_events", "login_events_p202611", "last_logins", "login_alert_deliveries"):
        rows = conn.execute("SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
                            "WHERE indrelid = %s::regclass", (t,)).fetchall()
        print(f"indexes on {t}: {len(rows)}")
        for r in rows:
            print("   ", r[1])
    print("triggers on login_events_p202611:", conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'login_events_p202611'::regclass").fetchone()[0])
    # history, then EXPLAIN of generic plans
    for r in make_records(3000, 0, 1):
        write(conn, V["base"], r)
    recs = make_records(10, 5000, 2)
    rec = next(r for r in recs if r.country)
    for name in ("base", "E_lean", "A_noprobes"):
        names = []

        def repl(m):
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"
        text = re.sub(r"%\((\w+)\)s", repl, V[name])
        conn.execute(f"PREPARE s_{name} AS {text}")
        cc = psycopg.ClientCursor(conn)
        p = pg_params_one(rec)
        for k in range(6):          # the generic plan is used from the first run (force_generic_plan)
            r2 = make_records(1, 6000 + k, 10 + k)[0]
            r2 = r2.__class__(**{**r2.__dict__, "country": "DE", "asn": 3320}) if False else r2
            p = pg_params_one(rec if k == 5 else r2)
            args = ", ".join(["%s"] * len(names))
            out = cc.execute(f"EXPLAIN (ANALYZE, BUFFERS, VERBOSE, COSTS OFF) EXECUTE s_{name}({args})",
                             [p[n] for n in names]).fetchall()
        print(f"\n===== EXPLAIN ANALYZE {name} (generic plan, 6th execution, record with country) =====")
        print("\n".join(r[0] for r in out))
    conn.close()

    # equivalence: each E variant vs base, in fresh databases, same records
    recs = make_records(600, 0, 7, alerts=True, denied=True)
    # replays: 100 records again, some right away, some late
    import random
    rnd = random.Random(3)
    seq = list(recs)
    for r in rnd.sample(recs, 100):
        seq.insert(rnd.randrange(len(seq) + 1), r)
    results = {}
    for name in [n for n in V if n == "base" or n.startswith("E_")]:
        u = make_db(pg, f"eq_{name.lower()}")
        c, _ = connect(u)
        ret = [write(c, V[name], r) for r in seq]
        dump = []
        for q in ("SELECT * FROM login_events ORDER BY event_id",
                  "SELECT * FROM last_logins ORDER BY username, protocol",
                  "SELECT * FROM login_alert_deliveries ORDER BY alert_id, username"):
            dump.append(c.execute(q).fetchall())
        results[name] = (ret, dump)
        c.close()
        print(f"equiv {name}: inserted {sum(x[0] for x in ret)}, flagged {sum(len(x[1]) for x in ret)}, "
              f"events {len(dump[0])}, last_logins {len(dump[1])}, deliveries {len(dump[2])}")
    for name, res in results.items():
        if name != "base":
            print(f"equiv {name} == base:", res == results["base"],
                  "(returns", res[0] == results["base"][0], ", tables",
                  [a == b for a, b in zip(res[1], results["base"][1])], ")")
finally:
    pg.stop()
