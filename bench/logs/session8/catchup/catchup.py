"""Cost of the daily job's catch_up_places: 1,050,000 allowed logins within its 3-day window,
login_places complete (the migration's backfill), so it reads them all and writes nothing;
then with 1 % of the places deleted (as if stored by an older daemon)."""
import datetime as dt, random, subprocess, sys, time, uuid
import psycopg
import sqlalchemy as sa
from app.db import make_engine
from app.db.migrate import upgrade
from app.db.store import catch_up_places
from tests.harness.pg import start_server
head = subprocess.run(["git", "-C", "/work/main", "log", "-1", "--format=%h %s"], capture_output=True, text=True).stdout.strip()
print(f"# /work/main {head}; catchup.py", flush=True)
NOW = dt.datetime.now(dt.timezone.utc)
rnd = random.Random(5)
pg = start_server()
try:
    url = pg.url("postgres")
    upgrade(url)
    raw = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"))
    cur = raw.cursor()
    C = ["DE", "FR", "AT", "NL", "US", "GB", "PL", "IT"]; A = [3320, 3215, 8881, 1136, 7922, 2856, 5617, 3269]
    with cur.copy("COPY login_events (event_id, occurred_at, username, protocol, outcome, country, asn) FROM STDIN") as cp:
        for i in range(1_050_000):
            k = rnd.randrange(8) if rnd.random() < 0.2 else (i % 8)
            cp.write_row((str(uuid.uuid4()), NOW - dt.timedelta(seconds=rnd.randrange(3 * 86400 - 600)),
                          f"user{i % 20000}@example.com", "imap", "allowed", C[k], A[k]))
    raw.commit()
    cur.execute(open("/work/main/migrations/versions/2026_11_27_0500-6b1e2f4a9d30_login_places.py")
                .read().split('BACKFILL = """')[1].split('"""')[0])
    raw.commit()
    raw.autocommit = True
    cur.execute("VACUUM ANALYZE")
    print("login_places rows:", cur.execute("SELECT count(*) FROM login_places").fetchone()[0])
    eng = make_engine(url)
    for label in ("complete", "complete again"):
        t0 = time.monotonic()
        with eng.begin() as c:
            n = catch_up_places(c, NOW - dt.timedelta(days=3))
        print(f"{label}: {n} rows written in {time.monotonic() - t0:.2f} s", flush=True)
    cur.execute("DELETE FROM login_places WHERE hashtext(username || kind || place) % 100 = 0")
    print("deleted", cur.rowcount)
    t0 = time.monotonic()
    with eng.begin() as c:
        n = catch_up_places(c, NOW - dt.timedelta(days=3))
    print(f"1 % missing: {n} rows written in {time.monotonic() - t0:.2f} s")
    eng.dispose()
finally:
    pg.stop()
