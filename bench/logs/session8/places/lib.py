"""Helpers for old-vs-new login_places measurements (adapted from
/work/main/bench/logs/session7/locstmt/lib.py, session 7's method).

Old statements: app/db/writers.py at 9cc8bb6 (writers_9cc8bb6.py, imported as old_writers.py: the
same file with its relative imports written as app.db.* / app.*).  New statements: app.db.writers at
/work/main HEAD.  Each Runner prepares ALL of its module's _PREPARED statements by name on its own
connection, as PostgresWriter does (force_generic_plan, TEXT params by a Transformer, exec_prepared).
"""
import datetime as dt
import hashlib
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, "/work/main")
sys.path.insert(0, HERE)
import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from psycopg import pq  # noqa: E402
from psycopg.adapt import PyFormat, Transformer  # noqa: E402

from app.db.migrate import upgrade  # noqa: E402
from app.db.partitions import ensure_partitions  # noqa: E402
from app.db import writers as new_writers  # noqa: E402
from app.db.store import record_logins  # noqa: E402
from app.login import LoginRecord  # noqa: E402
import old_writers  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
MODS = {"old": old_writers, "new": new_writers}
# statement key -> prepared name (the same names in both modules)
PNAME = {"LEAN_ALLOWED": b"lastlogin_lean_allowed", "LEAN_COUNTRY": b"lastlogin_lean_country",
         "LEAN_ASN": b"lastlogin_lean_asn", "BATCH": b"lastlogin_batch"}
for _m in MODS.values():
    assert _m._PREPARED[PNAME["LEAN_ALLOWED"]] == _m._positional(_m.PG_LEAN_ALLOWED)
    assert _m._PREPARED[PNAME["LEAN_COUNTRY"]] == _m._positional(_m.PG_LEAN_COUNTRY)
    assert _m._PREPARED[PNAME["LEAN_ASN"]] == _m._positional(_m.PG_LEAN_ASN)
    assert _m._PREPARED[PNAME["BATCH"]] == _m._positional(_m.PG_BATCH)
TEXT = {(v, k): {"LEAN_ALLOWED": m.PG_LEAN_ALLOWED, "LEAN_COUNTRY": m.PG_LEAN_COUNTRY,
                 "LEAN_ASN": m.PG_LEAN_ASN, "BATCH": m.PG_BATCH}[k]
        for v, m in MODS.items() for k in PNAME}


def provenance():
    head = subprocess.run(["git", "-C", "/work/main", "log", "-1", "--format=%h %s"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", "/work/main", "status", "--short", "app/db/"],
                           capture_output=True, text=True).stdout.strip()
    old_src = hashlib.sha256(open(os.path.join(HERE, "writers_9cc8bb6.py"), "rb").read()).hexdigest()[:12]
    git_old = hashlib.sha256(subprocess.run(["git", "-C", "/work/main", "show", "9cc8bb6:app/db/writers.py"],
                                            capture_output=True).stdout).hexdigest()[:12]
    new_src = hashlib.sha256(open(new_writers.__file__, "rb").read()).hexdigest()[:12]
    return (f"# /work/main HEAD: {head}; app/db {'MODIFIED in working tree: ' + dirty if dirty else 'as committed'}\n"
            f"# old statements: 9cc8bb6:app/db/writers.py (copy writers_9cc8bb6.py sha256 {old_src}, "
            f"git {git_old}, imported as old_writers.py); new statements: HEAD app/db/writers.py "
            f"(sha256 {new_src}); params: each module's pg_params_one / pg_params\n# texts: "
            + ", ".join(f"{v}:{k} {len(t)} chars {hashlib.sha256(t.encode()).hexdigest()[:10]}"
                        for (v, k), t in TEXT.items()))


def make_db(pg, name, past_months=0, template=None):
    admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    admin.dispose()
    url = pg.url(name)
    if template:
        return url
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


def fill(url, records, batch=100):
    """Write the history through HEAD's store.record_logins (fills last_logins and login_places)."""
    eng = sa.create_engine(url)
    for i in range(0, len(records), batch):
        with eng.begin() as c:
            record_logins(c, records[i:i + batch])
    with eng.connect() as c:
        c = c.execution_options(isolation_level="AUTOCOMMIT")
        c.exec_driver_sql("VACUUM ANALYZE")
    eng.dispose()


def pconn(url, **kw):
    return psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True, **kw)


class Runner:
    """One connection; every statement of the module prepared by name as its writer does."""

    def __init__(self, url, ver):
        self.mod = MODS[ver]
        self.conn = pconn(url)
        self.conn.execute("SET plan_cache_mode = force_generic_plan")
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        for name, (text, _) in self.mod._PREPARED.items():
            res = self.conn.pgconn.prepare(name, text)
            assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        self.tx = Transformer(self.conn)

    def run(self, key, recs):
        """key: LEAN_* with one record, or BATCH with a list. Returns (command_tuples or None, flagged ids)."""
        name = PNAME[key]
        params = self.mod.pg_params(recs) if key == "BATCH" else self.mod.pg_params_one(recs)
        names = self.mod._PREPARED[name][1]
        values = self.tx.dump_sequence([params[n] for n in names], [PyFormat.TEXT] * len(names))
        res = self.conn.pgconn.exec_prepared(name, values)
        if res.status == pq.ExecStatus.COMMAND_OK:
            return res.command_tuples, None
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise psycopg.errors.error_from_result(res, encoding="utf-8")
        self.tx.set_pgresult(res)
        row = self.tx.load_row(0, tuple)
        return row[0], frozenset(row[3] or ())

    def close(self):
        self.conn.close()


def cpu_ns(pid):
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


T0 = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.timezone.utc)
USERS = [f"u{i}@example.com".encode() for i in range(64)]
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


def located_record(rnd, when, by, i, fresh=0.01, ui=None):
    """(session 7) One allowed login with a country (by='country', with an ASN 70 %) or an ASN only."""
    if ui is None and rnd.random() < fresh:
        user, ui = f"new{rnd.getrandbits(40)}@example.com".encode(), rnd.randrange(64)
    else:
        ui = rnd.randrange(64) if ui is None else ui
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


def record(rnd, kind, when, i):
    if kind == "unloc":
        return unlocated_record(rnd, when, i)
    if kind == "denied":
        return unlocated_record(rnd, when, i, "denied")
    return located_record(rnd, when, kind, i)


def history(seed, n):
    """(session 7) n earlier logins in the n*10 ms before T0: 50 % country(+ASN), 20 % ASN only,
    30 % unlocated (allowed)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        when = T0 - dt.timedelta(milliseconds=10 * (n - i))
        kind = rnd.choices(["country", "asn", "unloc"], [5, 2, 3])[0]
        out.append(record(rnd, kind, when, -i))
    return out
