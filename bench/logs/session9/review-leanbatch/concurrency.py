"""Deadlock probe: several writers on one database, overlapping users, each
batch's rows in random order. Thread kinds: 'lean' (all-unlocated batches,
statement() picks PG_BATCH_UNLOCATED), 'full' (located + alerts, PG_BATCH),
'mixed' (either), 'core' (record_logins through SQLAlchemy). Counts errors by
SQLSTATE class and by statement. Own throw-away server.

Usage: PYTHONPATH=/work/main python concurrency.py SECONDS KINDS...
"""
from __future__ import annotations

import datetime as dt
import random
import sys
import threading
import time
import uuid
from collections import Counter

from app.db import make_engine, writers
from app.db.migrate import upgrade
from app.db.store import record_logins
from app.login import LoginRecord
from tests.harness.pg import create_database, start_server

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.timezone.utc)
USERS = [f"u{i}@example.com".encode() for i in range(4)]


def rec(rnd, located):
    return LoginRecord(
        event_id=uuid.uuid4(), occurred_at=T0 + dt.timedelta(seconds=rnd.randint(-5000, 5000)),
        username=rnd.choice(USERS), protocol=rnd.choice(["imap", "pop3"]),
        remote_ip="198.51.100.7", local_ip="192.0.2.25",
        outcome=rnd.choice(["allowed", "allowed", "denied"]) if not located else "allowed",
        alerts_shown=tuple(rnd.sample([1, 2, 3], rnd.randint(0, 2))) if located else (),
        country=rnd.choice(["DE", "FR", "JP"]) if located else None,
        asn=rnd.choice([1, 2, 3]) if located else None)


def main(seconds: float, kinds: list[str]) -> None:
    server = start_server()
    try:
        url = create_database(server.url())
        upgrade(url)
        stop = time.monotonic() + seconds
        counts: Counter = Counter()
        lock = threading.Lock()

        def worker(kind: str, seed: int) -> None:
            rnd = random.Random(seed)
            engine = make_engine(url)
            w = writers.PostgresWriter(engine)
            w.one_row_statement = False
            while time.monotonic() < stop:
                located = {"lean": False, "full": True}.get(kind, rnd.random() < 0.5)
                batch = [rec(rnd, located) for _ in range(rnd.randint(2, 12))]
                if kind == "mixed" and rnd.random() < 0.5:
                    batch += [rec(rnd, not located)]
                name = w.statement(batch)[0].decode() if kind != "core" else "record_logins"
                try:
                    if kind == "core":
                        with engine.begin() as conn:
                            record_logins(conn, batch)
                    else:
                        w.write(batch)
                    key = (kind, name, "ok")
                except Exception as exc:  # noqa: BLE001
                    key = (kind, name, type(exc).__name__)
                with lock:
                    counts[key] += 1
            w.close()
            engine.dispose()

        threads = [threading.Thread(target=worker, args=(k, i)) for i, k in enumerate(kinds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k, v in sorted(counts.items()):
            print(*k, v)
    finally:
        server.stop()


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2:])
