"""The loop lane (app/lane.py): commits from the event loop on PostgreSQL,
and everything it cannot commit handed to the writer thread -- each fault
injected for real (a backend terminated mid-commit, a row the database
refuses, a result lost after the commit), then exact counts."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from app.db import make_engine
from app.db.schema import last_logins, login_events
from app.recorder import COMMITTED, QUARANTINED, Recorder
from app.spool import Spool
from tests.builders import HOSTILE_USERNAMES, record
from tests.harness.faults import reject_rows, slow_commits

RETRY = 1.05           # a little over app/lane.RETRY_AFTER


def counts(engine) -> tuple[int, int]:
    """(login_events rows, sum of login_count)."""
    with engine.connect() as conn:
        events = conn.execute(sa.select(sa.func.count()).select_from(login_events)).scalar()
        total = conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar()
    return events, int(total or 0)


def run(recorder: Recorder, body):
    """``body(lane)`` on a loop the recorder commits from; the lane open first."""
    async def main():
        recorder.attach(asyncio.get_running_loop())
        lane = recorder._lane
        # The first record opens the lane's connection (off the loop) and
        # goes to the writer thread meanwhile.
        assert await recorder.record(record(b"opener@example.com"), 5.0) == COMMITTED
        for _ in range(500):
            if lane._pgconn is not None:
                break
            await asyncio.sleep(0.01)
        assert lane._pgconn is not None
        try:
            return await body(lane)
        finally:
            await recorder.detach(5.0)
    return asyncio.run(main())


def test_the_lane_commits_from_the_loop_and_counts_once(pg_db):
    """One login at a time and fifty at once: every record committed by
    the lane itself (none handed to the thread), once, group-committed
    under concurrency; hostile names stored verbatim."""
    engine = make_engine(pg_db)
    recorder = Recorder(engine)
    recorder.start()
    names = [n for n in HOSTILE_USERNAMES if n] + [b"u%d@example.com" % i for i in range(50)]

    async def body(lane):
        alone = [await recorder.record(record(b"one%d@example.com" % i), 5.0)
                 for i in range(10)]
        together = await asyncio.gather(*(recorder.record(record(n), 5.0) for n in names))
        return alone, together, lane.commits, lane.handed_over

    try:
        alone, together, commits, handed = run(recorder, body)
    finally:
        assert recorder.stop(10)
    total = 1 + 10 + len(names)
    assert alone == [COMMITTED] * 10 and together == [COMMITTED] * len(names)
    assert handed == 0
    assert 10 < commits < 10 + len(names)      # the fifty shared commits
    assert recorder.records == total and counts(engine) == (total, total)
    with engine.connect() as conn:
        raw = set(conn.execute(sa.select(login_events.c.username_raw)).scalars())
        text = set(conn.execute(sa.select(login_events.c.username)).scalars())
    for n in names:
        assert n in raw or n.decode() in text
    engine.dispose()


def test_a_backend_terminated_mid_commit_hands_the_batch_to_the_thread(pg_db):
    """The lane's backend ends while its statement runs (a trigger keeps it
    busy): the batch, and what queued behind it, is written by the writer
    thread -- every record committed, stored once, counted once -- and the
    lane reconnects and commits again afterwards."""
    engine = make_engine(pg_db)
    recorder = Recorder(engine)
    recorder.start()

    async def body(lane):
        slow_commits(pg_db, 0.5, True)
        try:
            first = asyncio.ensure_future(asyncio.gather(
                *(recorder.record(record(b"a%d@example.com" % i), 10.0) for i in range(5))))
            await asyncio.sleep(0.1)
            assert lane.inflight                       # the statement is running
            behind = asyncio.ensure_future(asyncio.gather(
                *(recorder.record(record(b"b%d@example.com" % i), 10.0) for i in range(5))))
            await asyncio.sleep(0.05)
            pid = lane.writer._conn().info.backend_pid
            with engine.begin() as conn:
                assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})").scalar()
            outcomes = await first + await behind
        finally:
            slow_commits(pg_db, 0, False)
        handed = lane.handed_over
        await asyncio.sleep(RETRY)                     # the lane may open again
        await recorder.record(record(b"reopen@example.com"), 5.0)
        for _ in range(300):
            if lane._pgconn is not None:
                break
            await asyncio.sleep(0.01)
        commits = lane.commits
        after = await recorder.record(record(b"after@example.com"), 5.0)
        return outcomes, handed, after, lane.commits - commits

    try:
        outcomes, handed, after, lane_commits = run(recorder, body)
    finally:
        assert recorder.stop(10)
    assert outcomes == [COMMITTED] * 10 and after == COMMITTED
    assert handed == 10                                 # in flight and queued behind
    assert lane_commits == 1                            # the lane is back
    assert counts(engine) == (13, 13)
    engine.dispose()


def test_a_batch_committed_whose_result_is_lost_is_counted_once(pg_db):
    """The lane's commit lands but its result never reaches the lane (here:
    reading it fails): the thread writes the batch again, and the statement
    stores and folds each record once."""
    engine = make_engine(pg_db)
    recorder = Recorder(engine)
    recorder.start()

    async def body(lane):
        real = lane.writer.outcome

        def lost(res):
            lane.writer.outcome = real
            raise OSError("the result was lost")

        lane.writer.outcome = lost
        outcomes = await asyncio.gather(
            *(recorder.record(record(b"c%d@example.com" % (i % 3)), 5.0) for i in range(6)))
        return outcomes, lane.handed_over

    try:
        outcomes, handed = run(recorder, body)
    finally:
        assert recorder.stop(10)
    assert outcomes == [COMMITTED] * 6 and handed >= 1
    assert counts(engine) == (7, 7)
    with engine.connect() as conn:
        per_user = dict(conn.execute(sa.select(last_logins.c.username,
                                               last_logins.c.login_count)).all())
    assert per_user == {"opener@example.com": 1, "c0@example.com": 2, "c1@example.com": 2,
                        "c2@example.com": 2}
    engine.dispose()


def test_a_row_the_database_refuses_in_a_lane_batch_is_set_aside_alone(pg_db, tmp_path):
    """The database refuses one row of a batch the lane sent: the thread
    retries the batch one by one, quarantines that row with the reason and
    commits its batch mates."""
    engine = make_engine(pg_db)
    spool = Spool(tmp_path / "spool", 1 << 20)
    recorder = Recorder(engine, spool=spool)
    recorder.start()
    reject_rows(pg_db, "bad@example.com", True)
    names = [b"m%d@example.com" % i for i in range(4)] + [b"bad@example.com"]

    async def body(lane):
        outcomes = await asyncio.gather(*(recorder.record(record(n), 5.0) for n in names))
        return outcomes, lane.handed_over

    try:
        outcomes, handed = run(recorder, body)
    finally:
        assert recorder.stop(10)
        reject_rows(pg_db, "bad@example.com", False)
    assert outcomes == [COMMITTED] * 4 + [QUARANTINED] and handed >= 1
    assert counts(engine) == (5, 5) and spool.quarantine.count() == 1
    assert "ck_test_reject" in next(spool.quarantine.entries())["reason"]
    engine.dispose()


def test_detach_hands_what_the_lane_holds_to_the_thread(pg_db):
    """The loop ends with records still with the lane (its statement in
    flight, more queued behind): the writer thread stores each once."""
    engine = make_engine(pg_db)
    recorder = Recorder(engine)
    recorder.start()

    async def body(lane):
        slow_commits(pg_db, 0.3, True)
        try:
            futs = [asyncio.ensure_future(recorder.record(record(b"d%d@example.com" % i), 10.0))
                    for i in range(8)]
            await asyncio.sleep(0.05)
            assert lane.inflight
            await recorder.detach(0.0)              # nothing waited for
            assert recorder._lane is None
            return await asyncio.gather(*futs)
        finally:
            slow_commits(pg_db, 0, False)

    try:
        outcomes = run(recorder, body)
    finally:
        assert recorder.stop(10)
    assert outcomes == [COMMITTED] * 8
    assert counts(engine) == (9, 9)
    engine.dispose()


def test_the_thread_alone_on_a_database_that_is_not_postgresql(sqlite_db):
    """SQLite has no lane: attach changes nothing, the thread commits."""
    engine = make_engine(sqlite_db)
    recorder = Recorder(engine)
    recorder.start()

    async def main():
        recorder.attach(asyncio.get_running_loop())
        assert recorder._lane is None
        out = await recorder.record(record(b"s@example.com"), 5.0)
        await recorder.detach(1.0)
        return out

    try:
        assert asyncio.run(main()) == COMMITTED
    finally:
        assert recorder.stop(10)
    assert counts(engine) == (1, 1)
    engine.dispose()
