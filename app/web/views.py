"""What each page shows: one function per page, returning plain data.

The HTML page and its JSON twin (/api/...) render the same dict, so they
cannot disagree. Queries are the report queries of app/db/reports.py;
decisions come from service.explain, as `lastlogin check` prints them.

The overview is a list of sections: adding one is a query function and a
template named after it (templates/sections/<name>.html).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import sqlalchemy as sa

from ..config import ConfigError, Settings
from ..db import reports
from ..db.rules import list_rules, rule_states
from ..health import CRITICAL, LEVEL, checks
from ..login import PROTOCOLS, domain_of, normalize_user, parse_ip, user_key
from ..policy import Rule, rule_state
from ..protocol import LoginRequest
from ..service import Explanation, explain
from ..snapshot import load_snapshot
from ..sysgroups import system_groups

log = logging.getLogger("lastlogin.web")

DAYS = 30               # the overview's chart
RECENT = 50             # rows in the overview's tables
REFUSED_SINCE = dt.timedelta(days=7)
HISTORY = 200           # rows of a user's history
INACTIVE_LIMIT = 1000   # rows of the inactive page and its JSON, unless limit= says
INACTIVE_MAX = 100_000  # the most limit= may ask for


@dataclass(frozen=True)
class Ctx:
    """What every page is computed with: the settings, the moment, the zone,
    and what the process keeps between requests."""

    settings: Settings
    now: dt.datetime
    tz: dt.tzinfo
    daily: "DailyCounts"
    health: "Health"


class DailyCounts:
    """The chart's counts: closed hours kept, recent hours asked every time.

    An hour is kept once it ended more than an hour ago. Everything is read
    again every ``refresh`` seconds, so a login stored late (a spool replay
    after an outage, an import) shows within that time; with an ``engine``
    that reading runs in the background (and ``warm`` starts the first one
    when the server starts), so no request waits for it but the very first.
    """

    def __init__(self, days: int = DAYS, refresh: float = 900.0,
                 clock: Callable[[], float] = time.monotonic,
                 engine: sa.Engine | None = None) -> None:
        self.days, self.refresh, self.clock, self.engine = days, refresh, clock, engine
        self._kept: list[dict[str, Any]] = []
        self._upto: dt.datetime | None = None        # kept hours are before this
        self._start: dt.datetime | None = None
        self._minutes = 60                          # reports.hourly's bucket of _kept
        self._loaded = 0.0
        self._lock = threading.Lock()               # the fields above
        self._loading = threading.Lock()            # one full reading at a time

    def start_day(self, now: dt.datetime, tz: dt.tzinfo) -> dt.date:
        return now.astimezone(tz).date() - dt.timedelta(days=self.days - 1)

    def _start_of(self, now: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
        return dt.datetime.combine(self.start_day(now, tz), dt.time(),
                                   tz).astimezone(dt.timezone.utc)

    def _load(self, conn: sa.Connection, now: dt.datetime, start: dt.datetime,
              minutes: int) -> None:
        upto = now.replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)
        kept = [h for h in reports.hourly(conn, start, minutes=minutes) if h["hour"] < upto]
        with self._lock:
            self._kept, self._upto, self._start, self._loaded = kept, upto, start, self.clock()
            self._minutes = minutes

    def _load_in_background(self, tz: dt.tzinfo) -> None:
        def run() -> None:
            try:
                assert self.engine is not None
                with self.engine.connect() as conn:
                    now = dt.datetime.now(dt.timezone.utc)
                    start = self._start_of(now, tz)
                    self._load(conn, now, start, reports.bucket_minutes(tz, start, now))
            except Exception:  # noqa: BLE001 -- the next request reads in the foreground
                log.warning("event=web_daily_reload_failed", exc_info=True)
            finally:
                self._loading.release()
        if self._loading.acquire(blocking=False):
            threading.Thread(target=run, name="daily-counts", daemon=True).start()

    def warm(self, tz: dt.tzinfo) -> None:
        """Start the first full reading now (the server is starting)."""
        if self.engine is not None:
            self._load_in_background(tz)

    def rows(self, conn: sa.Connection, now: dt.datetime, tz: dt.tzinfo) -> list[dict]:
        start = self._start_of(now, tz)
        minutes = reports.bucket_minutes(tz, start, now)

        def usable() -> bool:
            with self._lock:
                return (self._upto is not None and self._start is not None
                        and start >= self._start and self._minutes == minutes)
        with self._lock:
            stale = self.clock() - self._loaded > self.refresh
        if not usable():
            with self._loading:                 # the first time: wait for a reading
                if not usable():
                    self._load(conn, now, start, minutes)
        elif stale and self.engine is not None:
            self._load_in_background(tz)
        elif stale:
            with self._loading:
                self._load(conn, now, start, minutes)
        with self._lock:
            kept, upto = self._kept, self._upto
        fresh = reports.hourly(conn, upto, minutes=minutes)
        # the hours `report daily` would read: from the hour the first day starts in
        since = start.replace(minute=0, second=0, microsecond=0)
        return reports.fold_days(kept + fresh, tz, since, first_day=self.start_day(now, tz))


# --- the overview ------------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    name: str           # its key in /api/overview and templates/sections/<name>.html
    title: str
    query: Callable[[sa.Connection, Ctx], Any]


class Health:
    """`lastlogin status`'s facts, at most ``ttl`` seconds old.

    Gathering them opens a connection of their own and reads the schema's
    revision (a few hundred milliseconds on a busy host): ``prefetch``
    starts that beside the page's queries, ``get`` waits for it.
    """

    def __init__(self, settings: Settings, ttl: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.ttl, self.clock = settings, ttl, clock
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "health")
        self._future: concurrent.futures.Future | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def prefetch(self) -> None:
        with self._lock:
            if self._future is None or (self._future.done()
                                        and self.clock() - self._at > self.ttl):
                self._at = self.clock()
                self._future = self._pool.submit(health, self.settings)

    def get(self) -> dict[str, Any]:
        self.prefetch()
        assert self._future is not None
        return self._future.result()


def health(settings: Settings) -> dict[str, Any]:
    """What `lastlogin status --format json` says."""
    try:
        results = checks(settings)
    except ConfigError as exc:
        results = [(CRITICAL, "settings", f"{exc.reason} ({exc.key})")]
    worst = max(level for level, _, _ in results)
    return {"status": LEVEL[worst], "checks": [
        {"status": LEVEL[lv], "check": name, "detail": detail} for lv, name, detail in results]}


def _refused(conn: sa.Connection, ctx: Ctx) -> dict[str, Any]:
    rows = reports.refused(conn, ctx.now - REFUSED_SINCE, RECENT)
    return {"rows": rows, "total": getattr(rows, "total", None) or len(rows)}


FAILED_SINCE = dt.timedelta(days=1)
NEW_SINCE = dt.timedelta(days=7)


def _failed(conn: sa.Connection, ctx: Ctx) -> dict[str, Any]:
    """`lastlogin report failed --since 24h --by ip`."""
    rows = reports.failed(conn, ctx.now - FAILED_SINCE, "ip", RECENT)
    return {"rows": rows, "total": getattr(rows, "total", None) or len(rows)}


def _blocks(conn: sa.Connection, ctx: Ctx) -> dict[str, Any]:
    """Automatic blocks in force now (rules created by `auto`, state on)."""
    states = rule_states(conn, ctx.now)
    rows = [{c: r[c] for c in RULE_COLUMNS} for r in list_rules(conn)
            if r["created_by"] == "auto" and states.get(r["id"]) == "on"]
    return {"rows": rows[:RECENT], "total": len(rows)}


def _new_locations(conn: sa.Connection, ctx: Ctx) -> dict[str, Any]:
    """`lastlogin report new-locations --since 7d`."""
    rows = reports.new_locations(conn, ctx.now - NEW_SINCE, None, RECENT)
    return {"rows": rows, "total": getattr(rows, "total", None) or len(rows)}


SECTIONS: list[Section] = [
    Section("daily", f"Logins per day, last {DAYS} days", lambda conn, ctx: {
        "start_day": ctx.daily.start_day(ctx.now, ctx.tz), "days": ctx.daily.days,
        "rows": ctx.daily.rows(conn, ctx.now, ctx.tz)}),
    Section("recent", "Recent logins", lambda conn, ctx: reports.recent(conn, RECENT)),
    Section("refused", "Refused in the last 7 days", _refused),
    Section("failed", "Failed authentications in the last 24 hours, by address", _failed),
    Section("blocks", "Automatic blocks in force", _blocks),
    Section("new_locations", "Logins from new places in the last 7 days", _new_locations),
    Section("health", "Health (lastlogin status)", lambda conn, ctx: ctx.health.get()),
]


def overview(conn: sa.Connection, ctx: Ctx) -> dict[str, Any]:
    ctx.health.prefetch()           # beside the queries, not after them
    return {s.name: s.query(conn, ctx) for s in SECTIONS}


# --- one user ----------------------------------------------------------------------

def _user_rules(snap, name: str, ips: list[dict[str, Any]]) -> list[Rule]:
    """The rules that concern a user: those naming them or their domain (or
    no one), and the automatic blocks of their name or of an address they
    used (held apart from the ordered rules, app/policy.AutoBlocks)."""
    rules = [r for r in snap.rules if r.concerns(name)]
    found = {}
    block = snap.auto.by_user.get(user_key(name))
    if block is not None:
        found[block.id] = block
    for row in ips:
        ip = parse_ip(row["remote_ip"]) if row["remote_ip"] is not None else None
        if ip is None:
            continue
        for block in snap.auto.of_address(ip):
            found[block.id] = block
    return rules + sorted(found.values(), key=lambda r: r.id)


def _rule_row(rule: Rule, now: dt.datetime) -> dict[str, Any]:
    return {"id": rule.id, "action": rule.action, "priority": rule.priority,
            "state": rule_state(rule.enabled, rule.valid_from, rule.valid_until, now),
            "username": rule.username, "domain": rule.domain,
            "remote_network": str(rule.remote_network) if rule.remote_network else None,
            "local_network": str(rule.local_network) if rule.local_network else None,
            "protocol": rule.protocol, "valid_from": rule.valid_from,
            "valid_until": rule.valid_until, "message": rule.message}


def check_result(ex: Explanation, ip: str, local_ip: str | None,
                 protocol: str) -> dict[str, Any]:
    """`lastlogin check USER IP --protocol P --local-ip L`, as data."""
    d = ex.decision
    out: dict[str, Any] = {"ip": ip, "local_ip": local_ip, "protocol": protocol,
                           "decision": d.action, "rule": d.rule.id if d.rule else None,
                           "reason": d.reason, "message": ex.client_text, "fields": [],
                           "alerts": []}
    if d.temporary and d.reason.startswith("override:"):
        out.update(decision="refused", message=d.reason[len("override: "):])
    elif ex.plan is not None:
        out["fields"] = [f.decode("utf-8", "backslashreplace") for f in ex.plan.fields]
        out["alerts"] = ex.plan.alert_bytes.decode("utf-8", "replace").splitlines()
    return out


def check(snap: Any, settings: Settings, name: str, ip: str, local_ip: str | None,
          protocol: str, now: dt.datetime) -> dict[str, Any]:
    """What `lastlogin check` decides, from the same inputs: the name as
    `check` normalises it, the server address, the system groups when
    acl_groups_from_system is on."""
    username = normalize_user(name)
    req = LoginRequest((local_ip or "").encode(), ip.encode(),
                       username.encode("utf-8", "surrogateescape"), [])
    groups = tuple(system_groups(username)) if settings.acl_groups_from_system else ()
    ex = explain(snap, protocol, req, now, settings.default_action,
                 settings.rules_unloaded_action, groups)
    return check_result(ex, ip, local_ip, protocol)


def user(conn: sa.Connection, ctx: Ctx, name: str, ip: str | None = None,
         protocol: str | None = None, local_ip: str | None = None) -> dict[str, Any]:
    """A user's page: history, last login per protocol, addresses, the rules,
    overrides and alerts that concern them, and what `check` says now (for
    ``ip``/``protocol``/``local_ip``, by default those of their last login;
    ``local_ip`` "" is no server address)."""
    history = reports.history(conn, name, limit=HISTORY)
    last = reports.last_by_protocol(conn, name)
    snap = load_snapshot(conn)
    s = ctx.settings
    if ip is None and last:
        ip, protocol = last[0]["last_remote_ip"], protocol or last[0]["protocol"]
        local_ip = last[0]["last_local_ip"] if local_ip is None else local_ip
    elif ip is None and history:
        ip = history[0]["remote_ip"]
        local_ip = history[0]["local_ip"] if local_ip is None else local_ip
    elif local_ip is None and last:
        local_ip = last[0]["last_local_ip"]
    elif local_ip is None and history:
        local_ip = history[0]["local_ip"]
    protocol = protocol if protocol in PROTOCOLS else "imap"
    local_ip = local_ip if local_ip and parse_ip(local_ip) is not None else None
    result = None
    if ip and parse_ip(ip) is not None:
        result = check(snap, s, name, ip, local_ip, protocol, ctx.now)
    domain = domain_of(name)
    ips = reports.ips(conn, name)
    return {
        "username": name,
        "found": bool(history or last),
        "last_by_protocol": last,
        "history": history,
        "history_total": getattr(history, "total", None) or len(history),
        "ips": ips,
        "rules": [_rule_row(r, ctx.now) for r in _user_rules(snap, name, ips)],
        "default_action": s.default_action,
        "overrides": snap.overrides.for_login(name),
        "alerts": [{"id": a.id, "scope": a.scope, "message": a.message,
                    "show_once": a.show_once} for a in snap.alerts
                   if a.applies(name, domain, ctx.now)],
        "check": result,
    }


# --- the other pages ---------------------------------------------------------------

def inactive(conn: sa.Connection, ctx: Ctx, days: int,
             limit: int = INACTIVE_LIMIT) -> dict[str, Any]:
    rows = reports.inactive(conn, days, ctx.now, limit=limit)
    return {"days": days, "limit": limit,
            "total": getattr(rows, "total", None) or len(rows), "rows": rows}


RULE_COLUMNS = ("id", "action", "priority", "enabled", "username", "domain", "remote_network",
                "local_network", "protocol", "countries", "asns", "valid_from", "valid_until",
                "message", "comment", "created_by")


def rules(conn: sa.Connection, ctx: Ctx) -> dict[str, Any]:
    # the state `rule list` shows: the loader's own verdict per row
    states = rule_states(conn, ctx.now)
    rows = [dict({c: r[c] for c in RULE_COLUMNS}, state=states.get(r["id"], ""))
            for r in list_rules(conn)]
    return {"default_action": ctx.settings.default_action, "rows": rows}


def search(conn: sa.Connection, ctx: Ctx, text: str) -> dict[str, Any]:
    rows = reports.find_users(conn, text, RECENT * 2) if text else []
    exact = bool(text) and bool(reports.history(conn, text, limit=1))
    return {"q": text, "rows": rows, "total": getattr(rows, "total", None) or len(rows),
            "exact": exact}
