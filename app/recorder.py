"""The login writer: group commit on one thread, and the outage spool.

Logins hand their record to ``submit`` and wait on the returned future. The
writer thread takes everything that queued up while the previous commit was
running and stores it in one transaction, so under load many logins share
one commit (and one fsync) instead of paying for one each.

When the database fails, the batch goes to the local spool instead (fsync'ed
before the futures resolve) and the recorder is marked down: until the
replayer sees the database again, logins spool directly and no login waits
on a database that is not there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Callable, Sequence

import sqlalchemy as sa

import psycopg

from .db.store import LoginRecord, record_logins
from .db.writers import writer_for
from .logs import show
from .spool import Spool, SpoolFull
from .worker import Worker

log = logging.getLogger("lastlogin.recorder")

_STOP = object()

Writer = Callable[[sa.Connection, Sequence[LoginRecord]], int]
Item = tuple[LoginRecord, "concurrent.futures.Future[str]"]
# What the database says about one record (not about itself): retry the
# batch record by record so only that one fails.
DATA_ERRORS = (sa.exc.IntegrityError, sa.exc.DataError, psycopg.errors.IntegrityError,
               psycopg.errors.DataError)

COMMITTED, SPOOLED, DROPPED = "committed", "spooled", "dropped"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Recorder:
    def __init__(self, engine: sa.Engine, batch_max: int = 1000,
                 writer=None, spool: Spool | None = None,
                 spool_full_action: str = "allow") -> None:
        self._engine = engine
        self._batch_max = batch_max
        self._writer = writer or writer_for(engine)
        self.spool = spool
        self.spool_full_action = spool_full_action
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lastlogin-writer",
                                        daemon=True)
        self._spool_lock = threading.Lock()
        self.down = False           # the database failed; cleared by the replayer
        self.busy_since: float | None = None    # when the current commit began
        self.commits = 0
        self.records = 0
        self.spooled = 0
        self.dropped = 0
        self.db_errors = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: LoginRecord) -> concurrent.futures.Future[str]:
        """For threads: a concurrent future."""
        fut: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._queue.put((record, fut))
        return fut

    def submit_async(self, record: LoginRecord) -> "asyncio.Future[str]":
        """For the event loop: an asyncio future, settled with its batch mates
        in one wake-up of the loop (not one per login)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((record, _LoopWaiter(loop, fut)))
        return fut

    def stop(self, timeout: float) -> bool:
        """Write what is queued, then end the thread; False if it did not end."""
        if not self._thread.is_alive():
            return True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._writer.close()
        return not self._thread.is_alive()

    # --- the spool side ---------------------------------------------------

    def mark_down(self, why: str) -> None:
        self.db_errors += 1
        if not self.down:
            log.error("event=database_down action=spooling reason=%s", show(why))
        self.down = True

    def stuck(self, after: float) -> bool:
        """The writer has been inside one commit for longer than ``after`` seconds."""
        since = self.busy_since
        return since is not None and time.monotonic() - since > after

    def mark_up(self) -> None:
        if self.down:
            log.info("event=database_up")
        self.down = False

    def spool_records(self, records: list[LoginRecord]) -> str:
        """Keep records on disk; SPOOLED, or DROPPED/SpoolFull when it is full."""
        if self.spool is None:
            raise SpoolFull("no spool configured")
        try:
            self.spool.append(records)
        except SpoolFull as exc:
            if self.spool_full_action == "refuse":
                raise
            with self._spool_lock:
                self.dropped += len(records)
            log.error("event=spool_full action=allow_unrecorded records=%d detail=%s",
                      len(records), show(str(exc)))
            return DROPPED
        with self._spool_lock:
            self.spooled += len(records)
        return SPOOLED

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
                self._write([(r, f) for r, f in batch if _claim(f)])
            if stopping:
                return

    def _write(self, live: list[Item]) -> None:
        if not live:
            return
        if self.down:
            self._to_spool(live)
            return
        started = self.busy_since = time.monotonic()
        try:
            self._writer.write([rec for rec, _ in live])
        except DATA_ERRORS as exc:
            self.busy_since = None
            if len(live) > 1:
                # One record the database rejects must not sink its batch
                # mates: write them one by one so only that one fails.
                for item in live:
                    self._write_one(item)
                return
            self._rejected(live, exc)
            return
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
            self.busy_since = None
            self._failed(live, exc)
            return
        self.busy_since = None
        self.commits += 1
        self.records += len(live)
        log.debug("event=commit records=%d ms=%.2f", len(live),
                  (time.monotonic() - started) * 1000)
        settle(live, COMMITTED)

    def _failed(self, items: list[Item], exc: Exception) -> None:
        """The database is gone, slow or broken: spool if we can, else fail the waiters."""
        if self.spool is not None:
            self.mark_down(first_line(exc))
            self._to_spool(items)
            return
        self._rejected(items, exc)

    @staticmethod
    def _rejected(items: list[Item], exc: Exception) -> None:
        log.error("event=record_failed records=%d error=%s", len(items), show(first_line(exc)))
        settle(items, exc=exc)

    def _to_spool(self, items: list[Item]) -> None:
        try:
            outcome = self.spool_records([rec for rec, _ in items])
        except Exception as exc:  # noqa: BLE001 - SpoolFull with refuse, or a disk error
            log.error("event=spool_failed records=%d error=%s", len(items),
                      show(first_line(exc)))
            settle(items, exc=exc)
            return
        settle(items, outcome)

    def _write_one(self, item: Item) -> None:
        rec, _ = item
        try:
            self._writer.write([rec])
        except DATA_ERRORS as exc:
            self._rejected([item], exc)
            return
        except Exception as exc:  # noqa: BLE001 - the database went away meanwhile
            self._failed([item], exc)
            return
        self.commits += 1
        self.records += 1
        settle([item], COMMITTED)


class _LoopWaiter:
    __slots__ = ("loop", "fut")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: "asyncio.Future[str]") -> None:
        self.loop = loop
        self.fut = fut


def _claim(waiter) -> bool:
    if isinstance(waiter, _LoopWaiter):
        return True         # a cancelled one (timed out) is still written: see settle
    return waiter.set_running_or_notify_cancel()


def _settle_on_loop(futs: list["asyncio.Future[str]"], result: str | None,
                    exc: BaseException | None) -> None:
    for fut in futs:
        if fut.done():
            continue            # timed out and spooled meanwhile
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


def settle(items: list[Item], result: str | None = None,
           exc: BaseException | None = None) -> None:
    """Tell the waiters; one thread-safe call per event loop for a whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[str]]] = {}
    for _, waiter in items:
        if isinstance(waiter, _LoopWaiter):
            by_loop.setdefault(waiter.loop, []).append(waiter.fut)
        elif exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(result)
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
        self.replayed = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - the database is still away
                self.recorder.mark_down(first_line(exc))

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
        done = 0
        for segment in self.spool.closed_segments():
            records = list(self.spool.read(segment))
            for i in range(0, len(records), self.chunk):
                with self.engine.begin() as conn:
                    self.writer(conn, records[i:i + self.chunk])
            self.spool.remove(segment)
            done += len(records)
            log.info("event=spool_replayed segment=%s records=%d", segment.name, len(records))
        self.replayed += done
        return done
