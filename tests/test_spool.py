"""The outage spool and its replay, against real databases and a real full disk.

Every test injects its fault for real (a damaged byte on disk, a torn line,
a record the database's own constraint rejects, a tmpfs that is full, a
second process's lock) and then counts exactly what was stored, what was
set aside and what is still waiting.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.schema import last_logins, login_events
from app.recorder import (COMMITTED, DROPPED, QUARANTINED, SPOOLED, Recorder, RecordError,
                          Replayer)
from app.spool import (CLOSED, LEGACY, OPEN, DamagedLine, Quarantine, QuarantineFull, Spool,
                       SpoolFull, decode, encode)
from tests.builders import HOSTILE_USERNAMES, record
from tests.harness.faults import reject_rows




def counts(engine) -> tuple[int, int]:
    """(login_events rows, sum of login_count)."""
    with engine.connect() as conn:
        events = conn.execute(sa.select(sa.func.count()).select_from(login_events)).scalar()
        total = conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar()
    return events, int(total or 0)


def replayer_for(engine, spool: Spool, **kw) -> Replayer:
    recorder = Recorder(engine, spool=spool, **kw)
    recorder.down = True            # as after an outage
    return Replayer(engine, recorder, chunk=kw.pop("chunk", 1000))


@pytest.mark.parametrize("name", HOSTILE_USERNAMES, ids=range(len(HOSTILE_USERNAMES)))
def test_codec_round_trip(name):
    rec = record(name, master_user=b"m\xff", alerts_shown=(3, 4), message="Bye \x00 now",
                 policy_applied=False)
    assert decode(encode(rec)) == rec


def test_a_damaged_line_is_set_aside_and_the_rest_replays(engine, tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 20)
    good = [record(f"u{i}@example.com".encode()) for i in range(4)]
    spool.append(good[:2])
    spool.append([record(b"victim@example.com")])
    spool.append(good[2:])
    spool.close()
    (segment,) = spool.closed_segments()
    lines = segment.read_bytes().splitlines(keepends=True)
    damaged = bytearray(lines[2])
    damaged[20] ^= 0x01                                       # one flipped bit on disk
    lines[2] = bytes(damaged)
    segment.write_bytes(b"".join(lines))

    assert replayer_for(engine, spool).run_once() == 5
    assert counts(engine) == (4, 4)
    assert spool.quarantine.count() == 1
    (entry,) = spool.quarantine.entries()
    assert "line 3: damaged (checksum mismatch)" in entry["reason"]
    assert spool.segments() == []                             # recording goes on


def test_a_torn_last_line_is_set_aside(engine, tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.append([record(b"a"), record(b"b")])
    spool.close()
    (segment,) = spool.closed_segments()
    with open(segment, "ab") as fh:
        fh.write(encode(record(b"torn"))[:40])              # a crash mid-write
    assert replayer_for(engine, spool).run_once() == 3
    assert counts(engine) == (2, 2)
    assert "incomplete line" in next(spool.quarantine.entries())["reason"]


@pytest.mark.parametrize("how", ["check", "raise"])
def test_a_record_the_database_rejects_does_not_block_the_others(engine, db_url, tmp_path,
                                                                how):
    """check: a data error (SQLSTATE 23); raise: a trigger's own exception
    (PostgreSQL P0001), set aside because the database takes other records."""
    spool = Spool(tmp_path / "spool", 1 << 20)
    records = [record(f"u{i}".encode()) for i in range(5)]
    records.insert(2, record(b"bad"))
    spool.append(records)
    spool.close()
    replayer = replayer_for(engine, spool)
    reject_rows(db_url, "bad", True, how)
    try:
        assert replayer.run_once() == 6
        assert counts(engine) == (5, 5)
        (entry,) = spool.quarantine.entries()
        assert entry["reason"].startswith("rejected by the database")
        assert decode(base64.b64decode(entry["line"])).username == b"bad"
        # replaying the same records again (an interrupted replay) changes nothing
        spool.append(records)
        spool.close()
        assert replayer.run_once() == 6
        assert counts(engine) == (5, 5) and spool.quarantine.count() == 1
        # alone in its segment, it is still set aside: the database takes others
        spool.append([records[2]])
        spool.close()
        assert replayer.run_once() == 1 and spool.segments() == []
    finally:
        reject_rows(db_url, "bad", False, how)


def test_a_database_that_takes_nothing_keeps_the_segment(engine, db_url, tmp_path):
    """Every record refused for the same non-data reason: an outage, not bad
    records. Nothing is quarantined; the segment waits and replays later."""
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.append([record(b"a"), record(b"b")])
    spool.close()
    replayer = replayer_for(engine, spool)
    sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as conn:
        if sqlite:      # its RENAME checks the views that read the table
            view = conn.exec_driver_sql("SELECT sql FROM sqlite_master "
                                        "WHERE name = 'v_refused_logins'").scalar()
            conn.exec_driver_sql("DROP VIEW v_refused_logins")
        conn.exec_driver_sql("ALTER TABLE login_events RENAME TO login_events_away")
    try:
        with pytest.raises(Exception):
            replayer.run_once()
        assert spool.quarantine.count() == 0 and len(spool.closed_segments()) == 1
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE login_events_away RENAME TO login_events")
            if sqlite:
                conn.exec_driver_sql(view)
    assert replayer.run_once() == 2 and counts(engine) == (2, 2)


def test_an_interrupted_replay_runs_again_exactly(engine, tmp_path):
    """A crash (or an outage) after the first chunk: the segment stays, and
    the second run stores the rest without doubling the first chunk."""
    spool = Spool(tmp_path / "spool", 1 << 20)
    spool.append([record(f"u{i}".encode()) for i in range(25)])
    spool.close()
    recorder = Recorder(engine, spool=spool)
    recorder.down = True
    replayer = Replayer(engine, recorder, chunk=10)
    original, calls = replayer._commit, []

    def dies_on_second_chunk(recs):
        calls.append(len(recs))
        if len(calls) == 2:
            raise sa.exc.OperationalError("INSERT", {}, ConnectionError("server closed"))
        return original(recs)
    replayer._commit = dies_on_second_chunk
    with pytest.raises(sa.exc.OperationalError):
        replayer.run_once()
    assert counts(engine) == (10, 10) and len(spool.closed_segments()) == 1
    replayer._commit = original
    assert replayer.run_once() == 25
    assert counts(engine) == (25, 25)


def test_damaged_fields_are_caught_even_without_a_checksum(tmp_path):
    """Lines of the release before checksums (no CRC) are checked field by field."""
    good = json.loads(encode(record()).rpartition(b" ")[0])
    bad = [{**good, "remote_ip": "10.0.0.q"}, {**good, "event_id": 5},
           {**good, "alerts_shown": [1e400]}, {**good, "policy_applied": "false"},
           {**good, "protocol": "gopher"}, {**good, "occurred_at": "2026-11-26T08:00:00"},
           [good]]
    for doc in bad:
        with pytest.raises(DamagedLine):
            decode(json.dumps(doc).encode() + b"\n")
    deep = b"[" * 100000 + b"]" * 100000 + b"\n"
    with pytest.raises(DamagedLine):
        decode(deep)
    assert decode(json.dumps(good).encode() + b"\n").username == b"alice@example.com"


def test_replay_streams_in_chunks(engine, tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 24)
    for i in range(25):
        spool.append([record(f"u{i}".encode()) for _ in range(4)])
    spool.close()
    seen = []
    recorder = Recorder(engine, spool=spool)
    recorder.down = True
    replayer = Replayer(engine, recorder, chunk=10)
    original = replayer._commit
    replayer._commit = lambda recs: (seen.append(len(recs)), original(recs))
    assert replayer.run_once() == 100
    assert max(seen) == 10 and sum(seen) == 100
    assert counts(engine) == (100, 100)


def test_segments_rotate_by_size(tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 20, segment_bytes=1000)
    for i in range(10):
        spool.append([record(f"u{i}".encode())])
    assert len(spool.closed_segments()) >= 2
    assert spool.depth() == 10


# --- ownership: two processes on one directory --------------------------------

CHILD = """
import sys, time
from app.spool import Spool
from tests.builders import record
spool = Spool(sys.argv[1], 1 << 20)
spool.append([record(b"child@example.com")])
print("written", flush=True)
sys.stdin.readline()                # hold the open segment until told
if sys.argv[2] == "close":
    spool.close()
"""


def run_child(directory, how):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), how], cwd=repo,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"written\n"
    return proc


def test_a_segment_another_live_process_writes_is_never_taken(engine, tmp_path):
    directory = tmp_path / "spool"
    child = run_child(directory, "close")       # the predecessor, still running
    try:
        ours = Spool(directory, 1 << 20)
        ours.append([record(b"ours@example.com")])
        replayer = replayer_for(engine, ours)
        assert replayer.run_once() == 1                     # only our own
        assert [p.suffix for p in ours.segments()] == [OPEN]   # theirs, untouched
        child.stdin.write(b"\n")
        child.stdin.flush()
        assert child.wait(10) == 0                         # it closed its segment
        assert replayer.run_once() == 1
        assert counts(engine) == (2, 2) and ours.segments() == []
    finally:
        child.kill()
        child.wait()


def test_the_open_segment_of_a_dead_process_is_adopted(engine, tmp_path):
    directory = tmp_path / "spool"
    child = run_child(directory, "exit")
    child.kill()                                           # kill -9: the lock goes with it
    child.wait()
    spool = Spool(directory, 1 << 20)
    assert [p.suffix for p in spool.segments()] == [OPEN]
    assert replayer_for(engine, spool).run_once() == 1
    assert counts(engine) == (1, 1)


def test_a_writer_and_a_replayer_racing_on_one_directory_lose_nothing(engine, tmp_path):
    """A new segment on every append (the writer side of a graceful restart)
    while another process's replayer adopts and replays as fast as it can:
    every acknowledged record stored once, no spurious SpoolFull."""
    import threading
    directory = tmp_path / "spool"
    writer = Spool(directory, 1 << 26, segment_bytes=1)
    other = Spool(directory, 1 << 26)
    replayer = replayer_for(engine, other)
    acked, failures, stop = [], [], threading.Event()

    def replay_loop():
        while not stop.is_set():
            replayer.run_once()

    t = threading.Thread(target=replay_loop)
    t.start()
    try:
        for i in range(300):
            rec = record(f"r{i}".encode())
            try:
                writer.append([rec])
                acked.append(rec)
            except SpoolFull as exc:
                failures.append(str(exc))
    finally:
        writer.close()
        stop.set()
        t.join(30)
    replayer.run_once()
    assert failures == []
    assert counts(engine) == (300, 300) and other.segments() == []


def test_a_segment_of_the_previous_release_is_left_to_its_live_writer(engine, tmp_path):
    """Before .open/.closed, the live segment was <stamp>-<pid>.jsonl: while
    that pid lives (an upgrade by SIGUSR2) it is not taken."""
    directory = tmp_path / "spool"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        spool = Spool(directory, 1 << 20)
        legacy = directory / f"20261126T080000000000-{child.pid}{LEGACY}"
        legacy.write_bytes(json.dumps(json.loads(encode(record(b"old")).rpartition(b" ")[0]))
                           .encode() + b"\n")
        replayer = replayer_for(engine, spool)
        assert replayer.run_once() == 0 and legacy.exists()
    finally:
        child.kill()
        child.wait()
    assert replayer.run_once() == 1 and not legacy.exists()
    assert counts(engine) == (1, 1)


def test_a_segment_that_cannot_be_read_does_not_stop_the_others(engine, tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 20)
    (tmp_path / "spool" / f"20000101T000000000000-1{CLOSED}").mkdir()   # not a file
    spool.append([record(b"a")])
    spool.close()
    replayer = replayer_for(engine, spool)
    assert replayer.run_once() == 1 and counts(engine) == (1, 1)
    assert list(spool.errors) == [f"20000101T000000000000-1{CLOSED}"]
    assert spool.depth() == 0


def test_the_quarantine_is_kept_once_across_processes_and_bounded(tmp_path):
    one, two = Quarantine(tmp_path / "q"), Quarantine(tmp_path / "q", max_bytes=2000)
    assert one.add(b"line", "why", "event:1") is True
    assert two.add(b"line", "why", "event:1") is False          # the other already has it
    assert two.add(b"line2", "why", "event:2") is True
    assert one.count() == 2 and len(list(one.entries())) == 2
    with pytest.raises(QuarantineFull):
        two.add(b"x" * 3000, "too big", "event:3")
    assert one.count() == 2


@pytest.mark.parametrize("action", ["allow", "refuse"])
def test_a_full_quarantine_follows_spool_full_action(engine, db_url, tmp_path, action):
    spool = Spool(tmp_path / "spool", 1 << 20, quarantine_max_bytes=10)
    recorder = Recorder(engine, spool=spool, spool_full_action=action)
    recorder.start()
    reject_rows(db_url, "bad", True)
    try:
        coro = recorder.record(record(b"bad"), timeout=5)
        if action == "refuse":
            with pytest.raises(RecordError):
                asyncio.run(coro)
        else:
            assert asyncio.run(coro) == DROPPED
        assert recorder.spool_refusing.startswith("quarantine")
    finally:
        reject_rows(db_url, "bad", False)
        recorder.stop(5)


# --- a full disk ------------------------------------------------------------------

def fill(spool: Spool) -> int:
    written = 0
    for i in range(1000):
        try:
            spool.append([record(f"user{i}@example.com".encode(), message="x" * 200)])
        except SpoolFull as exc:
            assert "spool write failed" in str(exc)
            return written
        written += 1
    raise AssertionError("the tmpfs never filled up")


def test_a_full_disk_leaves_no_partial_record(tiny_tmpfs):
    spool = Spool(os.path.join(tiny_tmpfs, "spool"), 1 << 30)
    written = fill(spool)
    assert written > 3
    spool.close()
    lines = [line for seg in spool.segments() for line in seg.read_bytes().splitlines(True)]
    assert len(lines) == written
    assert all(decode(line) for line in lines)              # every line whole


@pytest.mark.parametrize("action", ["allow", "refuse"])
def test_a_full_disk_follows_spool_full_action(tiny_tmpfs, action):
    spool = Spool(os.path.join(tiny_tmpfs, "spool"), 1 << 30)
    written = fill(spool)
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    recorder = Recorder(engine, spool=spool, spool_full_action=action)
    recorder.down = True

    async def one():
        return await recorder.record(record(b"late@example.com"), timeout=1)

    if action == "refuse":
        with pytest.raises(RecordError, match="spool write failed"):
            asyncio.run(one())
        assert recorder.spool_refusing and recorder.dropped == 0
    else:
        assert asyncio.run(one()) == DROPPED
        assert recorder.dropped == 1
    assert spool.depth() == written                          # nothing of it on disk
    engine.dispose()


# --- the live writer ------------------------------------------------------------------

def test_the_live_writer_sets_aside_a_rejected_record(engine, tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 20)
    recorder = Recorder(engine, spool=spool)
    recorder.start()

    async def logins():
        records = [record(b"a"), record(b"bad", protocol="gopher"), record(b"b")]
        return await asyncio.gather(*(recorder.record(r, timeout=5) for r in records))

    try:
        assert asyncio.run(logins()) == [COMMITTED, QUARANTINED, COMMITTED]
    finally:
        recorder.stop(5)
    assert counts(engine) == (2, 2)
    assert recorder.down is False and spool.quarantine.count() == 1


def test_with_the_database_down_records_are_spooled(tmp_path):
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout=1)
    spool = Spool(tmp_path / "spool", 1 << 20)
    recorder = Recorder(engine, spool=spool)
    recorder.start()
    try:
        got = asyncio.run(recorder.record(record(), timeout=5))
    finally:
        recorder.stop(5)
    assert got == SPOOLED and recorder.down and spool.depth() == 1
    engine.dispose()


def test_a_login_neither_committed_in_time_nor_spooled_waits_for_its_commit(tmp_path):
    """The record timeout fires while the writer waits behind a held lock and
    the spool takes nothing: the login is not refused while its commit may
    still land -- the writer's late outcome decides, and it is COMMITTED."""
    import sqlite3
    import threading

    from app.db.migrate import upgrade
    path = tmp_path / "lastlogin.db"
    upgrade(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}")
    spool = Spool(tmp_path / "spool", 1)                # full: takes nothing
    recorder = Recorder(engine, spool=spool, spool_full_action="refuse")
    recorder.start()
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")                   # the writer waits (busy_timeout)
    release = threading.Timer(1.0, locker.execute, ("ROLLBACK",))
    release.start()

    async def one():
        return await recorder.record(record(b"waited@example.com"), timeout=0.2)

    try:
        assert asyncio.run(one()) == COMMITTED
    finally:
        release.join()
        locker.close()
        recorder.stop(5)
    assert counts(engine) == (1, 1) and spool.depth() == 0 and recorder.down
    engine.dispose()


def test_submit_tells_its_callback_once_on_the_loop_as_record_would(tmp_path):
    """The callback form the connection handler uses: never called from within
    submit(), called once with what record() returns -- here SPOOLED, the
    database being down -- and not at all for a login cut off first."""
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout=1)
    spool = Spool(tmp_path / "spool", 1 << 20)
    recorder = Recorder(engine, spool=spool)
    recorder.down = True                        # straight to the spool

    async def logins():
        told: list[tuple] = []
        kept = asyncio.get_running_loop().create_future()

        def done(outcome, exc):
            told.append((outcome, exc))
            kept.set_result(None)

        cut = recorder.submit(record(b"cut@example.com"), 5, lambda *a: told.append(a))
        cut.abandon()
        recorder.submit(record(b"kept@example.com"), 5, done)
        during = list(told)
        await kept
        for _ in range(100):                    # the cut one is spooled as well...
            if spool.depth() == 2:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)                  # ...and its callback would have run
        return during, told

    during, told = asyncio.run(logins())
    assert during == [] and told == [(SPOOLED, None)]
    assert spool.depth() == 2 and recorder.spooled == 2
    engine.dispose()
