"""Record a login, or spool it: the one owner of "what if the database fails".

The service calls ``await recorder.record(rec, timeout)`` and gets back how
the record became durable -- COMMITTED, SPOOLED, QUARANTINED -- or DROPPED
(spool full, ``spool_full_action = "allow"``), or a ``RecordError`` when it
could not be kept at all and the login must not go on. ``submit(rec,
timeout, done)`` is the same call for a caller that does not await (the
common login): ``done(outcome, exc)`` is told the same, once. It knows
nothing of files or connections.

Behind that one call:

- **Group commit.** What queued up while the previous commit ran is
  stored in one transaction (up to ``batch_max`` records; the lane, 128),
  so under load many logins share one commit (and one fsync). On
  PostgreSQL the loop lane (app/lane.py) does it from the event loop while
  the database answers; a writer thread does it otherwise (SQLite, no lane
  connection yet or for a second after a lane failure, another event loop)
  and takes whatever the lane hands back -- so retries, the quarantine and
  the spool live in one place.
- **Outages.** A commit of the writer thread that fails, or any commit
  that takes longer than the timeout, marks the recorder down (a failed
  lane commit first goes to the thread, whose own failure then does) and
  sends the record to the spool (fsync'ed before the answer). While down,
  logins spool directly; the ``Replayer`` probes the database and replays
  closed segments when it answers.
- **Exactly once.** A record that timed out may still commit later *and*
  be in the spool: the fold into last_logins happens only for rows the
  INSERT itself adds, so it counts once (app/db/store.record_logins).
- **A bad record never blocks the rest.** A record the database rejects for
  its data (SQLSTATE classes 22, 23, 54) is retried alone, then set aside in
  the quarantine with the reason; its batch mates are committed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import queue
import sqlite3
import threading
import time
import uuid
from typing import Callable, Sequence

import psycopg
import sqlalchemy as sa

from .db.engine import ReplyBound
from .db.store import record_logins
from .login import DENIED, LoginRecord
from .db.writers import PostgresWriter, writer_for
from .lane import LoopLane
from .logs import first_line, show
from .spool import Spool, SpoolFull, encode, record_key
from .worker import Worker

log = logging.getLogger("lastlogin.recorder")

_STOP = object()

Writer = Callable[[sa.Connection, Sequence[LoginRecord]], int]

COMMITTED, SPOOLED, QUARANTINED, DROPPED = "committed", "spooled", "quarantined", "dropped"

# SQLSTATE classes that say "this record's data", not "the database": data
# exception, integrity constraint violation, program limit exceeded (an
# index row too large, say).
DATA_STATES = ("22", "23", "54")
# Classes that say "the database cannot take writes now": connection,
# insufficient resources, operator intervention (shutdown, statement
# timeout), system error, internal error, transaction rollback (deadlock,
# serialization), authorization (a role that may not log in), unknown
# database, object not available (lock timeout), and the writer's prepared
# statements gone even from a new connection (a transaction-pooling
# pgbouncer in front: docs/scaling.md).
AWAY_STATES = ("08", "53", "57", "58", "XX", "40", "28", "3D", "55", "26")


class RecordError(Exception):
    """The login could be neither recorded nor spooled: it must not go on."""


def _state(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None) or exc
    return getattr(orig, "sqlstate", None)


def rejects_record(exc: BaseException) -> bool:
    """True when the database refused the data of a record, not the write as such."""
    state = _state(exc)
    if state:
        return state[:2] in DATA_STATES
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        return True             # a value the driver could not even send
    orig = getattr(exc, "orig", None) or exc
    return isinstance(exc, (sa.exc.IntegrityError, sa.exc.DataError)) or isinstance(
        orig, (sqlite3.IntegrityError, sqlite3.DataError))


def database_away(exc: BaseException) -> bool:
    """True when the error says the database cannot take writes now (an outage)."""
    state = _state(exc)
    if state:
        return state[:2] in AWAY_STATES
    orig = getattr(exc, "orig", None) or exc
    return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError,
                            sa.exc.TimeoutError)) or isinstance(
        orig, (psycopg.OperationalError, psycopg.InterfaceError, sqlite3.OperationalError,
               OSError))


def canary(now: dt.datetime | None = None) -> LoginRecord:
    """A record that any working database accepts; written and rolled back."""
    return LoginRecord(event_id=uuid.uuid4(), occurred_at=now or dt.datetime.now(dt.timezone.utc),
                       username=b"lastlogin-canary", protocol="imap", remote_ip=None,
                       local_ip=None, outcome=DENIED)


def accepts_writes(engine: sa.Engine) -> bool:
    """Does the database take an ordinary record now? (Nothing stays behind.)

    Tells a record the database refuses for reasons of its own (a trigger, a
    policy) from a database that refuses everything: only the first is set
    aside; the second is an outage and its records wait in the spool.
    """
    try:
        with engine.connect() as conn:
            tx = conn.begin()
            try:
                record_logins(conn, [canary()])
            finally:
                tx.rollback()
        return True
    except Exception:  # noqa: BLE001 - whatever it is, it does not take writes
        return False


class Pending:
    """One login waiting for its record to be durable, on the event loop.

    ``done(outcome, exc)`` is called exactly once on the loop: an outcome
    (COMMITTED, SPOOLED, QUARANTINED, DROPPED) or an exception (RecordError
    when it is neither stored nor spooled) -- unless ``abandon()`` came
    first (the login was cut off: nothing is called, the timer is off).

    The lane or the writer settles it. When the record timeout fires
    first, the record is spooled from here (``spooled``: the writer must
    not spool it again); when that fails too, the late outcome of the
    commit in flight, the lane's or the writer's, decides (``late``).
    """

    __slots__ = ("loop", "done", "timer", "timed_out", "spooled", "late", "finished")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 done: Callable[[str | None, BaseException | None], None]) -> None:
        self.loop = loop
        self.done = done
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.spooled = False
        # The writer's outcome after a timeout: None while not known, else
        # (outcome, exc); LATE_WANTED once the spool failed and it decides.
        self.late: tuple[str | None, BaseException | None] | object | None = None
        self.finished = False

    def abandon(self) -> None:
        """Nobody waits any more (the login was cut off)."""
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()

    def finish(self, outcome: str | None, exc: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        self.done(outcome, exc)

    def settled(self, outcome: str | None, exc: BaseException | None) -> None:
        """The writer's word (on the loop)."""
        if self.finished:
            return                  # cut off, or spooled after its timeout
        if not self.timed_out:
            self.finish(outcome, exc)
        elif self.late is _LATE_WANTED:
            self.finish(*_late_outcome(outcome, exc))
        else:
            self.late = (outcome, exc)      # the spool attempt is still running


_LATE_WANTED = object()


def _late_outcome(outcome: str | None,
                  exc: BaseException | None) -> tuple[str | None, BaseException | None]:
    """The writer's outcome for a login that timed out and could not be spooled."""
    if exc is not None:
        if isinstance(exc, RecordError):
            return None, exc
        return None, RecordError(first_line(exc))
    if outcome == DROPPED:
        return None, RecordError("neither committed nor spooled")
    return outcome, None


Item = tuple[LoginRecord, Pending]


class Recorder:
    def __init__(self, engine: sa.Engine, batch_max: int = 1000,
                 writer=None, spool: Spool | None = None,
                 spool_full_action: str = "allow", reply_bound: ReplyBound | None = None,
                 write_engine: sa.Engine | None = None) -> None:
        self._engine = engine
        self.engine = engine            # also read by the service (previous login for alerts)
        self._batch_max = batch_max
        # The writers' connections: from ``write_engine`` (the daemon's opens
        # each afresh, never from a pool), waiting for a reply as long as
        # ``reply_bound`` says (PostgreSQL; None: no limit).
        self._write_engine = write_engine or engine
        self._reply_bound = reply_bound
        self._writer = writer or writer_for(self._write_engine, reply_bound)
        self.spool = spool
        self.spool_full_action = spool_full_action
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lastlogin-writer",
                                        daemon=True)
        self._count_lock = threading.Lock()
        self._lane: LoopLane | None = None     # commits from the event loop (attach)
        self.down = False           # the database failed; cleared by the replayer
        self.busy_since: float | None = None    # when the current commit began
        self.spool_refusing: str | None = None  # why logins are refused, while they are
        self.commits = 0
        self.records = 0
        self.spooled = 0
        self.dropped = 0
        self.quarantined = 0
        self.db_errors = 0
        self.new_locations = 0
        # Told, on the event loop (the lane), the writer's or the replayer's
        # thread, of committed records that are new locations (the daemon's
        # notifier queues them; it must not block).
        self.on_new_locations: Callable[[list[LoginRecord]], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Write what is queued, then end the thread; False if it did not end."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._writer.close()
        if self.spool is not None:
            self.spool.close()      # our segment becomes replayable by a successor
        return True

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit from ``loop`` itself while the database answers: PostgreSQL
        only (app/lane.py); the writer thread takes everything else."""
        if self._lane is None and isinstance(self._writer, PostgresWriter):
            self._lane = LoopLane(PostgresWriter(self._write_engine, self._reply_bound), loop,
                                  self._batch_max,
                                  lambda items, flagged: self._committed(items, flagged, True),
                                  self._lane_fallback)

    async def detach(self, timeout: float) -> None:
        """Before the loop ends: the lane's commit in flight is waited for
        (up to ``timeout``); what it still holds goes to the writer thread."""
        lane = self._lane
        if lane is None:
            return
        deadline = time.monotonic() + timeout
        while not lane.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self._lane = None
        self._lane_fallback(lane.close())

    def _committed(self, items: list[Item], flagged: list[uuid.UUID], on_loop: bool) -> None:
        """A batch the database took (the lane's, on the loop, or the writer
        thread's): counted, its waiters told, its new locations handed on."""
        with self._count_lock:
            self.commits += 1
            self.records += len(items)
        if on_loop:
            _settle_on_loop([waiter for _, waiter in items], COMMITTED, None)
        else:
            settle(items, COMMITTED)
        if flagged:
            self.located(flagged, [rec for rec, _ in items])

    def _lane_fallback(self, items: list[Item]) -> None:
        for item in items:
            self._queue.put(item)

    # --- the one call the service makes ------------------------------------

    async def record(self, rec: LoginRecord, timeout: float) -> str:
        """Make ``rec`` durable; COMMITTED, SPOOLED, QUARANTINED or DROPPED.

        Raises RecordError when it is neither stored nor spooled (no spool,
        or a full/failing spool with ``spool_full_action = "refuse"``).
        """
        fut = asyncio.get_running_loop().create_future()

        def done(outcome: str | None, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(outcome)

        pending = self.submit(rec, timeout, done)
        try:
            return await fut
        except asyncio.CancelledError:
            pending.abandon()
            raise

    def submit(self, rec: LoginRecord, timeout: float,
               done: Callable[[str | None, BaseException | None], None]) -> Pending:
        """``record()`` for a caller on the event loop that cannot await:
        ``done(outcome, exc)`` is called on the loop, once, with what
        ``record()`` would return or raise (never from within this call)."""
        loop = asyncio.get_running_loop()
        pending = Pending(loop, done)
        if self.down and self.spool is not None:
            self._spool_then(rec, pending, None)
            return pending
        # One timer handle per login; no asyncio.timeout/shield (each an
        # extra future or task callback, and a loop hop, per login).
        pending.timer = loop.call_at(loop.time() + timeout, self._expire, rec, pending,
                                     timeout)
        lane = self._lane
        if lane is None or lane.loop is not loop or not lane.take((rec, pending)):
            self._queue.put((rec, pending))
        return pending

    def _expire(self, rec: LoginRecord, pending: Pending, timeout: float) -> None:
        """The record timeout (on the loop): spool it, keep the writer's outcome coming."""
        if pending.finished:
            return
        pending.timed_out = True
        pending.timer = None
        if self.spool is None:
            pending.finish(None, RecordError(f"not committed within {timeout:g}s"))
            return
        self.mark_down(f"commit took longer than {timeout:g}s")
        self._spool_then(rec, pending, pending)

    def _spool_then(self, rec: LoginRecord, pending: Pending,
                    timed_out: Pending | None) -> None:
        """Spool ``rec`` off the loop; then settle ``pending``. After a
        timeout (``timed_out``), a spool that fails leaves the decision to
        the commit in flight (the engine's statement_timeout bounds it): a
        login is refused only when its record is certainly not stored."""
        fut = pending.loop.run_in_executor(None, self._spool_or_raise, [rec])

        def spooled(f: "asyncio.Future[str]") -> None:
            exc = f.exception() if not f.cancelled() else asyncio.CancelledError()
            if exc is None:
                if timed_out is not None:
                    pending.spooled = True      # the writer must not spool it again
                pending.finish(f.result())
            elif timed_out is not None and isinstance(exc, RecordError):
                late, pending.late = pending.late, _LATE_WANTED
                if late is not None:
                    pending.finish(*_late_outcome(*late))     # type: ignore[misc]
            else:
                pending.finish(None, exc)

        fut.add_done_callback(spooled)

    def _spool_or_raise(self, records: list[LoginRecord]) -> str:
        try:
            return self.spool_records(records)
        except SpoolFull as exc:
            raise RecordError(f"spool: {first_line(exc)}") from exc

    # --- the spool side ---------------------------------------------------

    def mark_down(self, why: str) -> None:
        with self._count_lock:
            self.db_errors += 1
            was, self.down = self.down, True
        if not was:
            log.error("event=database_down action=spooling reason=%s", show(why))

    def stuck(self, after: float) -> bool:
        """The writer thread or the lane has been inside one commit for longer
        than ``after`` seconds."""
        now = time.monotonic()
        lane = self._lane
        return any(since is not None and now - since > after
                   for since in (self.busy_since, lane.busy_since if lane else None))

    def mark_up(self) -> None:
        if self.down:
            log.info("event=database_up")
        self.down = False

    def spool_records(self, records: list[LoginRecord]) -> str:
        """Keep records on disk: SPOOLED; DROPPED or SpoolFull when it cannot."""
        if self.spool is None:
            raise SpoolFull("no spool configured")
        try:
            self.spool.append(records)
        except SpoolFull as exc:
            self._spool_full(str(exc))
            if self.spool_full_action == "refuse":
                raise
            with self._count_lock:
                self.dropped += len(records)
            return DROPPED
        with self._count_lock:
            self.spooled += len(records)
            was, self.spool_refusing = self.spool_refusing, None
        if was:
            log.warning("event=spool_accepting_again")
        return SPOOLED

    def _spool_full(self, detail: str) -> None:
        """One log line when the spool starts refusing, not one per login."""
        with self._count_lock:
            was, self.spool_refusing = self.spool_refusing, detail
        if was is None:
            action = ("refuse_logins" if self.spool_full_action == "refuse"
                      else "allow_unrecorded")
            log.error("event=spool_full action=%s detail=%s", action, show(detail))

    # --- the writer thread ----------------------------------------------

    def _take_batch(self) -> tuple[list[Item], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        stopping = False
        while len(batch) < self._batch_max:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stopping = True
                break
            batch.append(item)
        return batch, stopping  # type: ignore[return-value]

    def _run(self) -> None:
        while True:
            batch, stopping = self._take_batch()
            if batch:
                self._write(batch)
            if stopping:
                return

    def _write(self, items: list[Item]) -> None:
        if self.down:
            # A connection that lived through an outage is not trusted again:
            # it may be silent for good (the path to the server gone), and
            # would cost the first login after it a whole ReplyBound.
            self._writer.close()
            self._to_spool(items)
            return
        started = self.busy_since = time.monotonic()
        flagged: list[uuid.UUID] = []
        try:
            self._writer.write([rec for rec, _ in items], flagged)
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
            self.busy_since = None
            if database_away(exc):
                self._failed(items, exc)
            elif len(items) > 1:
                # One record the database rejects must not sink its batch
                # mates: write them one by one so only that one is set aside.
                for item in items:
                    self._write([item])
            elif rejects_record(exc) or accepts_writes(self._write_engine):
                self._quarantine(items[0], exc)
            else:
                self._failed(items, exc)        # it takes nothing: an outage
            return
        self.busy_since = None
        log.debug("event=commit records=%d ms=%.2f", len(items),
                  (time.monotonic() - started) * 1000)
        self._committed(items, flagged, False)

    def located(self, flagged: list[uuid.UUID], records: Sequence[LoginRecord]) -> None:
        """Count and hand on the committed records the database flagged as new locations."""
        ids = set(flagged)
        found = [rec for rec in records if rec.event_id in ids]
        found = list({rec.event_id: rec for rec in found}.values())
        with self._count_lock:
            self.new_locations += len(found)
        hook = self.on_new_locations
        if hook is not None and found:
            try:
                hook(found)
            except Exception:  # noqa: BLE001 - a notification never costs a record
                log.exception("event=new_location_hook_failed")

    def _failed(self, items: list[Item], exc: Exception) -> None:
        """The database is gone, slow or broken: spool if we can, else fail the waiters."""
        if self.spool is not None:
            self.mark_down(first_line(exc))
            self._to_spool(items)
            return
        log.error("event=record_failed records=%d error=%s", len(items), show(first_line(exc)))
        settle(items, exc=RecordError(first_line(exc)))

    def _quarantine(self, item: Item, exc: Exception) -> None:
        rec, _ = item
        reason = f"rejected by the database: {first_line(exc)}"
        if self.spool is None:
            log.error("event=record_rejected error=%s", show(reason))
            settle([item], exc=RecordError(reason))
            return
        try:
            self.spool.quarantine.add(encode(rec), reason, record_key(rec))
        except OSError as err:              # QuarantineFull, or the disk said no
            self._spool_full(f"quarantine: {first_line(err)}")
            if self.spool_full_action == "refuse":
                settle([item], exc=RecordError(reason))
            else:
                with self._count_lock:
                    self.dropped += 1
                settle([item], DROPPED)
            return
        with self._count_lock:
            self.quarantined += 1
        settle([item], QUARANTINED)

    def _to_spool(self, items: list[Item]) -> None:
        # A login that timed out was spooled from its own timeout already.
        items = [item for item in items if not item[1].spooled]
        if not items:
            return
        try:
            outcome = self.spool_records([rec for rec, _ in items])
        except SpoolFull as exc:
            settle(items, exc=RecordError(f"spool: {first_line(exc)}"))
            return
        settle(items, outcome)


def _settle_on_loop(waiters: list[Pending], result: str | None,
                    exc: BaseException | None) -> None:
    for waiter in waiters:
        try:
            waiter.settled(result, exc)
        except Exception:  # noqa: BLE001 - one login's callback never strands its batch mates
            log.exception("event=internal_error detail=\"a login's commit callback failed\"")


def settle(items: list[Item], result: str | None = None,
           exc: BaseException | None = None) -> None:
    """Tell the waiters; one thread-safe call per event loop for a whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Pending]] = {}
    for _, waiter in items:
        by_loop.setdefault(waiter.loop, []).append(waiter)
    for loop, futs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_on_loop, futs, result, exc)
        except RuntimeError:
            pass                # the loop is closed: nobody waits any more


class Replayer(Worker):
    """Stores spooled records once the database answers again, oldest first."""

    thread_name = "lastlogin-replay"

    def __init__(self, engine: sa.Engine, recorder: Recorder, interval: float = 1.0,
                 chunk: int = 1000, writer: Writer = record_logins,
                 stuck_after: float = 2.0) -> None:
        assert recorder.spool is not None
        super().__init__()
        self.engine = engine
        self.recorder = recorder
        self.spool = recorder.spool
        self.interval = interval
        self.chunk = chunk
        self.writer = writer
        self.stuck_after = stuck_after

    def _run(self) -> None:
        last_error = ""
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
                last_error = ""
            except Exception as exc:  # noqa: BLE001 - sorted below; the loop goes on
                if database_away(exc) or isinstance(exc, sa.exc.DBAPIError):
                    self.recorder.mark_down(first_line(exc))
                elif first_line(exc) != last_error:
                    log.error("event=replay_failed error=%s", show(first_line(exc)))
                last_error = first_line(exc)

    def run_once(self) -> int:
        """Probe the database; if it answers, replay every closed segment."""
        if not self.recorder.down and not self.spool.segments():
            return 0
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        if self.recorder.stuck(self.stuck_after):
            return 0            # it answers, but writes still hang (a held lock)
        self.recorder.mark_up()
        self.spool.close_segment()
        self.spool.adopt_orphans()
        return self.spool.replay(self._store, self.chunk)

    def _store(self, records: list[LoginRecord]) -> list[tuple[LoginRecord, str]]:
        """Commit ``records``; the ones the database rejects come back with the reason.

        Raises when the database takes nothing (an outage): the segment waits.
        """
        try:
            self._commit(records)
            return []
        except Exception as exc:  # noqa: BLE001 - sorted out below
            if database_away(exc):
                raise
            if len(records) == 1:
                if rejects_record(exc) or accepts_writes(self.engine):
                    return [(records[0], first_line(exc))]
                raise
        rejected: list[tuple[LoginRecord, str]] = []
        for rec in records:
            rejected += self._store([rec])
        return rejected

    def _commit(self, records: list[LoginRecord]) -> None:
        flagged: list[uuid.UUID] = []
        with self.engine.begin() as conn:
            if self.writer is record_logins:
                record_logins(conn, records, flagged)
            else:
                self.writer(conn, records)
        if flagged:
            self.recorder.located(flagged, records)
