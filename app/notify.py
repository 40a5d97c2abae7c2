"""Tell an operator's program about logins from new locations, off the login path.

The writer thread (or the replayer) hands over committed records that the
database flagged ``new_location``; they wait in a bounded queue and one
thread runs ``notify_command`` for each: no shell, one JSON object on stdin,
a timeout, output discarded. A login never waits for it. A full queue, a
program that fails, or one that runs too long costs one log line and a
count (status, metrics) -- never a login or a record.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
from typing import Sequence

import sqlalchemy as sa

from .db.schema import login_places
from .login import LoginRecord, username_text
from .logs import show
from .worker import Worker

log = logging.getLogger("lastlogin.notify")

_STOP = object()


def previous_countries(conn: sa.Connection, rec: LoginRecord) -> list[str]:
    """Countries of this user's allowed logins before ``rec``, sorted: as
    login_places has them, the table the new-location test asked."""
    p = login_places
    name = username_text(rec.username)[0]
    rows = conn.execute(sa.select(p.c.place).where(
        p.c.username == name, p.c.kind == "country", p.c.first_seen < rec.occurred_at)
        .order_by(p.c.place))
    return [r[0] for r in rows]


def message_of(rec: LoginRecord, previous: list[str]) -> dict[str, object]:
    """The JSON object the program reads on stdin."""
    name = username_text(rec.username)[0]
    return {
        "event": "new_location",
        "event_id": str(rec.event_id),
        "username": name,
        "protocol": rec.protocol,
        "remote_ip": rec.remote_ip,             # as stored (store_ip applies)
        "country": rec.country,
        "asn": rec.asn,
        "occurred_at": rec.occurred_at.isoformat(),
        "host": rec.host,
        "previous_countries": previous,
    }


class Notifier(Worker):
    """Runs ``argv`` once per new-location login, one at a time."""

    thread_name = "lastlogin-notify"

    def __init__(self, engine: sa.Engine, argv: Sequence[str], timeout: float = 10.0,
                 queue_max: int = 1000) -> None:
        super().__init__()
        self.engine = engine
        self.argv = list(argv)
        self.timeout = timeout
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_max)
        self._lock = threading.Lock()
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    # called on the writer's thread: never blocks
    def submit(self, records: list[LoginRecord]) -> None:
        for rec in records:
            try:
                self._queue.put_nowait(rec)
            except queue.Full:
                with self._lock:
                    self.dropped += 1
                log.error("event=notify_dropped reason=\"queue full\" user=%s",
                          show(rec.username))

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, LoginRecord)
            self.notify(item)

    def notify(self, rec: LoginRecord) -> bool:
        """Run the program for one record; True when it exited 0 in time."""
        try:
            with self.engine.connect() as conn:
                previous = previous_countries(conn, rec)
        except Exception as exc:  # noqa: BLE001 - the program still hears of it
            log.warning("event=notify_no_history error=%s", show(str(exc).splitlines()[0]))
            previous = []
        doc = json.dumps(message_of(rec, previous), ensure_ascii=True).encode() + b"\n"
        reason = None
        try:
            done = subprocess.run(self.argv, input=doc, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=self.timeout,
                                  close_fds=True, check=False)
            if done.returncode != 0:
                err = done.stderr.decode("utf-8", "replace").strip().splitlines()
                reason = f"exit status {done.returncode}" + (f": {err[-1][:200]}" if err
                                                              else "")
        except subprocess.TimeoutExpired:
            reason = f"killed after {self.timeout:g}s"
        except OSError as exc:
            reason = f"cannot run: {exc.strerror or exc}"
        with self._lock:
            if reason is None:
                self.sent += 1
            else:
                self.failed += 1
        if reason is not None:
            log.error("event=notify_failed program=%s user=%s reason=%s",
                      show(self.argv[0]), show(rec.username), show(reason))
            return False
        log.info("event=notified user=%s country=%s asn=%s", show(rec.username),
                 rec.country or "-", rec.asn if rec.asn is not None else "-")
        return True
