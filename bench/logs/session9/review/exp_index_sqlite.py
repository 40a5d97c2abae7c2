"""Review of 52a7e18 on SQLite: plans (EXPLAIN QUERY PLAN, no ANALYZE: the
daemon never runs it) and times of the queries that read login_events, with and
without ix_login_events_username_country, on N rows; and the time DROP INDEX
holds the write lock.

    python exp_index_sqlite.py DIR N REPS
"""
import random
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

from app.db.migrate import upgrade

D = Path(sys.argv[1])
N = int(sys.argv[2]) if len(sys.argv) > 2 else 400_000
REPS = int(sys.argv[3]) if len(sys.argv) > 3 else 7

FILL = """
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n)
INSERT INTO login_events (event_id, occurred_at, username, protocol, remote_ip, local_ip,
                          outcome, host, country, asn, policy_applied, new_location)
SELECT lower(hex(randomblob(16))),
       strftime('%Y-%m-%d %H:%M:%f', julianday('2025-11-27 06:00:00') + 365.0 * i / :n) || '000',
       CASE WHEN i % 10 = 0 THEN 'heavy@example.com'
            ELSE 'u' || ((i * 2654435761) % 4096) || '@example.com' END,
       CASE WHEN i % 3 = 0 THEN 'pop3' ELSE 'imap' END,
       '10.' || (i % 250) || '.' || (i / 250 % 250) || '.' || (i % 7),
       '192.0.2.1',
       CASE WHEN i % 20 = 0 THEN 'denied' WHEN i % 20 = 1 THEN 'failed' ELSE 'allowed' END,
       'mx' || (i % 3),
       CASE WHEN i % 5 = 4 THEN NULL
            ELSE substr('DEATCHFRNLBEPLITESUS', 1 + 2 * ((i / 7) % 10), 2) END,
       CASE WHEN i % 4 = 0 THEN NULL ELSE 3320 + (i % 13) END,
       1, 0
FROM s
"""
HEAVY = "heavy@example.com"
IMPORT_WINDOW = {"lo": "2026-11-25 06:00:00.000000", "hi": "2026-11-26 06:00:00.000000"}
END = "2026-11-27 06:00:00.000000"
QUERIES = {
    "old_probe_heavy_new_country":
        ("SELECT EXISTS (SELECT 1 FROM login_events p WHERE p.username = :u AND p.country = 'ZZ' "
         "AND p.outcome = 'allowed' AND p.occurred_at < :t)", {"u": HEAVY, "t": END}),
    "old_probe_u7_new_country":
        ("SELECT EXISTS (SELECT 1 FROM login_events p WHERE p.username = :u AND p.country = 'ZZ' "
         "AND p.outcome = 'allowed' AND p.occurred_at < :t)", {"u": "u7@example.com", "t": END}),
    "catch_up_3_days":
        ("SELECT username, country, min(occurred_at) FROM login_events WHERE outcome = 'allowed' "
         "AND country IS NOT NULL AND occurred_at >= :s GROUP BY username, country",
         {"s": "2026-11-24 06:00:00.000000"}),
    "catch_up_all":
        ("SELECT username, country, min(occurred_at) FROM login_events WHERE outcome = 'allowed' "
         "AND country IS NOT NULL AND occurred_at >= :s GROUP BY username, country",
         {"s": "2025-11-01 00:00:00.000000"}),
    "privacy_names":
        ("SELECT DISTINCT username FROM login_events WHERE lower(username) = lower(:u)",
         {"u": "U7@example.com"}),
    "export_u7":
        ("SELECT * FROM login_events WHERE username IN (:u) ORDER BY occurred_at",
         {"u": "u7@example.com"}),
    "history_heavy":
        ("SELECT occurred_at, protocol, outcome, remote_ip, country FROM login_events "
         "WHERE username = :u ORDER BY occurred_at DESC LIMIT 1001", {"u": HEAVY}),
    "ips_heavy": ("SELECT * FROM v_user_ips WHERE username = :u ORDER BY last_seen DESC",
                  {"u": HEAVY}),
    "failed_by_user":
        ("SELECT username, count(*), count(DISTINCT remote_ip), min(occurred_at), "
         "max(occurred_at) FROM login_events WHERE outcome = 'failed' AND occurred_at >= :s "
         "GROUP BY username ORDER BY count(*) DESC LIMIT 1001",
         {"s": "2026-11-20 06:00:00.000000"}),
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


def main():
    D.mkdir(parents=True, exist_ok=True)
    a, b = D / "with.db", D / "without.db"
    for p in D.glob("*.db*"):
        p.unlink()
    upgrade(f"sqlite:///{a}", "6b1e2f4a9d30")
    c = sqlite3.connect(a)
    t0 = time.monotonic()
    c.execute(FILL, {"n": N})
    c.commit()
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    print(f"filled {N} rows in {time.monotonic() - t0:.1f} s; sqlite {sqlite3.sqlite_version}")
    shutil.copy(a, b)
    # the migration, timed: how long a writer would wait for it
    t0 = time.monotonic()
    upgrade(f"sqlite:///{b}")
    print(f"upgrade to head (DROP INDEX) on {N} rows: {time.monotonic() - t0:.2f} s (whole alembic run)")
    c = sqlite3.connect(b)
    t0 = time.monotonic()
    c.execute("CREATE INDEX tmp_probe ON login_events (username, country)")
    c.commit()
    t1 = time.monotonic()
    c.execute("DROP INDEX tmp_probe")
    c.commit()
    print(f"bare CREATE INDEX (username, country): {t1 - t0:.2f} s; bare DROP INDEX + commit: "
          f"{time.monotonic() - t1:.3f} s")
    c.close()
    conns = {"with": sqlite3.connect(a), "without": sqlite3.connect(b)}
    for name, cn in conns.items():
        n = cn.execute("SELECT count(*) FROM sqlite_master WHERE name = "
                       "'ix_login_events_username_country'").fetchone()[0]
        st = cn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone()[0]
        print(f"db {name}: index present {n}, sqlite_stat1 present {st}")
    times = {(q, d): [] for q in QUERIES for d in conns}
    for _ in range(REPS):
        order = [(q, d) for q in QUERIES for d in conns]
        random.shuffle(order)
        for q, d in order:
            sql, params = QUERIES[q]
            t0 = time.perf_counter()
            conns[d].execute(sql, params).fetchall()
            times[(q, d)].append((time.perf_counter() - t0) * 1000)
    print(f"\nwall ms, median over {REPS} (min..max); ratio without/with")
    for q in QUERIES:
        w, wo = times[(q, "with")], times[(q, "without")]
        print(f"{q:30s} with {statistics.median(w):9.3f} ({min(w):.3f}..{max(w):.3f})  "
              f"without {statistics.median(wo):9.3f} ({min(wo):.3f}..{max(wo):.3f})  "
              f"ratio {statistics.median(wo) / statistics.median(w):6.2f}")
    print("\nEXPLAIN QUERY PLAN:")
    for q in QUERIES:
        for d, cn in conns.items():
            sql, params = QUERIES[q]
            plan = [r[3] for r in cn.execute("EXPLAIN QUERY PLAN " + sql, params)]
            print(f"--- {q} [{d}]: " + " | ".join(plan))


if __name__ == "__main__":
    main()
