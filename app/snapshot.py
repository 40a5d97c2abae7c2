"""What the daemon holds in memory (rules, ...) and how it stays current.

A login never waits on the database for a decision: it reads the current
``Snapshot``. A thread replaces the snapshot when ``config_version`` moves:
on PostgreSQL it is woken by NOTIFY lastlogin_config at once (and checks
every few seconds besides); on SQLite it checks twice a second. If the
database goes away, the last snapshot keeps deciding.

Rows are loaded one by one: a row that cannot be used is left out, named in
the log and in ``Snapshot.skipped`` (for `lastlogin status`), and everything
else keeps loading. A ``config_version`` table without exactly one row makes
the refresher reload on every check (and say so) instead of never again. A
load that fails for any reason other than an unreachable database keeps the
last snapshot (or none: then ``rules_unloaded_action`` decides) and is
retried; it never stops the daemon.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

import sqlalchemy as sa

from .db.loading import Skipped
from .db.overrides import load_alerts, load_deliveries, load_overrides
from .db.rules import config_version_of, config_version_rows, load_rules
from .logs import show
from .overrides import Alert, Overrides
from .policy import AUTO, DENY, AutoBlocks, Rule, order
from .worker import Worker

log = logging.getLogger("lastlogin.snapshot")

NOTIFY_CHANNEL = "lastlogin_config"


@dataclass(frozen=True)
class Snapshot:
    version: int | None     # None: config_version does not hold exactly one row
    rules: tuple[Rule, ...]
    overrides: Overrides = field(default_factory=Overrides)
    alerts: tuple[Alert, ...] = ()
    # (alert id, username) of show-once alerts already shown. The daemon adds
    # to it as it shows them, so this one set is shared, not copied.
    delivered: set[tuple[int, str]] = field(default_factory=set, compare=False)
    # Rows left out: (table, id, reason). Empty when everything loaded.
    skipped: tuple[tuple[str, int, str], ...] = ()
    # Automatic blocks (created_by 'auto'), by address and by username: not
    # in ``rules``, so the ordered scan does not grow with every block.
    auto: AutoBlocks = field(default_factory=AutoBlocks)


def load_snapshot(conn: sa.Connection, now: dt.datetime | None = None) -> Snapshot:
    # The version is read first: a change committed in between makes the
    # data newer than the number, which only causes one more reload.
    version = config_version_of(conn)
    skipped: Skipped = []
    if version is None:
        rows = config_version_rows(conn)
        skipped.append(("config_version", rows, f"has {rows} rows instead of 1: changes are "
                        "found by reloading everything at every check"))
    # A rule whose window has ended can never match again: it is not held
    # (expired automatic blocks are deleted by the daily maintenance job).
    now = now or dt.datetime.now(dt.timezone.utc)
    loaded = [r for r in load_rules(conn, skipped)
              if r.valid_until is None or r.valid_until > now]
    rules = tuple(r for r in loaded if r.created_by != AUTO)
    auto = AutoBlocks.of(r for r in loaded if r.created_by == AUTO and r.action == DENY)
    rules += tuple(r for r in loaded if r.created_by == AUTO and r.action != DENY)
    rules = order(rules)
    overrides = load_overrides(conn, skipped)
    alerts = load_alerts(conn, skipped)
    return Snapshot(version=version, rules=rules, overrides=overrides, alerts=alerts,
                    delivered=load_deliveries(conn), skipped=tuple(skipped), auto=auto)


def status_checks(state) -> list[tuple[int, str, str]]:
    """What `lastlogin status` adds from the daemon's state (a DaemonStatus).

    (level, check, detail) with status's levels: 1 warning. A row left out
    and a load that fails are warnings until fixed (the exit status says so).
    """
    out = [(1, "config", line) for line in skipped_warnings(
        tuple(state.config_skipped or ()))]
    if state.config_load_error:
        out.append((1, "config", f"cannot load rules, overrides and alerts: "
                                 f"{state.config_load_error}"))
    return out


def skipped_warnings(skipped) -> list[str]:
    """One line per row left out, for `lastlogin status` (names table, id, reason)."""
    return [f"{table} row {row_id} skipped: {reason}" if table != "config_version"
            else f"config_version {reason}" for table, row_id, reason in skipped]


class ConfigCache:
    """Holds the current snapshot; None until one was ever loaded."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.checked_at: float | None = None    # last time the database was asked
        self.load_error: str | None = None      # why the last load failed, if it did

    @property
    def skipped(self) -> tuple[tuple[str, int, str], ...]:
        snap = self.snapshot
        return () if snap is None else snap.skipped

    @property
    def rules(self) -> tuple[Rule, ...] | None:
        snap = self.snapshot
        return None if snap is None else snap.rules


    def checked_age(self) -> float | None:
        """Seconds since the snapshot was last known to be current."""
        return None if self.checked_at is None else time.monotonic() - self.checked_at


class Refresher(Worker):
    """Keeps a ConfigCache current from the database, on a thread of its own."""

    thread_name = "lastlogin-config"

    def __init__(self, engine: sa.Engine, cache: ConfigCache,
                 poll_interval: float = 0.5, heartbeat: float = 5.0) -> None:
        super().__init__()
        self.engine = engine
        self.cache = cache
        self.poll_interval = poll_interval
        self.heartbeat = heartbeat
        self._failing = False

    def refresh(self) -> bool:
        """Load a new snapshot if the version moved; True if one was loaded.

        Raises only when the database cannot be reached (the caller spools);
        any other failure is logged, leaves the cache as it is and returns
        False, so the next check tries again.
        """
        try:
            return self._refresh()
        except (sa.exc.OperationalError, sa.exc.InterfaceError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bad table must not stop the daemon
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if reason != self.cache.load_error:
                log.error("event=config_load_failed error=%s", show(reason[:200]))
            self.cache.load_error = reason
            return False

    def _refresh(self) -> bool:
        with self.engine.connect() as conn:
            current = self.cache.snapshot
            if (current is not None and current.version is not None
                    and config_version_of(conn) == current.version):
                self.cache.checked_at = time.monotonic()
                return False
            snap = load_snapshot(conn)
        self.cache.checked_at = time.monotonic()
        self.cache.load_error = None
        before = set(current.skipped) if current is not None else set()
        for table, row_id, reason in snap.skipped:
            if (table, row_id, reason) not in before:
                log.error("event=config_row_skipped table=%s id=%s reason=%s", table, row_id,
                          show(reason))
        if current is not None:
            # deliveries shown but not yet committed when the copy was read
            snap.delivered.update(current.delivered)
            if snap.version is None and snap == current:
                return False        # reloaded (no version to go by), nothing changed
        self.cache.snapshot = snap
        log.info("event=config_loaded version=%s rules=%d overrides=%d alerts=%d skipped=%d",
                 snap.version if snap.version is not None else "unknown", len(snap.rules),
                 snap.overrides.count(), len(snap.alerts), len(snap.skipped))
        return True

    def _run(self) -> None:
        listen = self.engine.dialect.name == "postgresql"
        while not self._stop.is_set():
            try:
                if listen:
                    self._listen()
                else:
                    self._poll()
            except Exception as exc:  # noqa: BLE001 - keep deciding from the cache
                if not self._failing:
                    log.error("event=config_refresh_failed error=%s",
                              str(exc).strip().splitlines()[0] if str(exc) else
                              type(exc).__name__)
                self._failing = True
                self._stop.wait(1.0)

    def _ok(self) -> None:
        if self._failing:
            log.info("event=config_refresh_recovered")
        self._failing = False

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._ok()
            self._stop.wait(self.poll_interval)

    def _listen(self) -> None:
        raw = self.engine.raw_connection()
        try:
            pg = raw.driver_connection
            pg.autocommit = True
            pg.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.refresh()          # anything that changed before LISTEN
            self._ok()
            while not self._stop.is_set():
                # Wakes on a notification, or after the heartbeat, or to
                # check the stop flag; then one cheap version query.
                wait = min(self.heartbeat, 0.2)
                deadline = time.monotonic() + self.heartbeat
                got = False
                while not got and not self._stop.is_set() and time.monotonic() < deadline:
                    got = any(True for _ in pg.notifies(timeout=wait, stop_after=1))
                if not self._stop.is_set():
                    self.refresh()
                    self._ok()
        finally:
            raw.invalidate()    # a LISTENing connection must not go back to the pool
