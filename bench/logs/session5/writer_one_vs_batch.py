"""3,000 one-login commits through PostgresWriter with PG_BATCH (arrays) and
with PG_ONE (plain values), and a plain one-row upsert commit, interleaved,
3 rounds: the writer thread's CPU, the commit's wall time and PostgreSQL's
CPU per commit."""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import sqlalchemy as sa  # noqa: E402

from app.db.engine import make_engine  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.db.writers import PostgresWriter  # noqa: E402
from bench.dovecot_modes import cpu_of_tree  # noqa: E402
from tests.builders import record  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402

pg = start_server()
admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
with admin.connect() as c:
    c.exec_driver_sql("CREATE DATABASE lastlogin")
url = pg.url("lastlogin")
upgrade(url)
pgpid = int(Path(pg.datadir, "postmaster.pid").read_text().split()[0])
engine = make_engine(url)
one, batch = PostgresWriter(engine), PostgresWriter(engine)
batch.one_row_statement = False
plain = engine.raw_connection().driver_connection
plain.autocommit = True
plain.execute("CREATE TABLE t (u text PRIMARY KEY, n bigint)")
users = [f"u{i}@example.com".encode() for i in range(64)]
for w in (one, batch):
    for i in range(200):
        w.write([record(users[i % 64], remote_ip="192.0.2.1")])
N = 3000
results: dict[str, list[tuple[float, float, float]]] = {}


def run(name, fn):
    lat = []
    c0, p0 = time.thread_time(), cpu_of_tree(pgpid)
    for i in range(N):
        t = time.perf_counter()
        fn(i)
        lat.append(time.perf_counter() - t)
    c1, p1 = time.thread_time(), cpu_of_tree(pgpid)
    results.setdefault(name, []).append(
        (statistics.median(lat) * 1e3, (c1 - c0) / N * 1e3, (p1 - p0) / N * 1e3))
    print(f"{name:8} p50 {results[name][-1][0]:.3f} ms  client CPU {results[name][-1][1]:.3f} ms"
          f"  PostgreSQL CPU {results[name][-1][2]:.3f} ms", flush=True)


for rnd in range(3):
    recs = [record(users[i % 64], remote_ip="192.0.2.1") for i in range(2 * N)]
    run("PG_BATCH", lambda i: batch.write([recs[i]]))
    run("PG_ONE", lambda i: one.write([recs[N + i]]))
    run("plain", lambda i: plain.execute(
        "INSERT INTO t VALUES (%s, 1) ON CONFLICT (u) DO UPDATE SET n = t.n + 1",
        (f"u{i % 64}",), prepare=True))
for name, rs in results.items():
    print(f"median {name:8} p50 {statistics.median(r[0] for r in rs):.3f} ms  client CPU "
          f"{statistics.median(r[1] for r in rs):.3f} ms  PostgreSQL CPU "
          f"{statistics.median(r[2] for r in rs):.3f} ms")
one.close()
batch.close()
plain.close()
engine.dispose()
admin.dispose()
pg.stop()
