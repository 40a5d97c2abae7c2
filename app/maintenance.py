"""The daemon's daily job: monthly partitions ahead, retention if configured."""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa

from .db.retention import maintain
from .db.rules import purge_expired_auto
from .db.store import catch_up_places
from .worker import Worker

log = logging.getLogger("lastlogin.maintenance")

DAY = 24 * 3600.0
# How far back the daily job looks for logins stored without their places
# (a rolling upgrade to the release with login_places takes this long at most).
PLACES_CATCH_UP = dt.timedelta(days=3)


class Maintenance(Worker):
    thread_name = "lastlogin-maintenance"

    def __init__(self, engine: sa.Engine, retention_days: int, interval: float = DAY) -> None:
        super().__init__()
        self.engine = engine
        self.retention_days = retention_days
        self.interval = interval

    def run_once(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        # Expired automatic blocks: never match again; without this `rule list`
        # and every snapshot load would grow with each block ever made.
        with self.engine.begin() as conn:
            purged = purge_expired_auto(conn, now)
        if purged:
            log.info("event=auto_blocks_purged rules=%d", purged)
        result = maintain(self.engine, now, self.retention_days)
        if result is not None:
            log.info("event=retention days=%d partitions_dropped=%d rows=%d",
                     self.retention_days, len(result.partitions),
                     result.rows_dropped + result.rows_deleted)
        # Last, and on its own: partitions ahead and retention do not wait
        # for it, and its failure is its own line (tried again next time).
        try:
            with self.engine.begin() as conn:
                caught = catch_up_places(conn, now - PLACES_CATCH_UP)
        except sa.exc.SQLAlchemyError as exc:
            log.error("event=places_catch_up_failed error=%s",
                      str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__)
            return
        if caught:
            # logins stored without their places: by a daemon of an older
            # release (a rolling upgrade), or rows written by hand
            log.warning("event=places_caught_up rows=%d since=%s", caught,
                        (now - PLACES_CATCH_UP).isoformat(timespec="seconds"))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - try again next time
                log.error("event=maintenance_failed error=%s",
                          str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__)
            self._stop.wait(self.interval)
