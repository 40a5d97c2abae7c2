"""Review of 52a7e18 on PostgreSQL: the migration (and its downgrade) against a
writer (one-row INSERTs into login_events every 20 ms, each timed) and, in
scenario B, a reader holding a long statement's lock on login_events (as the
daily catch-up's up-to-60 s statement, or a dashboard report, does).

    python exp_lock_pg.py N
"""
import datetime as dt
import sys
import threading
import time
import uuid

import sqlalchemy as sa

from app.db.migrate import downgrade, upgrade
from app.db.partitions import ensure_partitions, months_from
from tests.harness.pg import start_server

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from exp_index_pg import END, FILL, START  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 400_000
INSERT = ("INSERT INTO login_events (event_id, occurred_at, username, protocol, outcome) "
          "VALUES (:e, now(), 'w@example.com', 'imap', 'allowed')")


class Writer(threading.Thread):
    def __init__(self, url):
        super().__init__(daemon=True)
        self.eng = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        self.lat = []          # (start offset s, seconds)
        self.errors = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        with self.eng.connect() as c:
            c.exec_driver_sql("SET lock_timeout = '30s'")
            while not self.stop.is_set():
                s = time.monotonic()
                try:
                    c.execute(sa.text(INSERT), {"e": uuid.uuid4()})
                except Exception as exc:  # noqa: BLE001
                    self.errors.append(repr(exc)[:200])
                self.lat.append((s - self.t0, time.monotonic() - s))
                time.sleep(0.02)

    def report(self, label):
        worst = max(self.lat, key=lambda x: x[1])
        slow = [x for x in self.lat if x[1] > 0.1]
        print(f"  writer [{label}]: {len(self.lat)} inserts, max {worst[1]*1000:.0f} ms "
              f"(started at +{worst[0]:.2f} s), {len(slow)} over 100 ms, errors {self.errors[:2]}")


def timed(fn, *args):
    t0 = time.monotonic()
    try:
        fn(*args)
        return time.monotonic() - t0, "ok"
    except Exception as exc:  # noqa: BLE001
        return time.monotonic() - t0, type(exc).__name__ + ": " + str(exc).splitlines()[0][:160]


def main():
    pg = start_server()
    try:
        admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql("CREATE DATABASE d")
        url = pg.url("d")
        upgrade(url, "6b1e2f4a9d30")
        eng = sa.create_engine(url)
        with eng.begin() as c:
            ensure_partitions(c, months_from(START, 14))
            c.execute(sa.text(FILL), {"n": N, "start": START, "end": END})
        with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql("VACUUM ANALYZE login_events")
            parts = c.execute(sa.text("SELECT count(*) FROM pg_inherits i JOIN pg_class p "
                                      "ON p.oid = i.inhparent WHERE p.relname = 'login_events'")).scalar()
        print(f"{N} rows, {parts} partitions")

        print("A: upgrade (DROP INDEX) with a writer only")
        w = Writer(url); w.start(); time.sleep(0.5)
        print("  upgrade:", timed(upgrade, url)); time.sleep(0.5); w.stop.set(); w.join(); w.report("A")

        print("A': downgrade (CREATE INDEX again) with a writer only")
        w = Writer(url); w.start(); time.sleep(0.5)
        print("  downgrade:", timed(downgrade, url, "6b1e2f4a9d30")); time.sleep(0.5)
        w.stop.set(); w.join(); w.report("A'")

        print("B: upgrade while a reader holds a 20 s statement on login_events")
        reader = eng.connect()
        rt = threading.Thread(target=lambda: reader.execute(sa.text(
            "SELECT count(*), pg_sleep(20) FROM (SELECT 1 FROM login_events LIMIT 1) x")), daemon=True)
        rt.start(); time.sleep(0.5)
        w = Writer(url); w.start(); time.sleep(0.5)
        print("  upgrade:", timed(upgrade, url)); time.sleep(0.5); w.stop.set(); w.join(); w.report("B")
        with admin.connect() as c:
            c.execute(sa.text("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                              "WHERE query LIKE '%%pg_sleep(20)%%' AND pid <> pg_backend_pid()"))
        rt.join()
        reader.close()
        with eng.connect() as c:
            print("  revision after B:", c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar())
        eng.dispose()
        admin.dispose()
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
