"""Helpers for the with/without ix_login_events_username_country measurement.

Code under test: /work/notes/dropidx/src = `git -C /work/main archive 2e042ae` (HEAD when the work
started; /work/main's working tree was being edited meanwhile: its schema.py already drops the
index and an untracked migration 0c86145f3b85 drops it, so the tree itself could not give a
"with index" database). Runner: session 8's places/lib.py Runner (every statement of
app.db.writers._PREPARED prepared by name on one connection, force_generic_plan, TEXT params
from the module's own pg_params_one / pg_params via a Transformer, exec_prepared).
"""
import datetime as dt
import hashlib
import os
import random
import sys
import uuid
from pathlib import Path

SRC = "/work/notes/dropidx/src"
if sys.path[0] != SRC:
    sys.path.insert(0, SRC)
import psycopg  # noqa: E402
from psycopg import pq  # noqa: E402
from psycopg.adapt import PyFormat, Transformer  # noqa: E402

from app.db import writers as W  # noqa: E402
from app.login import LoginRecord  # noqa: E402

assert W.__file__.startswith(SRC), W.__file__
INDEX = "ix_login_events_username_country"


def provenance():
    files = ["app/db/writers.py", "app/db/store.py", "app/db/schema.py", "app/db/migrate.py",
             "app/db/engine.py", "app/login.py", "tests/harness/pg.py"]
    return "# code: /work/notes/dropidx/src = git archive of /work/main 2e042aeed5d0 (HEAD at start)\n" + \
        "\n".join(f"#   {f} sha256 {hashlib.sha256(open(os.path.join(SRC, f), 'rb').read()).hexdigest()[:16]}"
                  for f in files) + \
        "\n#   lib.py sha256 " + hashlib.sha256(open(__file__, 'rb').read()).hexdigest()[:16]


def pconn(url, **kw):
    return psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True, **kw)


def cpu_ns(pid):
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


class Runner:
    """One connection; every statement of app.db.writers._PREPARED prepared by name, as
    PostgresWriter._conn does."""

    def __init__(self, url):
        self.conn = pconn(url)
        self.conn.execute("SET plan_cache_mode = force_generic_plan")
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        for name, (text, _) in W._PREPARED.items():
            res = self.conn.pgconn.prepare(name, text)
            assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        self.tx = Transformer(self.conn)

    def dump(self, recs):
        """As PostgresWriter.statement: the statement name and TEXT values."""
        if len(recs) == 1:
            name, params = W.one_statement(recs[0]), W.pg_params_one(recs[0])
        else:
            name, params = W._BATCH, W.pg_params(recs)
        names = W._PREPARED[name][1]
        return name, self.tx.dump_sequence([params[n] for n in names], [PyFormat.TEXT] * len(names))

    def run(self, name, values):
        res = self.conn.pgconn.exec_prepared(name, values)
        if res.status == pq.ExecStatus.COMMAND_OK:
            return res.command_tuples, 0
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise psycopg.errors.error_from_result(res, encoding="utf-8")
        self.tx.set_pgresult(res)
        row = self.tx.load_row(0, tuple)
        return row[0], len(row[3] or ())

    def close(self):
        self.conn.close()


# ---- records -------------------------------------------------------------------------------
NUSERS = 2000
USERS = [f"user{i:04d}.{'abcdefgh'[i % 8] * (3 + i % 5)}@example.org".encode() for i in range(NUSERS)]
COUNTRIES = ["DE", "US", "FR", "GB", "NL", "AT", "CH", "PL", "IT", "ES"] + \
    [f"Q{chr(65 + i)}" for i in range(26)] + [f"Z{chr(65 + i)}" for i in range(14)]
ASNS = [3320, 7922, 3215, 2856, 1136, 8447, 3303, 5617, 3269, 3352] + [64512 + i for i in range(40)]
HIST_START = dt.datetime(2026, 11, 1, 0, 0, tzinfo=dt.timezone.utc)
HIST_END = dt.datetime(2026, 11, 27, 6, 0, tzinfo=dt.timezone.utc)
T0 = dt.datetime(2026, 11, 27, 7, 0, tzinfo=dt.timezone.utc)   # the measured logins: after it


def place(rnd, ui, pool):
    r = rnd.random()
    if r < 0.85:
        return pool[ui % 10]
    if r < 0.95:
        return pool[(ui + 1 + rnd.randrange(3)) % 10]
    return pool[10 + rnd.randrange(40)]


def login(rnd, when, user, ui, kind, i):
    """kind: 'country' (ASN too, 80 %), 'asn' (ASN only), 'unloc' (allowed, no place),
    'denied' (no place)."""
    country = place(rnd, ui, COUNTRIES) if kind == "country" else None
    asn = (place(rnd, ui, ASNS) if kind == "asn" or (kind == "country" and rnd.random() < 0.8)
           else None)
    return LoginRecord(
        event_id=uuid.UUID(int=rnd.getrandbits(128), version=4), occurred_at=when,
        username=user, protocol=rnd.choice(["imap", "imap", "imap", "pop3"]),
        remote_ip=f"198.51.{rnd.randrange(256)}.{rnd.randrange(1, 255)}", local_ip="192.0.2.25",
        outcome="denied" if kind == "denied" else "allowed", auth_mech=b"PLAIN", host="mx1",
        session_id=f"s{i:x}", country=country, asn=asn,
        message="Login refused" if kind == "denied" else None)


def history(seed=1, n=50000):
    """n logins of NUSERS users (Zipf-ish: some users log in much more), evenly over
    HIST_START..HIST_END: 70 % with a country (80 % of them with an ASN too), 5 % ASN only,
    20 % allowed without a place, 5 % denied without a place."""
    rnd = random.Random(seed)
    span = (HIST_END - HIST_START).total_seconds()
    weights = [1.0 / (1 + i % 200) ** 0.5 for i in range(NUSERS)]
    users = rnd.choices(range(NUSERS), weights, k=n)
    out = []
    for i in range(n):
        when = HIST_START + dt.timedelta(seconds=span * i / n, microseconds=rnd.randrange(1000))
        kind = rnd.choices(["country", "asn", "unloc", "denied"], [70, 5, 20, 5])[0]
        ui = users[i]
        out.append(login(rnd, when, USERS[ui], ui, kind, i))
    return out


def single(rnd, seq, kind):
    """(a) kind 'unloc': an allowed login without a place of a known user; (b) 'country'."""
    ui = rnd.randrange(NUSERS)
    return login(rnd, T0 + dt.timedelta(milliseconds=seq), USERS[ui], ui, kind, seq)


def fresh_batch(rnd, seq, size, prefix="bench"):
    """bench.handler's traffic: fresh users <prefix><seq>-<j>@example.com, allowed, no place."""
    when = T0 + dt.timedelta(milliseconds=seq)
    return [LoginRecord(
        event_id=uuid.UUID(int=rnd.getrandbits(128), version=4),
        occurred_at=when + dt.timedelta(microseconds=j), username=f"{prefix}{seq}-{j}@example.com".encode(),
        protocol="imap", remote_ip="198.51.100.7", local_ip="192.0.2.25", outcome="allowed",
        auth_mech=b"PLAIN", host="mx1", session_id=f"b{seq:x}-{j}") for j in range(size)]
