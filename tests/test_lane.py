"""The loop lane (app/lane.py): commits from the event loop on PostgreSQL,
and everything it cannot commit handed to the writer thread -- each fault
injected for real (a backend terminated mid-commit, a row the database
refuses, a result lost after the commit), then exact counts."""

from __future__ import annotations

import asyncio
import time

import sqlalchemy as sa

from app.db import make_engine
from app.db.schema import last_logins, login_events
from app.recorder import COMMITTED, QUARANTINED, SPOOLED, Recorder
from app.spool import Spool
from tests.builders import HOSTILE_USERNAMES, record
from tests.harness.faults import TcpProxy, reject_rows, slow_commits

RETRY = 1.05           # a little over app/lane.RETRY_AFTER


def counts(engine) -> tuple[int, int]:
    """(login_events rows, sum of login_count)."""
    with engine.connect() as conn:
        events = conn.execute(sa.select(sa.func.count()).select_from(login_events)).scalar()
        total = conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar()
    return events, int(total or 0)


async def lane_open(lane) -> None:
    """Until the lane's connection is open (it opens off the loop)."""
    for _ in range(500):
        if lane._pgconn is not None:
            return
        await asyncio.sleep(0.01)
    assert lane._pgconn is not None


async def commits_once_reopened(recorder: Recorder, lane, name: bytes) -> tuple[str, int]:
    """After a hand-over: wait past RETRY_AFTER, let a record open the lane
    again (the thread commits that one), then ``name``'s outcome and how
    many statements the lane sent for it."""
    await asyncio.sleep(RETRY)
    await recorder.record(record(b"reopen-" + name), 5.0)
    await lane_open(lane)
    commits = lane.commits
    outcome = await recorder.record(record(name), 5.0)
    return outcome, lane.commits - commits


def run(recorder: Recorder, body):
    """``body(lane)`` on a loop the recorder commits from; the lane open first."""
    async def main():
        recorder.attach(asyncio.get_running_loop())
        lane = recorder._lane
        # The first record opens the lane's connection (off the loop) and
        # goes to the writer thread meanwhile.
        assert await recorder.record(record(b"opener@example.com"), 5.0) == COMMITTED
        await lane_open(lane)
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
        after, lane_commits = await commits_once_reopened(recorder, lane, b"after@example.com")
        return outcomes, handed, after, lane_commits

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


def test_a_reply_in_pieces_is_read_whole_and_new_locations_are_flagged(pg_db):
    """The server's reply reaches the lane in 8-byte pieces: every commit is
    the lane's own (none handed to the thread, which would store them again
    but flag no new location), and each new location is told once."""
    import datetime as dt

    from sqlalchemy.engine import make_url

    url = make_url(pg_db)
    proxy = TcpProxy(url.port, chunk=8, delay=0.002)
    engine = make_engine(url.set(port=proxy.port).render_as_string(hide_password=False))
    recorder = Recorder(engine)
    told = []
    recorder.on_new_locations = told.extend
    recorder.start()
    at = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)

    async def body(lane):
        out = [await recorder.record(record(b"u%d@example.com" % i, at=at, country="DE"), 5.0)
               for i in range(5)]
        out += [await recorder.record(record(b"u%d@example.com" % i, at=at + dt.timedelta(hours=1),
                                             country="FR"), 5.0) for i in range(5)]
        return out, lane.commits, lane.handed_over

    try:
        outcomes, commits, handed = run(recorder, body)
    finally:
        assert recorder.stop(10)
        proxy.stop()
    assert outcomes == [COMMITTED] * 10 and (commits, handed) == (10, 0)
    assert recorder.new_locations == 5
    assert sorted(r.username for r in told) == [b"u%d@example.com" % i for i in range(5)]
    assert counts(make_engine(pg_db)) == (11, 11)
    engine.dispose()


def test_statements_gone_from_the_session_are_prepared_again(pg_db):
    """DEALLOCATE ALL on the writer's and on the lane's connection: the
    next commit opens a new connection and prepares them again -- never a
    quarantined login -- and the lane goes on committing."""
    from app.db.writers import PostgresWriter

    engine = make_engine(pg_db)
    writer = PostgresWriter(engine)
    try:
        assert writer.write([record(b"w1@example.com")]) == 1
        pid = writer._conn().info.backend_pid
        writer._conn().execute("DEALLOCATE ALL")
        assert writer.write([record(b"w2@example.com")]) == 1
        assert writer._conn().info.backend_pid != pid
    finally:
        writer.close()

    recorder = Recorder(engine)
    recorder.start()

    async def body(lane):
        lane.writer._conn().execute("DEALLOCATE ALL")
        gone = await recorder.record(record(b"l1@example.com"), 5.0)
        handed = lane.handed_over
        again, lane_commits = await commits_once_reopened(recorder, lane, b"l3@example.com")
        return gone, handed, again, lane_commits

    try:
        gone, handed, again, lane_commits = run(recorder, body)
    finally:
        assert recorder.stop(10)
    assert (gone, handed, again, lane_commits) == (COMMITTED, 1, COMMITTED, 1)
    assert recorder.quarantined == 0 and counts(engine) == (6, 6)
    engine.dispose()


def test_a_record_that_cannot_be_sent_keeps_both_connections(pg_db, tmp_path):
    """A record psycopg cannot dump (a NUL in a text column) is set aside
    alone; neither the writer nor the lane drops its connection for it."""
    engine = make_engine(pg_db)
    spool = Spool(tmp_path / "spool", 1 << 20)
    recorder = Recorder(engine, spool=spool)
    recorder.start()

    async def body(lane):
        pid = lane.writer._conn().info.backend_pid
        bad = await recorder.record(record(b"nul@example.com", session_id="a\x00b"), 5.0)
        good = await recorder.record(record(b"good@example.com"), 5.0)
        return bad, good, lane.writer._conn().info.backend_pid == pid, lane.commits

    try:
        bad, good, same, commits = run(recorder, body)
    finally:
        assert recorder.stop(10)
    assert (bad, good, same) == (QUARANTINED, COMMITTED, True) and commits >= 1
    assert counts(engine) == (2, 2) and spool.quarantine.count() == 1
    engine.dispose()


def test_a_callback_that_submits_never_puts_two_statements_in_flight(pg_db):
    """A login's done callback submits another login while more than a
    statement's worth is queued: one statement at a time, every record
    committed by the lane, none handed over, none timed out."""
    engine = make_engine(pg_db)
    recorder = Recorder(engine, batch_max=2)
    recorder.start()

    async def body(lane):
        loop = asyncio.get_running_loop()
        futs = []

        def submit(name, then=None):
            fut = loop.create_future()

            def done(outcome, exc):
                fut.set_result(exc or outcome)
                if then is not None:
                    then()          # within the recorder's own callback
            recorder.submit(record(name), 5.0, done)
            futs.append(fut)

        submit(b"q0@example.com", lambda: submit(b"from-callback@example.com"))
        for i in range(1, 6):
            submit(b"q%d@example.com" % i)
        while len(futs) < 7 or not all(f.done() for f in futs):
            await asyncio.sleep(0.01)
        return [f.result() for f in futs], lane.handed_over

    try:
        outcomes, handed = run(recorder, body)
    finally:
        assert recorder.stop(10)
    assert outcomes == [COMMITTED] * 7 and handed == 0
    assert recorder.down is False and counts(engine) == (8, 8)
    engine.dispose()


def test_a_lane_that_cannot_connect_leaves_the_records_to_the_thread_quietly(tmp_path, caplog):
    """The database is away when the lane tries to open (nothing listens on
    its port): the records are spooled by the writer thread as before, and
    the failed opening is one debug line, not a crashed loop callback."""
    import logging

    from tests.harness.pg import free_port

    engine = make_engine(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none",
                         connect_timeout=1)
    recorder = Recorder(engine, spool=Spool(tmp_path / "spool", 1 << 20))
    recorder.start()

    async def main():
        recorder.attach(asyncio.get_running_loop())
        lane = recorder._lane
        out = await recorder.record(record(b"away@example.com"), 5.0)
        for _ in range(300):                        # the opening has ended
            if not lane._opening:
                break
            await asyncio.sleep(0.01)
        opening = lane._opening
        await recorder.detach(1.0)
        return out, opening, lane.handed_over

    caplog.set_level(logging.DEBUG)
    try:
        outcome, opening, handed = asyncio.run(main())
    finally:
        assert recorder.stop(10)
        engine.dispose()
    assert (outcome, opening, handed) == (SPOOLED, False, 0)
    assert [r.getMessage() for r in caplog.records
            if r.name == "asyncio" and r.levelno >= logging.ERROR] == []
    assert any("event=lane_unavailable" in r.getMessage() for r in caplog.records)


def silent_setup(pg_db: str, bound: float, tmp_path):
    """The daemon's engines (app/daemon.daemon_engines) through a TcpProxy,
    its recorder and replayer wired as app/daemon.py wires them."""
    from sqlalchemy.engine import make_url

    from app.config import Settings
    from app.daemon import daemon_engines
    from app.db.engine import ReplyBound
    from app.recorder import Replayer

    url = make_url(pg_db)
    proxy = TcpProxy(url.port)
    settings = Settings(database_url=url.set(port=proxy.port).render_as_string(hide_password=False),
                        record_timeout=bound, data_dir=str(tmp_path))
    engine, write_engine = daemon_engines(settings)
    recorder = Recorder(engine, spool=Spool(tmp_path / "spool", 1 << 20),
                        reply_bound=ReplyBound.for_write_bound(bound), write_engine=write_engine)
    replayer = Replayer(write_engine, recorder, interval=0.2, stuck_after=bound)
    return proxy, engine, write_engine, recorder, replayer


async def until(what, seconds: float) -> float:
    start = time.monotonic()
    while not what():
        assert time.monotonic() - start < seconds, "timed out"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_a_server_gone_silent_mid_commit_is_given_up_and_each_login_stored_once(pg_db, tmp_path,
                                                                               caplog):
    """The path to the server goes silent while commits are in flight: the
    server still gets every statement and commits it, but no reply ever
    comes back and nothing is closed (a partition, a host gone). The logins
    are spooled after their record timeout as before; the lane sends a
    cancel request at the bound's deadline (unheard too) and gives its
    connection up (without that, it would wait until the kernel gave up --
    a quarter of an hour -- and the replayer, seeing a commit in flight,
    would replay nothing meanwhile); the writer thread drops its own; an
    idle pooled connection, silent too, is never used by the writers or the
    replayer. Once new connections pass again the spool is replayed and the
    lane commits again: every login -- committed by the server unheard,
    spooled, then written again -- is stored and counted exactly once."""
    import logging

    from app.db.engine import ReplyBound

    bound = 0.3
    proxy, engine, write_engine, recorder, replayer = silent_setup(pg_db, bound, tmp_path)
    recorder.start()
    replayer.start()
    caplog.set_level(logging.INFO, logger="lastlogin.recorder")

    async def body(lane):
        # (the lane and the writer thread hold theirs by now)
        for each in (engine, write_engine):     # idle in a pool, as the rule reloader's would
            with each.connect() as conn:        # be, and the replayer's after an earlier replay
                conn.execute(sa.text("SELECT 1"))
        proxy.silence(replies_only=True)
        silent = await asyncio.gather(*(recorder.record(record(b"s%d@example.com" % i), bound)
                                        for i in range(5)))
        stuck = recorder.stuck(0.2)
        gave_up = await until(lambda: lane.handed_over == 5, 10)
        proxy.speak()
        await until(lambda: not recorder.down and not recorder.spool.segments(), 15)
        await asyncio.sleep(RETRY)
        after = [await recorder.record(record(b"after%d@example.com" % i), 5.0)
                 for i in range(3)]
        await lane_open(lane)
        commits = lane.commits
        last = await recorder.record(record(b"last@example.com"), 5.0)
        return silent, stuck, gave_up, after, last, lane.commits - commits

    try:
        silent, stuck, gave_up, after, last, lane_commits = run(recorder, body)
    finally:
        replayer.stop()
        assert recorder.stop(10)
        proxy.stop()
        engine.dispose()
        write_engine.dispose()
    give_up = ReplyBound.for_write_bound(bound).give_up
    assert silent == [SPOOLED] * 5 and stuck
    assert gave_up < give_up + 2                  # and the watchdog's second, and a margin
    assert after == [COMMITTED] * 3 and (last, lane_commits) == (COMMITTED, 1)
    # opener + 5 committed unheard (and spooled, and written again) + 3 + 1
    direct = make_engine(pg_db)
    assert counts(direct) == (10, 10)
    direct.dispose()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("event=commit_overdue seconds=1.5 action=cancel" in m for m in messages) == 1
    handed = [m for m in messages if "event=lane_handover" in m]
    assert len(handed) == 1 and "no reply from the server within 1.5s, nor after a cancel" in handed[0]


def test_the_writer_thread_gives_up_a_silent_server_and_its_retry_counts_once(pg_db):
    """The writer thread's own statement, committed by the server but its
    reply never heard: write() raises OperationalError once the bound is
    spent (deadline, a cancel that goes unheard, grace), not a hang; drops
    the connection; and the same batch written again on a new one is stored
    and counted once."""
    import threading

    import psycopg
    from sqlalchemy.engine import make_url

    from app.db.engine import ReplyBound
    from app.db.writers import PostgresWriter

    url = make_url(pg_db)
    proxy = TcpProxy(url.port)
    engine = make_engine(url.set(port=proxy.port).render_as_string(hide_password=False),
                         connect_timeout=1, write_bound=0.3, pooled=False)
    bound = ReplyBound(0.4, 0.2)
    writer = PostgresWriter(engine, bound)
    batch = [record(b"w%d@example.com" % i) for i in range(3)]
    direct = make_engine(pg_db)
    outcome: list = []

    def write_silent():
        start = time.monotonic()
        try:
            writer.write(batch)
            outcome.append("returned")
        except psycopg.OperationalError as exc:
            outcome.append(str(exc))
        outcome.append(time.monotonic() - start)

    try:
        assert writer.write([record(b"before@example.com")]) == 1
        proxy.silence(replies_only=True)
        thread = threading.Thread(target=write_silent, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "write() hung on a silent server"
        assert writer._raw is None                    # dropped, not kept
        for _ in range(50):                           # the server did commit it
            if counts(direct) == (4, 4):
                break
            time.sleep(0.05)
        assert counts(direct) == (4, 4)
        proxy.speak()
        assert writer.write(batch) == 0               # written again: nothing new
        assert writer.write([record(b"after@example.com")]) == 1
        assert counts(direct) == (5, 5)
    finally:
        writer.close()
        proxy.stop()
        engine.dispose()
        direct.dispose()
    message, waited = outcome
    assert message == "no reply from the server within 0.4s, nor after a cancel"
    assert bound.give_up <= waited < bound.give_up + 1


def test_a_commit_a_live_server_cannot_finish_is_cancelled_not_abandoned(tmp_path, caplog):
    """A live server whose commits wait for a synchronous standby that never
    confirms (synchronous_standby_names names one that does not exist): the
    server's statement_timeout does not cover that wait. At the bound's
    deadline the lane sends a cancel request; the server then completes the
    commit locally and says so, and the lane goes on with its connection.
    Dropping the connection instead left its backend waiting on the primary
    for as long as the standby was away -- one more connection slot taken at
    every stalled commit. Every login is stored and counted once."""
    import logging

    from app.db.engine import ReplyBound
    from app.db.migrate import upgrade
    from app.recorder import Replayer
    from tests.harness.pg import start_server

    server = start_server()
    bound = ReplyBound.for_write_bound(0.2)
    engine = None
    try:
        url = server.url()
        upgrade(url)
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        engine = make_engine(url, write_bound=0.2, pooled=False)
        recorder = Recorder(engine, spool=Spool(tmp_path / "spool", 1 << 20), reply_bound=bound)
        recorder.start()
        caplog.set_level(logging.INFO, logger="lastlogin.recorder")

        def standby(name: str) -> None:
            with admin.connect() as conn:
                conn.execute(sa.text(f"ALTER SYSTEM SET synchronous_standby_names = '{name}'"))
                conn.execute(sa.text("SELECT pg_reload_conf()"))

        def ours() -> tuple[int, int]:
            """(our backends waiting for the standby, all of ours)"""
            with admin.connect() as conn:
                return tuple(conn.execute(sa.text(
                    "SELECT count(*) FILTER (WHERE wait_event = 'SyncRep'), count(*) "
                    "FROM pg_stat_activity WHERE application_name = 'lastlogin'")).one())

        async def body(lane):
            standby("ghost")
            await asyncio.sleep(0.5)                # (the reload reaches every backend)
            seen, outcomes = [], []
            for i in range(3):
                recorder.mark_up()                  # (no replayer here: the lane takes it)
                outcomes.append(await recorder.record(record(b"sync%d@example.com" % i), 0.2))
                waited = ours()
                await until(lambda: lane.inflight is None, bound.give_up + 3)
                seen.append((waited, ours(), lane._pgconn is not None))
            return outcomes, seen, lane.commits, lane.handed_over

        try:
            outcomes, seen, commits, handed = run(recorder, body)
            standby("")
            Replayer(engine, recorder).run_once()
        finally:
            assert recorder.stop(10)
        assert outcomes == [SPOOLED] * 3
        # each commit did stall; the lane's and the writer thread's connections
        assert [w for (w, _), _, _ in seen] == [1] * 3 and max(n for _, (_, n), _ in seen) <= 2, seen
        # after the cancel: nothing of ours waiting, the lane's connection kept
        assert [(w, kept) for _, (w, _), kept in seen] == [(0, True)] * 3, seen
        assert (commits, handed) == (3, 0)         # (the opener was the thread's)
        assert counts(engine) == (4, 4)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("event=commit_overdue seconds=1 action=cancel" in m for m in messages) == 3
        admin.dispose()
    finally:
        if engine is not None:
            engine.dispose()
        server.stop()


def test_the_daemons_connections_carry_tcp_bounds_the_url_can_override(pg_db):
    """Every connection of an engine made with write_bound asks the kernel to
    drop it when sent data goes unacknowledged, and to probe it when idle:
    read back from the sockets themselves (a writer's, a pooled one). A URL
    that sets these libpq parameters itself keeps its own values, and its
    own server options beside the daemon's."""
    import os
    import socket

    from app.db.engine import ReplyBound
    from app.db.writers import PostgresWriter

    def options(fd: int) -> tuple[int, ...]:
        sock = socket.socket(fileno=os.dup(fd))
        try:
            return tuple(sock.getsockopt(*o) for o in (
                (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                (socket.IPPROTO_TCP, socket.TCP_KEEPCNT)))
        finally:
            sock.close()

    def sockets_of(engine) -> tuple[int, ...]:
        with engine.connect() as conn:
            return options(conn.connection.driver_connection.pgconn.socket)

    engine = make_engine(pg_db, write_bound=2.0)
    writer = PostgresWriter(make_engine(pg_db, write_bound=2.0, pooled=False),
                            ReplyBound.for_write_bound(2.0))
    try:
        assert writer.write([record(b"tcp@example.com")]) == 1
        want = (1, 10_000, 10, 2, 3)                  # the docs' table, for record_timeout 2 s
        assert sockets_of(engine) == want
        assert options(writer._conn().pgconn.socket) == want
        small = make_engine(pg_db, write_bound=0.1)   # never under TCP_FLOOR
        assert sockets_of(small)[1:3] == (10_000, 10)
        small.dispose()
        plain = make_engine(pg_db)                    # the CLI's: the system's defaults
        assert sockets_of(plain)[1] == 0
        plain.dispose()
        own = make_engine(pg_db + "?tcp_user_timeout=60000&keepalives_idle=300"
                          "&options=-c%20search_path%3Dpg_catalog", write_bound=2.0)
        assert sockets_of(own)[1:3] == (60_000, 300)
        with own.connect() as conn:
            assert conn.execute(sa.text("SHOW search_path")).scalar() == "pg_catalog"
            assert conn.execute(sa.text("SHOW lock_timeout")).scalar() == "2s"
        own.dispose()
    finally:
        writer.close()
        writer.engine.dispose()
        engine.dispose()
