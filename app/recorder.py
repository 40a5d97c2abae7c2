"""The login writer: group commit on one thread of its own.

Logins hand their record to ``submit`` and wait on the returned future. The
writer thread takes everything that queued up while the previous commit was
running and stores it in one transaction, so under load many logins share
one commit (and one fsync) instead of paying for one each.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from typing import Callable, Sequence

import sqlalchemy as sa

from .db.store import LoginRecord, record_logins
from .logs import show

log = logging.getLogger("lastlogin.recorder")

_STOP = object()

Writer = Callable[[sa.Connection, Sequence[LoginRecord]], int]


class Recorder:
    def __init__(self, engine: sa.Engine, batch_max: int = 1000,
                 writer: Writer = record_logins) -> None:
        self._engine = engine
        self._batch_max = batch_max
        self._writer = writer
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lastlogin-writer",
                                        daemon=True)
        self.commits = 0
        self.records = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: LoginRecord) -> concurrent.futures.Future[None]:
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((record, fut))
        return fut

    def stop(self, timeout: float) -> bool:
        """Write what is queued, then end the thread; False if it did not end."""
        if not self._thread.is_alive():
            return True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _take_batch(self) -> tuple[list[tuple[LoginRecord, concurrent.futures.Future[None]]], bool]:
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

    def _write(self, batch: list[tuple[LoginRecord, concurrent.futures.Future[None]]]) -> None:
        live = [(rec, fut) for rec, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.monotonic()
        try:
            with self._engine.begin() as conn:
                self._writer(conn, [rec for rec, _ in live])
        except sa.exc.DBAPIError as exc:
            if len(live) > 1 and not exc.connection_invalidated and not isinstance(
                    exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
                # One record the database rejects must not sink its batch
                # mates: write them one by one so only that one fails.
                for item in live:
                    self._write_one(item)
                return
            self._fail(live, exc)
            return
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
            self._fail(live, exc)
            return
        self.commits += 1
        self.records += len(live)
        log.debug("event=commit records=%d ms=%.2f", len(live),
                  (time.monotonic() - started) * 1000)
        for _, fut in live:
            fut.set_result(None)

    def _write_one(self, item: tuple[LoginRecord, concurrent.futures.Future[None]]) -> None:
        rec, fut = item
        try:
            with self._engine.begin() as conn:
                self._writer(conn, [rec])
        except Exception as exc:  # noqa: BLE001
            self._fail([item], exc)
            return
        self.commits += 1
        self.records += 1
        fut.set_result(None)

    @staticmethod
    def _fail(items: list[tuple[LoginRecord, concurrent.futures.Future[None]]],
              exc: Exception) -> None:
        log.error("event=record_failed records=%d error=%s", len(items),
                  show(str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__))
        for _, fut in items:
            fut.set_exception(exc)
