"""Review of 2e042ae: does the commit floor ever answer a login it did not commit?
Its INSERT made to fail (a NOT VALID CHECK (false)), then fixed; then its
backend terminated. Each phase: 10 logins, one at a time (3 s timeout each).

    python exp_floor_fail.py
"""
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from app.protocol import build_request
from bench.handler import FIELDS, NullHandler
from tests.harness.pg import start_server
from tests.harness.postlogin import answered


def main():
    pg = start_server()
    workdir = Path(tempfile.mkdtemp(prefix="r9fail-", dir="/tmp"))
    url = pg.url()
    eng = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    floor = NullHandler(workdir, str(workdir / "floor.sock"), commit=url)
    try:
        def phase(label, prefix):
            with eng.connect() as c:
                before = c.execute(sa.text("SELECT count(*) FROM bench_commit_floor")).scalar()
            t0 = time.monotonic()
            ok = sum(answered(floor.path, build_request(b"192.0.2.25", b"198.51.100.7",
                                                        f"{prefix}{i}@x".encode(), FIELDS), 3.0)
                     for i in range(10))
            with eng.connect() as c:
                after = c.execute(sa.text("SELECT count(*) FROM bench_commit_floor")).scalar()
            print(f"{label:45s} answered {ok:2d}/10, rows committed {after - before:2d}, "
                  f"{time.monotonic() - t0:.1f} s", flush=True)

        phase("healthy", "a")
        with eng.connect() as c:
            c.exec_driver_sql("ALTER TABLE bench_commit_floor ADD CONSTRAINT nope CHECK (false) NOT VALID")
        phase("INSERT fails (CHECK false)", "b")
        with eng.connect() as c:
            c.exec_driver_sql("ALTER TABLE bench_commit_floor DROP CONSTRAINT nope")
        phase("constraint dropped again", "c")
        with eng.connect() as c:
            c.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                              "query LIKE '%%bench_commit_floor%%' AND pid <> pg_backend_pid()")
        time.sleep(0.5)
        phase("its backend terminated", "d")
        phase("  and again (no reconnect?)", "e")
    finally:
        floor.stop()
        eng.dispose()
        pg.stop()


if __name__ == "__main__":
    main()
