"""Equivalence for C: one stream of records, mostly located allowed logins (country, country+ASN,
ASN only) and some unlocated / refused ones, no alerts, with replays, through the writer itself
(app.db.writers.PostgresWriter, one record per write) on fresh databases:
  ref    every record through PG_ONE (one_statement patched to return _ONE)
  writer the writer's own choice (one_statement: LEAN_COUNTRY / LEAN_ASN / LEAN_ALLOWED / LEAN_OTHER)
Compared: per write, what the writer makes of the reply (inserted, flagged ids) and, for the located
lean statements, the raw result row against PG_ONE's; login_events (COPY text, with each row's
partition, incl. new_location), last_logins, login_alert_deliveries byte for byte.
Usage: equiv.py [partitions-past-months, default 0 (5 partitions)]"""
import collections
import dataclasses
import datetime as dt
import hashlib
import random
import sys
import uuid

sys.path.insert(0, "/work/notes/locstmt")
import sqlalchemy as sa  # noqa: E402
from psycopg import pq  # noqa: E402

from lib import make_db  # noqa: E402
from app.db import writers  # noqa: E402
from app.login import LoginRecord  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402

PAST = int(sys.argv[1]) if sys.argv[1:] else 0
T = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.timezone.utc)
USERS = [b"alice", b"Alice", b"bob@example.com", "j\u00fcrgen@\u00e9xample.de".encode(), b"o'brien",
         b"back\\slash", b"a\x00b", b"\xff\xfe bad utf8", b"%(username)s", b"$1", b"", b"a" * 4096,
         b"carol", b"dave", b"erin", b"frank"]
COUNTRIES = ["DE", "US", "FR", "de", "NL", "QQ"]
ASNS = [3320, 7922, 4200000000, 1, 9223372036854775807]
PROTOS = ["imap", "pop3", "submission", "managesieve"]


def records():
    rnd = random.Random(23)
    out = []
    for k in range(1000):
        user = rnd.choice(USERS)
        outcome = rnd.choices(["allowed", "denied", "failed"], [8, 1, 1])[0]
        when = T + dt.timedelta(seconds=k * 7 - rnd.choice([0, 0, 0, 3600, 86400, 40 * 86400]))
        when = rnd.choices([when, dt.datetime(2026, 12, 3, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=k),
                            dt.datetime(2027, 2, 28, 23, 59, 59, 999999, tzinfo=dt.timezone.utc),
                            dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=k),
                            dt.datetime(2025, 6, 1, 12, 0, 0, 1, tzinfo=dt.timezone.utc) + dt.timedelta(days=k % 300)],
                           [20, 3, 1, 1, 2])[0]
        place = rnd.choices([(None, None), ("c", None), ("c", "a"), (None, "a")], [2, 4, 3, 3])[0]
        country = rnd.choice(COUNTRIES) if place[0] else None
        asn = rnd.choice(ASNS) if place[1] else None
        out.append(LoginRecord(
            event_id=uuid.UUID(int=rnd.getrandbits(128), version=4), occurred_at=when,
            username=user, protocol=rnd.choice(PROTOS),
            remote_ip=rnd.choice(["198.51.100.7", "2001:db8::1", None]),
            local_ip=rnd.choice(["192.0.2.25", None]), outcome=outcome,
            rule_id=rnd.choice([None, 3]) if outcome != "allowed" else None,
            auth_mech=rnd.choice([b"PLAIN", None, b"\xff"]), master_user=rnd.choice([None, b"admin"]),
            message=("Refused: it's \"you\" \\ %s" if outcome == "denied" else None),
            policy_applied=rnd.random() < 0.9, host=rnd.choice(["mx1", "mx2", None]),
            country=country, asn=asn, session_id=rnd.choice([None, f"s{k}"])))
    # a user's first login ever with a place (not new), then the same user from elsewhere (new),
    # at the same time (not earlier: not new) and a second later (new), and a late one (earlier
    # than all stored: first login then, not new)
    base = dict(username=b"zed@first", protocol="imap", remote_ip="192.0.2.1", local_ip=None,
                outcome="allowed", host="mx1")
    t0 = T + dt.timedelta(hours=5)
    extra = [LoginRecord(event_id=uuid.UUID(int=100 + j, version=4), occurred_at=t, country=c, asn=a, **base)
             for j, (t, c, a) in enumerate([(t0, "DE", 3320), (t0, "FR", None), (t0 + dt.timedelta(seconds=1), "FR", None),
                                            (t0 + dt.timedelta(seconds=2), None, 7922),
                                            (t0 + dt.timedelta(seconds=3), None, 3320),
                                            (t0 - dt.timedelta(days=2), "US", None)])]
    out[500:500] = extra
    seq = list(out)
    for r in rnd.sample(out, 150):      # replays (a spooled record committed late)
        seq.insert(rnd.randrange(seq.index(r) + 1, len(seq) + 1), r)
    seq.append(dataclasses.replace(out[10], host="other", country="GB", asn=5))   # same id+time, other content
    assert not any(r.alerts_shown for r in seq)
    return seq


TABLES = {
    "login_events": "SELECT tableoid::regclass::text AS part, * FROM login_events ORDER BY event_id, occurred_at",
    "last_logins": "SELECT * FROM last_logins ORDER BY username, protocol",
    "login_alert_deliveries": "SELECT * FROM login_alert_deliveries ORDER BY alert_id, username",
}


def dump(conn):
    out = {}
    for t, q in TABLES.items():
        buf = bytearray()
        with conn.cursor().copy(f"COPY ({q}) TO STDOUT") as cp:
            for chunk in cp:
                buf += chunk
        out[t] = bytes(buf)
    return out


def through_writer(url, seq):
    eng = sa.create_engine(url)
    w = writers.PostgresWriter(eng)
    rets, rows, used = [], [], collections.Counter()
    for rec in seq:
        name, values = w.statement([rec])
        res = w.reply(w._run(name, values))
        new, located = w.outcome(res)
        rows.append(w._tx.load_row(0, tuple) if res.status == pq.ExecStatus.TUPLES_OK else None)
        rets.append((new, located))
        used[name.decode()] += 1
    tables = dump(w._conn())
    nl = w._conn().execute("SELECT count(*) FILTER (WHERE new_location), count(*) FILTER (WHERE new_location IS NULL) "
                           "FROM login_events").fetchone()
    print(f"  new_location true {nl[0]}, null {nl[1]}")
    w.close()
    eng.dispose()
    return rets, rows, used, tables


NL, TAB = b"\n", b"\t"
seq = records()
import lib  # noqa: E402
print(lib.provenance(), flush=True)
pg = start_server()
real_choice = writers.one_statement
try:
    got = {}
    real_prepared = dict(writers._PREPARED)
    for run in ("ref", "writer", "X_nofirst"):
        writers.one_statement = (lambda r: writers._ONE) if run == "ref" else real_choice
        if run == "X_nofirst":   # negative control: LEAN_COUNTRY without its first-login probe
            t = writers.PG_LEAN_COUNTRY.replace("CASE WHEN NOT EXISTS", "CASE WHEN false AND EXISTS", 1)
            assert t != writers.PG_LEAN_COUNTRY
            writers._PREPARED[writers._LEAN_COUNTRY] = writers._positional(t)
        try:
            got[run] = through_writer(make_db(pg, f"eq_{run.lower()}", past_months=PAST), seq)
        finally:
            writers._PREPARED.clear()
            writers._PREPARED.update(real_prepared)
        rets, rows, used, tables = got[run]
        print(f"{run:6} {len(seq)} writes, statements {dict(used)}: inserted {sum(x[0] for x in rets)}, "
              f"flagged {sum(len(x[1]) for x in rets)}; "
              + ", ".join(f"{t} {v.count(NL)} rows sha256 {hashlib.sha256(v).hexdigest()[:16]}"
                          for t, v in tables.items()), flush=True)
    writers.one_statement = real_choice
    ref, new = got["ref"], got["writer"]
    ev = ref[3]["login_events"].splitlines()
    print(f"sequence: outcomes {collections.Counter(r.outcome for r in seq)}, with country "
          f"{sum(r.country is not None for r in seq)}, ASN only {sum(r.country is None and r.asn is not None for r in seq)}, "
          f"usernames {len({r.username for r in seq})}; new_location true rows "
          f"(see above); partitions {collections.Counter(l.split(TAB)[0].decode() for l in ev)}")
    x = got["X_nofirst"]
    print(f"negative control X_nofirst == ref: per write {x[0] == ref[0]}; tables "
          f"{ {t: x[3][t] == ref[3][t] for t in TABLES} }")
    same_ret = ref[0] == new[0]
    lean_loc = [i for i, r in enumerate(seq) if writers.one_statement(r) in (writers._LEAN_COUNTRY, writers._LEAN_ASN)]
    same_rows = all(ref[1][i] == new[1][i] for i in lean_loc)
    diff = [i for i in range(len(seq)) if ref[0][i] != new[0][i]][:5]
    print(f"writer == ref: (inserted, flagged ids) per write {same_ret} {diff}; raw rows of the {len(lean_loc)} "
          f"located lean writes equal PG_ONE's {same_rows}; tables "
          f"{ {t: new[3][t] == ref[3][t] for t in TABLES} }")
finally:
    writers.one_statement = real_choice
    pg.stop()
