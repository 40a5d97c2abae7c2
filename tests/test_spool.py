"""The outage spool and its replay, against real databases and a real full disk.

Every test injects its fault for real (a damaged byte on disk, a torn line,
a record the database's own constraint rejects, a tmpfs that is full, a
second process's lock) and then counts exactly what was stored, what was
set aside and what is still waiting.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.schema import last_logins, login_events
from app.recorder import (COMMITTED, DROPPED, QUARANTINED, SPOOLED, Recorder, RecordError,
                          Replayer)
from app.spool import CLOSED, OPEN, Spool, SpoolFull, decode, encode
from tests.builders import HOSTILE_USERNAMES, record


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


def test_a_record_the_database_rejects_does_not_block_the_others(engine, tmp_path):
    spool = Spool(tmp_path / "spool", 1 << 20)
    records = [record(f"u{i}".encode()) for i in range(5)]
    records.insert(2, record(b"bad", protocol="gopher"))    # the table's CHECK says no
    spool.append(records)
    spool.close()
    replayer = replayer_for(engine, spool)
    assert replayer.run_once() == 6
    assert counts(engine) == (5, 5)
    (entry,) = spool.quarantine.entries()
    assert entry["reason"].startswith("rejected by the database")
    assert decode(__import__("base64").b64decode(entry["line"])).username == b"bad"
    # replaying the same records again (an interrupted replay) changes nothing
    spool.append(records)
    spool.close()
    assert replayer.run_once() == 6
    assert counts(engine) == (5, 5) and spool.quarantine.count() == 1


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


# --- a full disk ------------------------------------------------------------------

@pytest.fixture
def tiny_tmpfs():
    """A real file system with room for a few records: ENOSPC for real."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs for the full-disk tests needs root", pytrace=False)
    path = tempfile.mkdtemp(prefix="llfull-", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k,mode=0700", "tmpfs", path],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)


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
