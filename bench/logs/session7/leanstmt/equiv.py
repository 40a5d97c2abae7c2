"""Equivalence: the same sequence of records through L0, L1, L1i, L2 and L2/L3 (L3 for a record
that is not allowed) on fresh databases; the returned rows and the tables (COPY text, with the
partition each event row is in) must be byte-identical. Usage: equiv.py"""
import dataclasses
import datetime as dt
import hashlib
import random
import sys
import uuid

sys.path.insert(0, "/work/notes/leanstmt")
from lib import Runner, make_db  # noqa: E402
from stmts import S  # noqa: E402
from app.db.writers import unlocated  # noqa: E402
from app.login import LoginRecord  # noqa: E402
from tests.harness.pg import start_server  # noqa: E402

T = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.timezone.utc)
HOSTILE = [b"alice", b"Alice", b"alice ", b"bob@example.com", "j\u00fcrgen@\u00e9xample.de".encode(),
           "\U0001F600@x".encode(), b"o'brien", b'quo"te', b"back\\slash", b"\\x41", b"a\x00b",
           b"\xff\xfe bad utf8", b"\xc3", b"x'; DROP TABLE last_logins; --", b"%(username)s", b"$1",
           b"%s", b"line\nbreak\ttab", b"", b" ", b"{a,b}", b"NULL", b"(1,2)",
           b"a" * 4096, ("\u00e9" * 2048).encode(), b"b" * 1024, b"c" * 1025,
           b"\xff" * 4096, b"d" * 4000 + b"\x00"]
PROTOS = ["imap", "pop3", "submission", "managesieve"]


def records():
    rnd = random.Random(11)
    out = []
    for k in range(900):
        user = rnd.choice(HOSTILE)
        outcome = rnd.choices(["allowed", "denied", "failed"], [6, 2, 1])[0]
        # times: mostly forward, some late (older than what is stored), some in other partitions
        when = T + dt.timedelta(seconds=k * 7 - rnd.choice([0, 0, 0, 3600, 86400]))
        when = rnd.choices([when, dt.datetime(2026, 12, 3, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=k),
                            dt.datetime(2027, 2, 28, 23, 59, 59, 999999, tzinfo=dt.timezone.utc),
                            dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=k),
                            dt.datetime(2025, 6, 1, 12, 0, 0, 1, tzinfo=dt.timezone.utc)],
                           [20, 3, 1, 1, 1])[0]
        place = (None, None)
        if outcome != "allowed":        # refused logins with a place are unlocated too
            place = rnd.choice([(None, None), ("DE", 3320), ("US", None), (None, 4200000000)])
        out.append(LoginRecord(
            event_id=uuid.UUID(int=rnd.getrandbits(128), version=4), occurred_at=when,
            username=user, protocol=rnd.choice(PROTOS),
            remote_ip=rnd.choice(["198.51.100.7", "2001:db8::1", None, "203.0.113.9"]),
            local_ip=rnd.choice(["192.0.2.25", None, "::1"]), outcome=outcome,
            rule_id=rnd.choice([None, 3, 2147483647]) if outcome != "allowed" else None,
            auth_mech=rnd.choice([b"PLAIN", b"LOGIN", None, b"\xff"]),
            master_user=rnd.choice([None, None, b"admin", b"\xfe"]),
            auth_user=rnd.choice([None, b"alias@x"]),
            message=("Refused: it's \"you\" \\ %s" if outcome == "denied" else None),
            policy_applied=rnd.random() < 0.9, host=rnd.choice(["mx1", "mx2", None, "h'ost"]),
            country=place[0], asn=place[1], session_id=rnd.choice([None, f"s{k}", "<x'y>"])))
    # same user twice in a row, same time (>= ties), and a late login
    r0 = out[5]
    out.insert(6, dataclasses.replace(r0, event_id=uuid.UUID(int=1, version=4), remote_ip="192.0.2.99",
                                      host="mx9"))
    out.insert(7, dataclasses.replace(r0, event_id=uuid.UUID(int=2, version=4),
                                      occurred_at=r0.occurred_at - dt.timedelta(days=3),
                                      remote_ip="192.0.2.98"))
    # replays: the same records again, at random places (a spooled record committed late)
    seq = list(out)
    for r in rnd.sample(out, 120):
        seq.insert(rnd.randrange(seq.index(r) + 1, len(seq) + 1), r)
    # a record with the same event id and time but other content (a replay that is not byte-equal)
    seq.append(dataclasses.replace(out[10], host="other", remote_ip="10.0.0.1"))
    assert all(unlocated(r) and not r.alerts_shown for r in seq)
    return seq


TABLES = {
    "login_events": "SELECT tableoid::regclass::text AS part, * FROM login_events ORDER BY event_id, occurred_at",
    "last_logins": "SELECT * FROM last_logins ORDER BY username, protocol",
    "login_alert_deliveries": "SELECT * FROM login_alert_deliveries ORDER BY alert_id, username",
}


def dump(r):
    out = {}
    for t, q in TABLES.items():
        buf = bytearray()
        with r.conn.cursor().copy(f"COPY ({q}) TO STDOUT") as cp:
            for chunk in cp:
                buf += chunk
        out[t] = bytes(buf)
    return out


CHOOSE = {"L0": lambda r: "L0", "L1": lambda r: "L1", "L1i": lambda r: "L1i", "L2": lambda r: "L2",
          "L2/L3": lambda r: "L2" if r.outcome == "allowed" else "L3",
          "L4/L4d": lambda r: "L4" if r.outcome == "allowed" else "L4d",
          "L5/L5d": lambda r: "L5" if r.outcome == "allowed" else "L5d",
          "M_nodeliv": lambda r: "M_nodeliv", "M_noagg": lambda r: "M_noagg",
          "X_nogate": lambda r: "X_nogate"}     # negative control: must differ from L0

NL, TAB = b"\n", b"\t"
seq = records()
pg = start_server()
try:
    got = {}
    for name, choose in CHOOSE.items():
        r = Runner(make_db(pg, "eq_" + name.lower().replace("/", "_")), S)
        rets = []
        for rec in seq:
            x = r.run(choose(rec), rec)
            if isinstance(x, int):      # L4/L4d, L5/L5d: the row the writer would make of the count
                x = (x, x if rec.outcome == "allowed" else 0, 0, None)
            rets.append(x)
        tables = dump(r)
        got[name] = (rets, tables)
        print(f"{name:6} {len(seq)} writes: inserted {sum(x[0] for x in rets)}, folded {sum(x[1] for x in rets)}, "
              f"delivered {sum(x[2] for x in rets)}, flagged {sum(x[3] is not None for x in rets)}; "
              + ", ".join(f"{t} {v.count(NL)} rows sha256 {hashlib.sha256(v).hexdigest()[:16]}"
                          for t, v in tables.items()), flush=True)
        r.close()
    ref = got["L0"]
    print(f"outcomes in the sequence: { {o: sum(x.outcome == o for x in seq) for o in ('allowed', 'denied', 'failed')} }, "
          f"distinct usernames {len({x.username for x in seq})}, protocols {sorted({x.protocol for x in seq})}, "
          f"partitions {sorted(set(l.split(TAB)[0].decode() for l in ref[1]['login_events'].splitlines()))}")
    for name in CHOOSE:
        if name != "L0":
            same_ret = got[name][0] == ref[0]
            same_tab = {t: got[name][1][t] == ref[1][t] for t in TABLES}
            print(f"{name} == L0: returned rows {same_ret}, tables {same_tab}")
finally:
    pg.stop()
