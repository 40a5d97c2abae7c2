"""PG_BATCH (V0) against lean-batch variants V1..V5 (+ VB trivial baseline): backend CPU per login.

Usage: bench.py ROUNDS N WARM HIST
  One throw-away PostgreSQL (tests.harness.pg); template DB at head (app.db.migrate.upgrade), HIST
  earlier logins stored by app.db.store.record_logins (batches of 500), a table sink(username text)
  for VB, VACUUM ANALYZE; one DB per variant cloned from it (CREATE DATABASE ... TEMPLATE).
  Each variant prepared by name on its own connection (autocommit, force_generic_plan), params
  from writers.pg_params dumped as TEXT by a psycopg Transformer, run by exec_prepared.
  Per iteration: one batch of 64 and one of 8 fresh-user allowed unlocated logins (bench.handler's
  traffic); every (variant, size) exec in a random order. Backend CPU per exec from
  /proc/<backend pid>/schedstat around it.
  Then an equivalence pass (repeated users, known users, denied, re-sent batch) and a comparison of
  login_events and last_logins across the DBs.
"""
import datetime as dt
import hashlib
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, "/work/main")
sys.path.insert(0, HERE)
import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from psycopg import pq  # noqa: E402
from psycopg.adapt import PyFormat, Transformer  # noqa: E402

from app.db import writers as W  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.db.store import record_logins  # noqa: E402
from app.login import LoginRecord  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402
import variants  # noqa: E402

ROUNDS, N, WARM, HIST = (int(a) for a in sys.argv[1:5])
SIZES = (64, 8)
VAR = variants.VARIANTS
NAMES = list(VAR)


def provenance():
    import subprocess
    head = subprocess.run(["git", "-C", "/work/main", "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", "/work/main", "status", "--short"], capture_output=True,
                           text=True).stdout.strip()
    out = [f"# /work/main HEAD {head}; working tree {'DIRTY: ' + dirty if dirty else 'clean'}"]
    for f in ["app/db/writers.py", "app/db/store.py", "app/db/schema.py", "app/db/migrate.py",
              "app/login.py", "tests/harness/pg.py"]:
        out.append(f"#   {f} sha256 {hashlib.sha256(open('/work/main/' + f, 'rb').read()).hexdigest()}")
    for f in ["variants.py", "bench.py"]:
        out.append(f"#   {f} sha256 {hashlib.sha256(open(os.path.join(HERE, f), 'rb').read()).hexdigest()}")
    for k, t in VAR.items():
        out.append(f"#   {k}: {len(t)} chars sha256 {hashlib.sha256(t.encode()).hexdigest()[:16]}")
    return "\n".join(out)


def pconn(url):
    return psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True)


def cpu_ns(pid):
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


class Runner:
    def __init__(self, url, key):
        self.key = key
        self.conn = pconn(url)
        self.conn.execute("SET plan_cache_mode = force_generic_plan")
        self.pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.name = f"bc_{key}".encode()
        self.text, self.params = W._positional(VAR[key])
        res = self.conn.pgconn.prepare(self.name, self.text)
        assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        self.tx = Transformer(self.conn)

    def dump(self, recs):
        params = W.pg_params(recs)
        return self.tx.dump_sequence([params[n] for n in self.params], [PyFormat.TEXT] * len(self.params))

    def run(self, values):
        res = self.conn.pgconn.exec_prepared(self.name, values)
        if res.status == pq.ExecStatus.COMMAND_OK:
            return res.command_tuples
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise psycopg.errors.error_from_result(res, encoding="utf-8")
        self.tx.set_pgresult(res)
        row = self.tx.load_row(0, tuple)
        return row[0]


# ---- records (as bench/logs/session9/dropidx/lib.py) ------------------------------------------
NUSERS = 2000
USERS = [f"user{i:04d}.{'abcdefgh'[i % 8] * (3 + i % 5)}@example.org".encode() for i in range(NUSERS)]
COUNTRIES = ["DE", "US", "FR", "GB", "NL", "AT", "CH", "PL", "IT", "ES"] + \
    [f"Q{chr(65 + i)}" for i in range(26)] + [f"Z{chr(65 + i)}" for i in range(14)]
ASNS = [3320, 7922, 3215, 2856, 1136, 8447, 3303, 5617, 3269, 3352] + [64512 + i for i in range(40)]
HIST_START = dt.datetime(2026, 11, 1, 0, 0, tzinfo=dt.timezone.utc)
HIST_END = dt.datetime(2026, 11, 27, 6, 0, tzinfo=dt.timezone.utc)
T0 = dt.datetime(2026, 11, 27, 7, 0, tzinfo=dt.timezone.utc)


def place(rnd, ui, pool):
    r = rnd.random()
    if r < 0.85:
        return pool[ui % 10]
    if r < 0.95:
        return pool[(ui + 1 + rnd.randrange(3)) % 10]
    return pool[10 + rnd.randrange(40)]


def login(rnd, when, user, ui, kind, i):
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


def history(seed, n):
    rnd = random.Random(seed)
    span = (HIST_END - HIST_START).total_seconds()
    weights = [1.0 / (1 + i % 200) ** 0.5 for i in range(NUSERS)]
    users = rnd.choices(range(NUSERS), weights, k=n)
    out = []
    for i in range(n):
        when = HIST_START + dt.timedelta(seconds=span * i / n, microseconds=rnd.randrange(1000))
        kind = rnd.choices(["country", "asn", "unloc", "denied"], [70, 5, 20, 5])[0]
        out.append(login(rnd, when, USERS[users[i]], users[i], kind, i))
    return out


def fresh_batch(rnd, seq, size, prefix):
    """bench.handler's traffic: fresh users, allowed, no place, no alerts."""
    when = T0 + dt.timedelta(milliseconds=seq)
    return [LoginRecord(
        event_id=uuid.UUID(int=rnd.getrandbits(128), version=4),
        occurred_at=when + dt.timedelta(microseconds=j), username=f"{prefix}{seq}-{j}@example.com".encode(),
        protocol="imap", remote_ip="198.51.100.7", local_ip="192.0.2.25", outcome="allowed",
        auth_mech=b"PLAIN", host="mx1", session_id=f"b{seq:x}-{j}") for j in range(size)]


def check_batch(rnd, seq, size):
    """Unlocated, no alerts, but: users repeated within the batch (same and other protocol, distinct
    times and IPs), known users from the history, some denied; distinct times (no ties)."""
    base = T0 + dt.timedelta(hours=1, seconds=seq)
    pool = [USERS[rnd.randrange(NUSERS)] for _ in range(5)] + \
        [f"chk{seq}-{k}@example.com".encode() for k in range(5)]
    recs = []
    for j in range(size):
        u = rnd.choice(pool)
        r = LoginRecord(
            event_id=uuid.UUID(int=rnd.getrandbits(128), version=4),
            occurred_at=base + dt.timedelta(milliseconds=rnd.randrange(900)) + dt.timedelta(microseconds=j),
            username=u, protocol=rnd.choice(["imap", "pop3"]),
            remote_ip=f"203.0.113.{rnd.randrange(1, 255)}", local_ip=rnd.choice(["192.0.2.25", "192.0.2.26"]),
            outcome="denied" if rnd.random() < 0.15 else "allowed", auth_mech=b"PLAIN",
            host=rnd.choice(["mx1", "mx2"]), session_id=f"c{seq:x}-{j}",
            message=None)
        assert W.unlocated(r) and not r.alerts_shown
        recs.append(r)
    return recs


EVENTS_Q = "SELECT md5(string_agg(t::text, '|' ORDER BY t.event_id)), count(*) FROM login_events t"
LAST_Q = ("SELECT md5(string_agg(t::text, '|' ORDER BY t.username COLLATE \"C\", t.protocol)), count(*) "
          "FROM last_logins t")
PLACES_Q = "SELECT md5(string_agg(t::text, '|' ORDER BY t::text)), count(*) FROM login_places t"


def tables(url):
    c = pconn(url)
    out = {"login_events": c.execute(EVENTS_Q).fetchone(), "last_logins": c.execute(LAST_Q).fetchone(),
           "login_places": c.execute(PLACES_Q).fetchone()}
    c.close()
    return out


def compare(urls, label):
    t = {k: tables(urls[k]) for k in NAMES if k not in variants.NOT_COMPARED}
    ok = True
    for k in t:
        for tab in ("login_events", "last_logins", "login_places"):
            if k in ("V4",) and tab == "last_logins":
                continue
            same = t[k][tab] == t["V0"][tab]
            ok &= same
            print(f"{label} {k} {tab}: rows {t[k][tab][1]} md5 {t[k][tab][0]} "
                  f"{'== V0' if same else '!= V0 MISMATCH'}", flush=True)
        if k == "V4":
            print(f"{label} V4 last_logins: rows {t[k]['last_logins'][1]} (no fold; not compared)", flush=True)
    return ok


print(provenance(), flush=True)
print(f"# run: bench.py {' '.join(sys.argv[1:])}; started {dt.datetime.now(dt.timezone.utc):%H:%M:%S} UTC; "
      f"load {os.getloadavg()}", flush=True)
pg = start_server()
print(f"# server {pg.bindir} port {pg.port}", flush=True)
try:
    t = time.perf_counter()
    admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql("CREATE DATABASE tpl")
        print("# " + c.exec_driver_sql("SELECT version()").scalar_one(), flush=True)
    tpl = pg.url("tpl")
    upgrade(tpl)
    hist = history(1, HIST)
    eng = sa.create_engine(tpl)
    for i in range(0, len(hist), 500):
        with eng.begin() as c:
            record_logins(c, hist[i:i + 500])
    eng.dispose()
    c = pconn(tpl)
    for ddl in variants.EXTRA_DDL:
        c.execute(ddl)
    print("# ev_idx indexes: " + "; ".join(r[0] for r in c.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'ev_idx' ORDER BY 1")), flush=True)
    print("# login_events indexes: " + "; ".join(r[0] for r in c.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'login_events' ORDER BY 1")), flush=True)
    c.execute("VACUUM ANALYZE")
    print("# template: alembic %s; login_events, last_logins, login_places rows %s; leaf partitions %s" % (
        c.execute("SELECT version_num FROM alembic_version").fetchone()[0],
        c.execute("SELECT (SELECT count(*) FROM login_events), (SELECT count(*) FROM last_logins), "
                  "(SELECT count(*) FROM login_places)").fetchone(),
        c.execute("SELECT count(*) FROM pg_partition_tree('login_events') WHERE isleaf").fetchone()[0]),
        flush=True)
    c.close()
    with admin.connect() as c:
        for k in NAMES:
            c.exec_driver_sql(f'CREATE DATABASE "{k.lower()}" TEMPLATE tpl')
    admin.dispose()
    urls = {k: pg.url(k.lower()) for k in NAMES}
    print(f"# filled {HIST} logins, {len(NAMES)} DBs in {time.perf_counter() - t:.1f} s", flush=True)
    compare(urls, "start")
    run = {k: Runner(urls[k], k) for k in NAMES}
    tasks = [(k, s) for k in NAMES for s in SIZES]
    seq = 0
    inserted = {task: 0 for task in tasks}

    def iteration(rnd, order, acc=None):
        global seq
        seq += 1
        recs = {s: fresh_batch(rnd, seq, s, f"b{s}x") for s in SIZES}
        ts = tasks[:]
        order.shuffle(ts)
        for k, s in ts:
            r = run[k]
            values = r.dump(recs[s])
            c0 = cpu_ns(r.pid)
            w0 = time.perf_counter()
            n = r.run(values)
            w = time.perf_counter() - w0
            c1 = cpu_ns(r.pid)
            inserted[(k, s)] += n or 0
            if acc is not None:
                acc[(k, s)][0] += c1 - c0
                acc[(k, s)][1].append(w)

    rnd, order = random.Random(7), random.Random(77)
    for i in range(WARM):
        iteration(rnd, order)
    print(f"warm-up: {WARM} commits per (variant, size)", flush=True)
    res = {task: [] for task in tasks}
    for rd in range(ROUNDS):
        rnd, order = random.Random(1000 + rd), random.Random(rd)
        acc = {task: [0, []] for task in tasks}
        w0 = time.perf_counter()
        for i in range(N):
            iteration(rnd, order, acc)
        print(f"round {rd}: {N} commits x {len(tasks)} (variant, size) in {time.perf_counter() - w0:.1f} s; "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        for k, s in tasks:
            cpu_login = acc[(k, s)][0] / N / s / 1e6
            p50 = statistics.median(acc[(k, s)][1]) * 1e3
            res[(k, s)].append((cpu_login, p50))
            print(f"round {rd} {k} b{s:<3} backend CPU {cpu_login:.5f} ms/login "
                  f"({cpu_login * s:.4f} ms/commit)  client p50 {p50:.3f} ms/commit", flush=True)
    print(f"\ninserted per (variant, size): {inserted}")

    print(f"\n## summary: {ROUNDS} rounds x {N} commits per (variant, size), after {WARM} warm-up; "
          "CPU = backend on-CPU time per login (median over rounds [min-max]); "
          "ratio = median of per-round ratios to V0 of the same size [min-max]")
    for s in SIZES:
        for k in NAMES:
            cpus = [x[0] for x in res[(k, s)]]
            ratios = [x[0] / y[0] for x, y in zip(res[(k, s)], res[("V0", s)])]
            p50s = [x[1] for x in res[(k, s)]]
            print(f"b{s:<3} {k}: CPU {statistics.median(cpus) * 1e3:7.2f} us/login "
                  f"[{min(cpus) * 1e3:.2f}-{max(cpus) * 1e3:.2f}]  ratio {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}]  client p50 {statistics.median(p50s):.3f} ms/commit "
                  f"[{min(p50s):.3f}-{max(p50s):.3f}]")
    print("\n## per-commit fixed and per-login marginal CPU from the two sizes (medians of per-round fits: "
          "marginal = (C64 - C8) / 56, fixed = C8 - 8 * marginal, C = CPU per commit)")
    for k in NAMES:
        fits = []
        for (a64, _), (a8, _) in zip(res[(k, 64)], res[(k, 8)]):
            m = (a64 * 64 - a8 * 8) / 56
            fits.append((m, a8 * 8 - 8 * m))
        ms, fs = [f[0] for f in fits], [f[1] for f in fits]
        print(f"{k}: marginal {statistics.median(ms) * 1e3:6.2f} us/login [{min(ms) * 1e3:.2f}-{max(ms) * 1e3:.2f}]  "
              f"fixed {statistics.median(fs) * 1e3:6.1f} us/commit [{min(fs) * 1e3:.1f}-{max(fs) * 1e3:.1f}]")
    sys.stdout.flush()

    # ---- equivalence -----------------------------------------------------------------------------
    print("", flush=True)
    ok1 = compare(urls, "after-timing")
    rnd = random.Random(4242)
    chk = [check_batch(rnd, i, s) for i, s in enumerate([64] * 10 + [8] * 10 + [2] * 5)]
    chk.append(chk[3])                       # a batch sent again (every event a conflict)
    chk.append(chk[12][:4] + chk[5][:20])    # part again, mixed with a batch's events
    reps = sum(len(b) - len({(r.username, r.protocol) for r in b if r.outcome == "allowed"})
               - sum(r.outcome != "allowed" for r in b) for b in chk)
    print(f"check batches: {len(chk)}, {sum(map(len, chk))} records, {reps} allowed records repeating a "
          f"(username, protocol) of their batch", flush=True)
    for b in chk:
        got = {}
        for k in NAMES:
            if k in variants.NOT_COMPARED:
                continue
            got[k] = run[k].run(run[k].dump(b))
        assert len({got[k] for k in got}) == 1, got
    ok2 = compare(urls, "after-check")
    print(f"\n*** EQUIVALENCE: after timing {'OK' if ok1 else 'MISMATCH'}; after check batches "
          f"{'OK' if ok2 else 'MISMATCH'} ***", flush=True)

    # ---- plans: EXPLAIN (ANALYZE) of one fresh 64-batch per variant ---------------------------------
    rnd = random.Random(99)
    b = fresh_batch(rnd, 10 ** 6, 64, "plan")
    for k in NAMES:
        r = run[k]
        vals = r.dump(b)
        args = ", ".join("NULL" if v is None else "'" + bytes(v).decode().replace("'", "''") + "'"
                         for v in vals)
        res_ = r.conn.pgconn.exec_(
            f"EXPLAIN (ANALYZE, VERBOSE, COSTS OFF) EXECUTE \"{r.name.decode()}\"({args})".encode())
        if res_.status != pq.ExecStatus.TUPLES_OK:
            print(f"## plan {k}: {res_.error_message}")
            continue
        print(f"\n## plan {k} (64 fresh users)")
        for i in range(res_.ntuples):
            print(res_.get_value(i, 0).decode())
    for k in NAMES:
        run[k].conn.close()
finally:
    pg.stop()
    print("# server stopped", flush=True)
