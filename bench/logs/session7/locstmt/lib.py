"""(Copied from /work/notes/leanstmt/lib.py; located records and the writer's statements added.)
Helpers: databases on a throw-away server, statements run as PostgresWriter runs them
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
from app.db import writers  # noqa: E402
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


# The writer's statements, as app.db.writers has them (text and parameter names from writers._PREPARED).
WS = {n.decode(): writers._PREPARED[n] for n in writers._PREPARED}
assert writers._PREPARED[writers._ONE][0] == _positional(writers.PG_ONE)[0]
STMTS = {"ONE": writers.PG_ONE, "ONE_UNLOCATED": writers.PG_ONE_UNLOCATED,
         "LEAN_ALLOWED": writers.PG_LEAN_ALLOWED, "LEAN_OTHER": writers.PG_LEAN_OTHER,
         "LEAN_COUNTRY": writers.PG_LEAN_COUNTRY, "LEAN_ASN": writers.PG_LEAN_ASN}
PREPNAME = {"ONE": writers._ONE, "ONE_UNLOCATED": writers._UNLOCATED,
            "LEAN_ALLOWED": writers._LEAN_ALLOWED, "LEAN_OTHER": writers._LEAN_OTHER,
            "LEAN_COUNTRY": writers._LEAN_COUNTRY, "LEAN_ASN": writers._LEAN_ASN}
for _k, _t in STMTS.items():     # the runner's (text, names) are the writer's _PREPARED entries
    assert _positional(_t) == writers._PREPARED[PREPNAME[_k]], _k


def provenance():
    """Which writers.py the statements came from: /work/main HEAD, its state, each text's sha256."""
    import hashlib
    import subprocess
    head = subprocess.run(["git", "-C", "/work/main", "log", "-1", "--format=%h %ad %s", "--date=iso"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", "/work/main", "status", "--short", "app/db/writers.py"],
                           capture_output=True, text=True).stdout.strip()
    src = hashlib.sha256(open(writers.__file__, "rb").read()).hexdigest()[:16]
    return (f"/work/main HEAD {head}; writers.py {'MODIFIED in working tree' if dirty else 'as committed'} "
            f"(sha256 {src}); statements: "
            + ", ".join(f"{k} {len(t)} chars {hashlib.sha256(t.encode()).hexdigest()[:12]}" for k, t in STMTS.items()))

# Located records: every user has a home country and a home ASN, logs in mostly from there,
# sometimes from one of a few usual other places (seen before, most likely), rarely from any of
# 40 others (often new); a few users are new (no earlier login: the first probe says false).
COUNTRIES = ["DE", "US", "FR", "GB", "NL", "AT", "CH", "PL", "IT", "ES"] + [f"Q{chr(65 + i)}" for i in range(26)] + [f"Z{chr(65 + i)}" for i in range(14)]
ASNS = [3320, 7922, 3215, 2856, 1136, 8447, 3303, 5617, 3269, 3352] + [64512 + i for i in range(40)]


def place(rnd, user_idx, by):
    r = rnd.random()
    pool = COUNTRIES if by == "country" else ASNS
    if r < 0.85:
        return pool[user_idx % 10]
    if r < 0.95:
        return pool[(user_idx + 1 + rnd.randrange(3)) % 10]
    return pool[10 + rnd.randrange(40)]


def located_record(rnd, when, by, i, fresh=0.01):
    """One allowed login with a country (by='country', with an ASN too) or an ASN only (by='asn')."""
    if rnd.random() < fresh:
        user, ui = f"new{rnd.getrandbits(40)}@example.com".encode(), rnd.randrange(64)
    else:
        ui = rnd.randrange(64)
        user = USERS[ui]
    country = place(rnd, ui, "country") if by == "country" else None
    asn = place(rnd, ui, "asn") if by == "asn" else (ASNS[ui % 10] if rnd.random() < 0.7 else None)
    return LoginRecord(
        event_id=uuid.UUID(int=rnd.getrandbits(128), version=4), occurred_at=when,
        username=user, protocol=rnd.choice(["imap", "imap", "pop3"]),
        remote_ip="198.51.100.7", local_ip="192.0.2.25", outcome="allowed",
        auth_mech=b"PLAIN", host="mx1", session_id=f"s{i}", country=country, asn=asn)


def unlocated_record(rnd, when, i, outcome="allowed"):
    return LoginRecord(
        event_id=uuid.UUID(int=rnd.getrandbits(128), version=4), occurred_at=when,
        username=USERS[rnd.randrange(64)], protocol=rnd.choice(["imap", "imap", "pop3"]),
        remote_ip="198.51.100.7", local_ip="192.0.2.25", outcome=outcome,
        auth_mech=b"PLAIN", host="mx1", session_id=f"s{i}")
