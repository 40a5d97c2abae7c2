"""Review of 52a7e18 on PostgreSQL: plans and times of the queries that read
login_events, with and without ix_login_events_username_country, on a history
of N rows (generate_series); then the migration against a concurrent reader
and writer.

Two databases, made from one template at 6b1e2f4a9d30 (with the index): "with"
stays there, "without" is upgraded to head (0c86145f3b85, the drop). Each query
runs REPS times per database, interleaved in random order; EXPLAIN ANALYZE
execution times, medians.

    python exp_index_pg.py N REPS
"""
import datetime as dt
import random
import statistics
import sys
import threading
import time

import sqlalchemy as sa

from app.db.migrate import upgrade
from app.db.partitions import ensure_partitions, months_from
from tests.harness.pg import start_server

N = int(sys.argv[1]) if len(sys.argv) > 1 else 400_000
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 7

END = dt.datetime(2026, 11, 27, 6, 0, tzinfo=dt.timezone.utc)
START = END - dt.timedelta(days=365)

FILL = """
INSERT INTO login_events (event_id, occurred_at, username, protocol, remote_ip, local_ip,
                          outcome, host, country, asn, policy_applied, new_location)
SELECT gen_random_uuid(),
       :start + (i::float8 / :n) * (:end - :start),
       CASE WHEN i % 10 = 0 THEN 'heavy@example.com'          -- one user with 10 % of all
            ELSE 'u' || (hashint4(i) & 4095) || '@example.com' END,
       CASE WHEN i % 3 = 0 THEN 'pop3' ELSE 'imap' END,
       ('10.' || (i % 250) || '.' || (i / 250 % 250) || '.' || (i % 7))::inet,
       '192.0.2.1'::inet,
       CASE WHEN i % 20 = 0 THEN 'denied' WHEN i % 20 = 1 THEN 'failed' ELSE 'allowed' END,
       'mx' || (i % 3),
       CASE WHEN i % 5 = 4 THEN NULL
            ELSE (ARRAY['DE','AT','CH','FR','NL','BE','PL','IT','ES','US'])[1 + (i / 7) % 10] END,
       CASE WHEN i % 4 = 0 THEN NULL ELSE 3320 + (i % 13) END,
       true, false
FROM generate_series(1, :n) AS i
"""

HEAVY = "heavy@example.com"
IMPORT_WINDOW = {"lo": END - dt.timedelta(days=2), "hi": END - dt.timedelta(days=1)}
QUERIES = {
    # The new-location probe of the release before login_places (f024ad9^), which a
    # daemon still running on another host after the upgrade keeps asking per login
    # (docs/geoip.md: "A daemon of the release before, still running on another mail
    # host after the upgrade"). New country ZZ: the worst case (no row matches).
    "old_probe_heavy_new_country":
        ("SELECT EXISTS (SELECT 1 FROM login_events p WHERE p.username = :u AND p.country = 'ZZ' "
         "AND p.outcome = 'allowed' AND p.occurred_at < :t)", {"u": HEAVY, "t": END}),
    "old_probe_u7_new_country":
        ("SELECT EXISTS (SELECT 1 FROM login_events p WHERE p.username = :u AND p.country = 'ZZ' "
         "AND p.outcome = 'allowed' AND p.occurred_at < :t)", {"u": "u7@example.com", "t": END}),
    "old_probe_heavy_known_country":
        ("SELECT EXISTS (SELECT 1 FROM login_events p WHERE p.username = :u AND p.country = 'DE' "
         "AND p.outcome = 'allowed' AND p.occurred_at < :t)", {"u": HEAVY, "t": END}),
    # store._CATCH_UP_PLACES (SELECT part), the daily job's 3 days and the whole history
    "catch_up_3_days":
        ("SELECT username, country, min(occurred_at) FROM login_events WHERE outcome = 'allowed' "
         "AND country IS NOT NULL AND occurred_at >= :s GROUP BY username, country",
         {"s": END - dt.timedelta(days=3)}),
    "catch_up_all":
        ("SELECT username, country, min(occurred_at) FROM login_events WHERE outcome = 'allowed' "
         "AND country IS NOT NULL AND occurred_at >= :s GROUP BY username, country",
         {"s": START - dt.timedelta(days=1)}),
    # privacy._names
    "privacy_names":
        ("SELECT DISTINCT username FROM login_events WHERE lower(username) = lower(:u)",
         {"u": "U7@example.com"}),
    # privacy.export_user
    "export_u7":
        ("SELECT * FROM login_events WHERE username IN (:u) ORDER BY occurred_at",
         {"u": "u7@example.com"}),
    # reports.history (limit 1000 + 1)
    "history_heavy":
        ("SELECT occurred_at, protocol, outcome, remote_ip, country FROM login_events "
         "WHERE username = :u ORDER BY occurred_at DESC LIMIT 1001", {"u": HEAVY}),
    # reports.ips
    "ips_heavy": ("SELECT * FROM v_user_ips WHERE username = :u ORDER BY last_seen DESC",
                  {"u": HEAVY}),
    # reports.failed by user, 7 days
    "failed_by_user":
        ("SELECT username, count(*), count(DISTINCT remote_ip), min(occurred_at), "
         "max(occurred_at) FROM login_events WHERE outcome = 'failed' AND occurred_at >= :s "
         "GROUP BY username ORDER BY count(*) DESC LIMIT 1001",
         {"s": END - dt.timedelta(days=7)}),
    # countries of a user, as someone would ask it of the history (not in app/)
    # reports._limited's total for history (the user page of a user with > 1000 logins)
    "history_total_heavy":
        ("SELECT count(*) FROM login_events WHERE username = :u", {"u": HEAVY}),
    # importer._unrecorded (500 names, a window of a day)
    "importer_window":
        ("SELECT username, protocol, remote_ip, occurred_at FROM login_events WHERE username IN "
         "(" + ",".join(f"'u{i}@example.com'" for i in range(500)) + ") AND occurred_at >= :lo "
         "AND occurred_at <= :hi", IMPORT_WINDOW),
    "adhoc_countries_of_heavy":
        ("SELECT DISTINCT country FROM login_events WHERE username = :u", {"u": HEAVY}),
}


def explain(conn, sql, params):
    rows = conn.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS) " + sql), params).scalars().all()
    ms = float(rows[-1].split(":")[1].split()[0])
    return ms, rows


def main():
    pg = start_server()
    try:
        admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql("CREATE DATABASE tmpl")
        turl = pg.url("tmpl")
        upgrade(turl, "6b1e2f4a9d30")
        eng = sa.create_engine(turl)
        t0 = time.monotonic()
        with eng.begin() as c:
            ensure_partitions(c, months_from(START, 14))
            c.execute(sa.text(FILL), {"n": N, "start": START, "end": END})
            c.execute(sa.text(
                "INSERT INTO last_logins (username, protocol, first_seen, last_seen, login_count) "
                "SELECT username, protocol, min(occurred_at), max(occurred_at), count(*) "
                "FROM login_events WHERE outcome = 'allowed' GROUP BY username, protocol"))
        eng.dispose()
        print(f"filled {N} rows in {time.monotonic() - t0:.1f} s", flush=True)
        with admin.connect() as c:
            c.exec_driver_sql("CREATE DATABASE dwith TEMPLATE tmpl")
            c.exec_driver_sql("CREATE DATABASE dwithout TEMPLATE tmpl")
        upgrade(pg.url("dwithout"))
        engines = {"with": sa.create_engine(pg.url("dwith")),
                   "without": sa.create_engine(pg.url("dwithout"))}
        for name, e in engines.items():
            with e.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.exec_driver_sql("VACUUM ANALYZE")
                idx = c.execute(sa.text(
                    "SELECT count(*) FROM pg_class WHERE relkind IN ('i','I') "
                    "AND relname LIKE '%username_country%'")).scalar()
                ver = c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
                print(f"db {name}: revision {ver}, username_country indexes (parent+partitions): {idx}")
        times = {(q, d): [] for q in QUERIES for d in engines}
        plans = {}
        conns = {d: e.connect() for d, e in engines.items()}
        for r in range(REPS):
            order = [(q, d) for q in QUERIES for d in engines]
            random.shuffle(order)
            for q, d in order:
                sql, params = QUERIES[q]
                ms, rows = explain(conns[d], sql, params)
                conns[d].rollback()
                times[(q, d)].append(ms)
                plans[(q, d)] = rows
        print(f"\nEXPLAIN ANALYZE execution time, ms, median over {REPS} (min..max); ratio without/with")
        for q in QUERIES:
            w, wo = times[(q, "with")], times[(q, "without")]
            print(f"{q:30s} with {statistics.median(w):9.3f} ({min(w):.3f}..{max(w):.3f})  "
                  f"without {statistics.median(wo):9.3f} ({min(wo):.3f}..{max(wo):.3f})  "
                  f"ratio {statistics.median(wo) / statistics.median(w):6.2f}")
        print("\nPlans (last rep):")
        for (q, d), rows in plans.items():
            print(f"--- {q} [{d}]")
            for ln in rows:
                print("    " + ln)
        for c in conns.values():
            c.close()
        for e in engines.values():
            e.dispose()
        admin.dispose()
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
