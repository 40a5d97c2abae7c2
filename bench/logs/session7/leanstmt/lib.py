"""Helpers: databases on a throw-away server, statements run as PostgresWriter runs them
(prepared by name with libpq, force_generic_plan, parameters dumped as text by a Transformer,
PQexecPrepared, the one row loaded by the same adapters), backend CPU from /proc."""
import datetime as dt
import os
import random
import sys
import uuid
from pathlib import Path

sys.path.insert(0, "/work/main")
import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from psycopg import pq  # noqa: E402
from psycopg.adapt import PyFormat, Transformer  # noqa: E402

from app.db.migrate import upgrade  # noqa: E402
from app.db.partitions import ensure_partitions  # noqa: E402
from app.db.writers import _positional, pg_params_one  # noqa: E402
from app.login import LoginRecord  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def make_db(pg, name, past_months=0):
    admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    url = pg.url(name)
    upgrade(url)
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE floor_t (v bigint)")
        if past_months:
            months, y, m = [], 2026, 11
            for _ in range(past_months):
                m -= 1
                if m == 0:
                    y, m = y - 1, 12
                months.append((y, m))
            ensure_partitions(c, months)
    eng.dispose()
    return url


class Runner:
    """One connection; statements prepared by name as the writer does."""

    def __init__(self, url, stmts):
        self.conn = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True)
        self.conn.execute("SET plan_cache_mode = force_generic_plan")
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.prep = {}
        for name, text in stmts.items():
            sql, names = _positional(text)
            res = self.conn.pgconn.prepare(name.encode(), sql)
            assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
            self.prep[name] = names
        self.tx = Transformer(self.conn)

    def run(self, name, rec):
        params = pg_params_one(rec)
        names = self.prep[name]
        values = self.tx.dump_sequence([params[n] for n in names], [PyFormat.TEXT] * len(names))
        res = self.conn.pgconn.exec_prepared(name.encode(), values)
        if res.status == pq.ExecStatus.COMMAND_OK:     # L4, L4d, A_*: the command tag's count
            return res.command_tuples
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise psycopg.errors.error_from_result(res, encoding="utf-8")
        self.tx.set_pgresult(res)
        return self.tx.load_row(0, tuple)

    def close(self):
        self.conn.close()


def cpu_ns(pid):
    """CPU time of a process on the CPU, ns (schedstat), and utime+stime, s (stat)."""
    ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return ns, (int(f[11]) + int(f[12])) / CLK


T0 = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.timezone.utc)
USERS = [f"u{i}@example.com".encode() for i in range(64)]


def common_records(n, start, seed, denied=0.0):
    """The common case: one login, unlocated, no alerts; 64 users, imap/pop3; times 10 ms apart."""
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        i = start + k
        out.append(LoginRecord(
            event_id=uuid.UUID(int=rnd.getrandbits(128), version=4),
            occurred_at=T0 + dt.timedelta(milliseconds=10 * i),
            username=USERS[rnd.randrange(64)], protocol=rnd.choice(["imap", "imap", "pop3"]),
            remote_ip="198.51.100.7", local_ip="192.0.2.25",
            outcome="denied" if rnd.random() < denied else "allowed",
            auth_mech=b"PLAIN", host="mx1", session_id=f"s{i}"))
    return out
