"""Group commit on the event loop, for PostgreSQL, while the database answers.

The writer thread (app/recorder.py) stores every batch with one blocking
statement; each login then crosses threads twice -- handed to the writer,
handed back through the loop's self-pipe -- and the two threads pass the
GIL back and forth: futex, pipe and wake-up system calls at every login
where each login is its own commit, and GIL hand-offs under load, for
Python the GIL serialised with the loop anyway. The lane sends the same prepared statement from the loop
itself on a non-blocking libpq connection of its own and reads the result
when the socket is readable: the loop serves other logins meanwhile, and
records submitted while a commit is in flight go out together with the next
one (group commit, one statement in flight). The recorder sends nothing
here while it is down with a spool (those records go to the spool).

The lane only ever commits. Anything else -- an error of any kind, a lost
connection, no connection yet, the lane closing -- hands
the records, in order, to the writer thread, which owns retries, the
quarantine and the spool. A batch whose outcome is unknown (the connection
died after it was sent) is written again by the thread; the statement's
``ON CONFLICT DO NOTHING`` and its fold of only the rows it inserted store
and count it once -- but cannot flag again, as new locations, the rows the
lost commit had inserted (only the notification is lost, never a record).

A healthy connection -- the server refused the statement, or a record could
not be dumped -- stays for the next commit; any other, and one whose
prepared statements are gone from the session, is dropped and opened again
after RETRY_AFTER. A statement with no reply by the writer's bound
(db.engine.ReplyBound; a watchdog looks once a second while one is in
flight) gets a cancel request, sent off the loop: a live server answers it
(a commit waiting for a synchronous standby completes locally, a statement
waiting for something else fails); with no reply after that either, the
server or the path to it is gone and the connection is dropped. A batch is
dumped on the loop, so a statement carries at most LANE_BATCH_MAX records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq

from .db.writers import PostgresWriter, cancel_failed, cancel_overdue, send_cancel
from .logs import first_line, show

if TYPE_CHECKING:
    from .recorder import Item

log = logging.getLogger("lastlogin.recorder")

RETRY_AFTER = 1.0       # seconds between attempts to (re)open the lane's connection
WATCH_EVERY = 1.0       # seconds between looks at a statement in flight
LANE_BATCH_MAX = 128    # records per statement sent from the loop


class LoopLane:
    """Commits from one event loop; hands what it cannot commit to ``fallback``.

    ``committed(items, flagged)`` is called on the loop for each batch the
    database took (count, settle, new locations); ``fallback(items)`` for
    records the writer thread must store instead.
    """

    def __init__(self, writer: PostgresWriter, loop: asyncio.AbstractEventLoop,
                 batch_max: int, committed: Callable[[list["Item"], list], None],
                 fallback: Callable[[list["Item"]], None]) -> None:
        self.writer = writer
        self.loop = loop
        # A batch is dumped on the loop: at most LANE_BATCH_MAX records per
        # statement (999 records of 4 KB names held the loop ~80 ms).
        self.batch_max = min(batch_max, LANE_BATCH_MAX)
        self.committed = committed
        self.fallback = fallback
        self.queued: list[Item] = []
        self.inflight: list[Item] | None = None
        self.busy_since: float | None = None     # when the statement in flight was sent
        self._pgconn: pq.abc.PGconn | None = None
        self._fd = -1
        self._writing = False
        self._results: list = []        # results of the statement in flight, so far
        self._opening = False
        self._retry_at = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._cancelled: float | None = None    # when a cancel went out for the statement in flight
        self.closed = False
        self.handed_over = 0        # records handed to the writer thread (tests)
        self.commits = 0            # batches the lane committed (tests)

    # --- what the recorder calls ------------------------------------------------

    def take(self, item: "Item") -> bool:
        """Queue ``item`` for the next commit; False: not connected (the caller
        hands it to the writer thread)."""
        if self._pgconn is None:
            self._open()
            return False
        self.queued.append(item)
        if self.inflight is None:
            self._send()
        return True

    def close(self) -> list["Item"]:
        """Stop; what was queued or in flight comes back (for the writer thread)."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        left = (self.inflight or []) + self.queued
        self.inflight, self.queued = None, []
        self._drop_connection()
        return left

    @property
    def idle(self) -> bool:
        return self.inflight is None and not self.queued

    # --- the connection -------------------------------------------------------------

    def _open(self) -> None:
        """Open the connection off the loop (it blocks), at most once a second."""
        if self._opening or self.closed or self.loop.time() < self._retry_at:
            return
        self._opening = True
        self._retry_at = self.loop.time() + RETRY_AFTER
        fut = self.loop.run_in_executor(None, self.writer._conn)
        fut.add_done_callback(self._opened)

    def _opened(self, fut: "asyncio.Future[psycopg.Connection]") -> None:
        self._opening = False
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.debug("event=lane_unavailable error=%s", show(first_line(exc)))
            self.writer.close()
            return
        if self.closed:
            self.writer.close()
            return
        pgconn = fut.result().pgconn
        try:
            pgconn.nonblocking = 1
            self._fd = pgconn.socket
            self.loop.add_reader(self._fd, self._readable)
        except Exception as err:  # noqa: BLE001 - the writer thread goes on alone
            log.debug("event=lane_unavailable error=%s", show(first_line(err)))
            self._drop_connection()
            return
        self._pgconn = pgconn

    def _drop_connection(self) -> None:
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
            if self._writing:
                self.loop.remove_writer(self._fd)
        self._fd, self._writing, self._pgconn, self._results = -1, False, None, []
        self.writer.close()

    # --- one commit -----------------------------------------------------------------

    def _send(self) -> None:
        batch = self.queued[:self.batch_max]
        del self.queued[:len(batch)]
        self.inflight = batch
        self.busy_since = time.monotonic()
        self._results = []
        self._cancelled = None
        pgconn = self._pgconn
        assert pgconn is not None
        try:
            name, values = self.writer.statement([rec for rec, _ in batch])
        except Exception as exc:  # noqa: BLE001 - a record that cannot be dumped
            self._fail(exc)       # nothing was sent: the connection stays
            return
        try:
            pgconn.send_query_prepared(name, values)
            self._flush()
        except Exception as exc:  # noqa: BLE001 - the writer thread takes them
            self._fail(exc)
            return
        if self._watchdog is None and self.writer.bound is not None:
            self._watchdog = self.loop.call_later(WATCH_EVERY, self._watch)

    def _watch(self) -> None:
        """Once a second while a statement is in flight: past the bound's
        deadline a cancel request; past the time to give up, the connection
        is dropped and the records handed on."""
        self._watchdog = None
        since, bound, pgconn = self.busy_since, self.writer.bound, self._pgconn
        if self.inflight is None or since is None or bound is None or pgconn is None:
            return
        now = time.monotonic()
        if self._cancelled is not None and now - self._cancelled > 2 * bound.grace:
            self._fail(psycopg.OperationalError(
                f"no reply from the server within {bound.deadline:g}s, nor after a cancel"))
            return
        if now - since > bound.deadline and self._cancelled is None:
            self._cancelled = now
            cancel = cancel_overdue(pgconn, bound)      # (made here: the loop owns pgconn)
            if cancel is not None:
                fut = self.loop.run_in_executor(None, send_cancel, cancel, bound.grace)
                fut.add_done_callback(_cancel_sent)
        self._watchdog = self.loop.call_later(WATCH_EVERY, self._watch)

    def _flush(self) -> None:
        """Send what libpq still holds; wait for the socket if it is full."""
        pgconn = self._pgconn
        if pgconn is None:
            return
        try:
            more = pgconn.flush()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return
        if more and not self._writing:
            self.loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not more and self._writing:
            self.loop.remove_writer(self._fd)
            self._writing = False

    def _readable(self) -> None:
        pgconn = self._pgconn
        if pgconn is None:
            return
        try:
            pgconn.consume_input()
            if self.inflight is None:
                # Nothing asked: a notice, or the server closing the connection.
                if pgconn.status == pq.ConnStatus.BAD:
                    self._fail(psycopg.OperationalError("the connection was closed"))
                return
            # The reply may come in several reads (a result, then the
            # ReadyForQuery that ends it): what came is kept until it is whole.
            while not pgconn.is_busy():
                res = pgconn.get_result()
                if res is None:
                    break
                self._results.append(res)
            else:
                return
            results, self._results = self._results, []
            _, flagged = self.writer.outcome(self.writer.reply(results))
        except Exception as exc:  # noqa: BLE001 - the writer thread takes them
            self._fail(exc)
            return
        batch, self.inflight, self.busy_since = self.inflight, None, None
        self.commits += 1
        self.committed(batch, flagged)
        # (a callback above may have sent a statement already: one at a time)
        if self.queued and self.inflight is None and self._pgconn is not None:
            self._send()

    def _healthy(self) -> bool:
        """The connection can take the next statement: open, no transaction
        left, nothing of the last one still to send or to read."""
        pgconn = self._pgconn
        return (pgconn is not None and pgconn.status == pq.ConnStatus.OK
                and pgconn.transaction_status == pq.TransactionStatus.IDLE
                and not self._writing and not self._results)

    def _fail(self, exc: BaseException) -> None:
        """Whatever went wrong, the writer thread stores the records (in order).
        A healthy connection (the server refused the statement, or a record
        could not be dumped) is kept for the next commit; any other is
        dropped and opened again after RETRY_AFTER."""
        left = (self.inflight or []) + self.queued
        self.inflight, self.queued, self.busy_since = None, [], None
        if not self._healthy() or isinstance(exc, pg_errors.InvalidSqlStatementName):
            # (our statements gone from the session: a new one prepares them)
            self._drop_connection()
            self._retry_at = self.loop.time() + RETRY_AFTER
        self._results = []
        log.info("event=lane_handover records=%d error=%s", len(left), show(first_line(exc)))
        self.handed_over += len(left)
        if left:
            self.fallback(left)


def _cancel_sent(fut: "asyncio.Future[None]") -> None:
    exc = None if fut.cancelled() else fut.exception()
    if exc is not None:
        cancel_failed(exc)
