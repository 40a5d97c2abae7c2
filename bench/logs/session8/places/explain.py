"""Why did the new located statements get cheaper over bench.py's rounds (against the control)?
Generic plans (force_generic_plan) of old and new LEAN_COUNTRY / LEAN_ASN, EXPLAIN (ANALYZE, BUFFERS),
rolled back: on a DB as bench.py's template left it (3000-login history, VACUUM ANALYZE), then after
5300 more logins of bench.py's country mix (through record_logins) and ANALYZE.
Prints the scan nodes and execution time.  Usage: explain.py"""
import datetime as dt
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402

import lib  # noqa: E402
from lib import T0, fill, history, located_record, make_db  # noqa: E402
from app.db.store import record_logins  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402

print(lib.provenance(), flush=True)
pg = start_server()
try:
    url = make_db(pg, "e5")
    fill(url, history(1, 3000))

    def show(stage):
        c = lib.pconn(url, cursor_factory=psycopg.ClientCursor)
        c.execute("SET plan_cache_mode = force_generic_plan")
        n = c.execute("SELECT (SELECT count(*) FROM login_events), (SELECT count(*) FROM login_places), "
                      "(SELECT count(*) FROM last_logins)").fetchone()
        print(f"\n=== {stage}: login_events {n[0]}, login_places {n[1]}, last_logins {n[2]} rows")
        rec = located_record(random.Random(5), T0 + dt.timedelta(hours=5), "country", 0, fresh=0, ui=3)
        for ver in ("old", "new"):
            mod = lib.MODS[ver]
            for key, text in (("LEAN_COUNTRY", mod.PG_LEAN_COUNTRY), ("LEAN_ASN", mod.PG_LEAN_ASN)):
                r = rec if key == "LEAN_COUNTRY" else located_record(random.Random(6), rec.occurred_at, "asn", 0, fresh=0, ui=3)
                sql, names = mod._positional(text)
                c.execute(f"PREPARE s AS {sql.decode()}")
                p = mod.pg_params_one(r)
                c.execute("BEGIN")
                for _ in range(6):
                    c.execute("SAVEPOINT a")
                    plan = [x[0] for x in c.execute(
                        f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE s({', '.join(['%s'] * len(names))})",
                        [p[k] for k in names])]
                    c.execute("ROLLBACK TO SAVEPOINT a")
                c.execute("ROLLBACK")
                c.execute("DEALLOCATE s")
                scans = [re.sub(r"\s+", " ", l.strip()) for l in plan if "Scan" in l]
                et = [l.strip() for l in plan if "Execution Time" in l][0]
                print(f"--- {ver} {key}: {et}; top {plan[1].strip()}")
                for s in scans:
                    print("     ", s)
        c.close()

    show("template state (3000-login history, VACUUM ANALYZE)")
    rnd = random.Random(11)
    more = [located_record(rnd, T0 + dt.timedelta(milliseconds=10 * i), "country", i) for i in range(5300)]
    eng = sa.create_engine(url)
    for i in range(0, len(more), 100):
        with eng.begin() as c:
            record_logins(c, more[i:i + 100])
    with eng.connect() as c:
        c.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    eng.dispose()
    show("after 5300 more country logins (bench.py's mix), ANALYZE")
finally:
    pg.stop()
