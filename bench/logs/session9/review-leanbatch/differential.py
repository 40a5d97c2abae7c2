"""Differential check of PG_BATCH_UNLOCATED against PG_BATCH (review of 70d3057).

Database A: every batch through lastlogin_batch (PG_BATCH), forced.
Database B: every batch through PostgresWriter.statement()'s own choice
(lastlogin_batch_unlocated when all records are unlocated and without alerts).
The same random stream of batches goes to both; after each batch the full reply
rows are compared, at the end every table. Own throw-away server.

Usage: PYTHONPATH=/work/main python differential.py SEED ROUNDS
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import random
import sys
import uuid
from collections import Counter

import sqlalchemy as sa
from psycopg.adapt import PyFormat

from app.db import make_engine, writers
from app.db.migrate import upgrade
from app.login import LoginRecord
from tests.harness.pg import create_database, start_server

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.timezone.utc)
BREAK = len(sys.argv) > 3 and sys.argv[3] == "break"


def run(writer, name, records):
    params = writers.pg_params(records)
    writer._conn()
    names = writers._PREPARED[name][1]
    values = writer._tx.dump_sequence([params[n] for n in names], [PyFormat.TEXT] * len(names))
    res = writer.reply(writer._run(name, values))
    writer._tx.set_pgresult(res)
    row = writer._tx.load_row(0, tuple)
    return tuple(int(v) if isinstance(v, int) else v for v in row), writer.outcome(res)


def dump(engine):
    out = {}
    with engine.connect() as conn:
        for t in ("login_events", "last_logins", "login_places", "login_alert_deliveries"):
            out[t] = sorted(tuple(map(str, r)) for r in conn.exec_driver_sql(f"SELECT * FROM {t}"))
    return out


def main(seed: int, rounds: int) -> int:
    rnd = random.Random(seed)
    server = start_server()
    try:
        admin = server.url()
        urls = [create_database(admin), create_database(admin)]
        for u in urls:
            upgrade(u)
        engines = [make_engine(u) for u in urls]
        ws = [writers.PostgresWriter(e) for e in engines]
        for w in ws:
            w.one_row_statement = False
        users = [f"u{i}@example.com".encode() for i in range(8)] + [b"U0@example.com", b"u0@EXAMPLE.com"]
        history: list[LoginRecord] = []
        used = Counter()
        mismatches = 0

        def rec(located_ok: bool) -> LoginRecord:
            outcome = rnd.choice(["allowed", "allowed", "allowed", "denied", "failed"])
            country = asn = None
            alerts = ()
            if located_ok and rnd.random() < 0.5:
                r = rnd.random()
                if r < 0.4:
                    country = rnd.choice(["DE", "FR", "JP"])
                if r > 0.3:
                    asn = rnd.choice([3320, 2516, 64500])
            elif rnd.random() < 0.3:
                # unlocated only because it is refused: a place with a denied/failed login
                outcome = rnd.choice(["denied", "failed"])
                country = rnd.choice(["DE", "FR", None])
                asn = rnd.choice([3320, None, 64500])
            if located_ok and rnd.random() < 0.15:
                alerts = tuple(sorted(rnd.sample([1, 2, 3], rnd.randint(1, 2))))
            return LoginRecord(
                event_id=uuid.uuid4(),
                occurred_at=T0 + dt.timedelta(seconds=rnd.randint(-20000, 20000),
                                              microseconds=rnd.choice([0, 1, 500000])),
                username=rnd.choice(users), protocol=rnd.choice(["imap", "pop3"]),
                remote_ip=rnd.choice(["198.51.100.7", "2001:db8::1", None]),
                local_ip="192.0.2.25", outcome=outcome, auth_mech=b"PLAIN",
                alerts_shown=alerts, host=rnd.choice(["mx1", "mx2", None]),
                country=country, asn=asn, session_id=rnd.choice([None, "s1"]))

        for i in range(rounds):
            located_ok = rnd.random() < 0.35
            batch = [rec(located_ok) for _ in range(rnd.randint(0, 10))]
            # duplicates within the batch, replays of earlier batches, same time as another
            if batch and rnd.random() < 0.3:
                batch.append(rnd.choice(batch))
            if history and rnd.random() < 0.4:
                batch += rnd.sample(history, min(len(history), rnd.randint(1, 3)))
            if len(batch) > 1 and rnd.random() < 0.3:
                a = batch[0]
                batch.append(dataclasses.replace(a, event_id=uuid.uuid4(), outcome="allowed"))
            if batch and rnd.random() < 0.2:
                # the same event id again with other content (the first copy wins)
                a = rnd.choice(batch)
                batch.append(dataclasses.replace(a, country=rnd.choice([None, "DE"]),
                                                 alerts_shown=rnd.choice([(), (1,)])))
            rnd.shuffle(batch)
            name_b, _ = ws[1].statement(batch)
            if BREAK:
                name_b = writers._BATCH_UNLOCATED   # sensitivity check: lean for every batch
            used[name_b.decode()] += 1
            ra = run(ws[0], writers._BATCH, batch)
            rb = run(ws[1], name_b, batch)
            # column 3 (deliveries) is 0 by construction in the lean one; compare the rest,
            # and the deliveries count too (must be 0 in A when B took the lean statement)
            if ra != rb:
                mismatches += 1
                print("REPLY MISMATCH", i, name_b, ra, rb)
            history += batch
        da, db = dump(engines[0]), dump(engines[1])
        for t in da:
            if da[t] != db[t]:
                mismatches += 1
                print("TABLE MISMATCH", t, len(da[t]), len(db[t]))
            print(t, len(da[t]), "rows")
        print("statements used in B:", dict(used))
        print("mismatches:", mismatches)
        for w in ws:
            w.close()
        for e in engines:
            e.dispose()
        return 1 if mismatches else 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
