import os
import sys
from pathlib import Path

sys.path.insert(0, "/work/main")
import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from psycopg.types.numeric import Int8Dumper  # noqa: E402

from app.db.migrate import upgrade  # noqa: E402
from app.db.partitions import ensure_partitions  # noqa: E402
from app.db.writers import pg_params_one  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def make_db(pg, name, past_months=0):
    admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    url = pg.url(name)
    upgrade(url)
    if past_months:
        eng = sa.create_engine(url)
        with eng.begin() as c:
            months, y, m = [], 2026, 11
            for _ in range(past_months):
                m -= 1
                if m == 0:
                    y, m = y - 1, 12
                months.append((y, m))
            ensure_partitions(c, months)
        eng.dispose()
    return url


def connect(url, mode="force_generic_plan"):
    conn = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True)
    conn.execute(f"SET plan_cache_mode = {mode}")
    conn.adapters.register_dumper(int, Int8Dumper)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    return conn, pid


def write(conn, stmt, rec):
    row = conn.execute(stmt, pg_params_one(rec), prepare=True).fetchone()
    return int(row[0]), list(row[3] or [])


def cpu(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def cpu_tree(root):
    total = 0.0
    for e in Path("/proc").iterdir():
        if not e.name.isdigit():
            continue
        try:
            f = (e / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(e.name) == root or int(f[1]) == root:
            total += (int(f[11]) + int(f[12])) / CLK
    return total


def postmaster(pg):
    return int(Path(pg.datadir, "postmaster.pid").read_text().split()[0])
