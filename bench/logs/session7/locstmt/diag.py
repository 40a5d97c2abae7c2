"""Why the located statements' cost grows with the history in the partition: EXPLAIN (ANALYZE,
BUFFERS) of LEAN_COUNTRY / LEAN_ASN / ONE (generic plans, rolled back) for a login from the user's home
country/ASN (seen) and from a never-seen one, after 3000 and after 40000 logins of history
(bench.py's mix, all in this month's partition). Usage: diag.py"""
import dataclasses
import datetime as dt
import random
import re
import sys

sys.path.insert(0, "/work/notes/locstmt")
import psycopg  # noqa: E402

import lib  # noqa: E402
from lib import STMTS, T0, USERS, Runner, _positional, located_record, make_db, pg_params_one  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402
import bench_history  # noqa: E402

print(lib.provenance(), flush=True)
pg = start_server()
try:
    url = make_db(pg, "d")
    r = Runner(url, {"ONE": STMTS["ONE"]})
    done = 0
    for n in (3000, 40000):
        for rec in bench_history.history(1, n, False)[done:]:
            # history() spaces n records 10 ms apart before T0: keep the earlier ones as they were
            r.run("ONE", rec)
        done = n
        cnt = r.conn.execute("SELECT count(*), count(*) FILTER (WHERE username = 'u3@example.com') FROM login_events").fetchone()
        r.conn.execute("ANALYZE login_events")
        conn = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True,
                               cursor_factory=psycopg.ClientCursor)
        conn.execute("SET plan_cache_mode = force_generic_plan")
        base = located_record(random.Random(1), T0 + dt.timedelta(minutes=1), "country", 0, fresh=0)
        base = dataclasses.replace(base, username=USERS[3])
        cases = {"country seen": dataclasses.replace(base, country=lib.COUNTRIES[3], asn=None),
                 "country new": dataclasses.replace(base, country="ZZ", asn=None),
                 "asn seen": dataclasses.replace(base, country=None, asn=lib.ASNS[3]),
                 "asn new": dataclasses.replace(base, country=None, asn=1)}
        print(f"--- history {cnt[0]} rows, user u3 {cnt[1]} rows")
        for name in ("ONE", "LEAN_COUNTRY", "LEAN_ASN"):
            sql, names = _positional(STMTS[name])
            conn.execute(f"PREPARE s AS {sql.decode()}")
            for case, rec in cases.items():
                if (name == "LEAN_COUNTRY") != (case.startswith("country")) and name != "ONE":
                    continue
                p = pg_params_one(rec)
                conn.execute("BEGIN")
                for _ in range(6):
                    conn.execute("SAVEPOINT a")
                    plan = [x[0] for x in conn.execute(
                        f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE s({', '.join(['%s'] * len(names))})",
                        [p[k] for k in names])]
                    conn.execute("ROLLBACK TO SAVEPOINT a")
                conn.execute("ROLLBACK")
                text = "\n".join(plan)
                removed = re.findall(r"Rows Removed by Filter: (\d+)", text)
                print(f"{name:13} {case:13} {[l.strip() for l in plan if 'Execution Time' in l][0]}, "
                      f"top buffers {plan[1].strip()}, rows removed by filter {removed}")
            conn.execute("DEALLOCATE s")
        conn.close()
    r.close()
finally:
    pg.stop()
