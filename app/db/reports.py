"""The reports operators ask for, as named queries over the views and tables.

Every function returns a list of dicts with UTC datetimes; the CLI turns
them into the operator's zone and format.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable

import sqlalchemy as sa

from ..login import normalize_domain, user_key
from .schema import last_logins, login_events
from .types import IPAddress, UTCDateTime

# The views, as far as queries need to know them (they are made by migrations).
v_last_login = sa.table(
    "v_last_login", sa.column("username"), sa.column("last_protocol"),
    sa.column("last_seen", UTCDateTime), sa.column("last_remote_ip", IPAddress),
    sa.column("first_seen", UTCDateTime), sa.column("logins", sa.BigInteger),
    sa.column("last_host"))
v_user_ips = sa.table(
    "v_user_ips", sa.column("username"), sa.column("remote_ip", IPAddress),
    sa.column("first_seen", UTCDateTime), sa.column("last_seen", UTCDateTime),
    sa.column("logins", sa.BigInteger), sa.column("refused", sa.BigInteger))
v_refused_logins = sa.table(
    "v_refused_logins", sa.column("occurred_at", UTCDateTime), sa.column("username"),
    sa.column("protocol"), sa.column("remote_ip", IPAddress),
    sa.column("local_ip", IPAddress), sa.column("rule_id", sa.Integer),
    sa.column("message"), sa.column("comment"), sa.column("policy_applied", sa.Boolean),
    sa.column("host"))

v_new_locations = sa.table(
    "v_new_locations", sa.column("occurred_at", UTCDateTime), sa.column("username"),
    sa.column("protocol"), sa.column("remote_ip", IPAddress), sa.column("country"),
    sa.column("asn", sa.BigInteger), sa.column("host"))

LAST_COLUMNS = ("username", "last_seen", "last_protocol", "last_remote_ip", "logins",
                "first_seen", "last_host")
INACTIVE_COLUMNS = ("username", "last_seen", "last_protocol", "idle_days")
# policy_applied: false when the login was decided without rules loaded
HISTORY_COLUMNS = ("occurred_at", "protocol", "outcome", "remote_ip", "country", "local_ip",
                   "rule_id", "auth_mech", "master_user", "message", "policy_applied", "host")
IPS_COLUMNS = ("remote_ip", "first_seen", "last_seen", "logins", "refused")
REFUSED_COLUMNS = ("occurred_at", "username", "protocol", "remote_ip", "rule_id", "message",
                   "policy_applied", "host")
NEW_LOCATION_COLUMNS = ("occurred_at", "username", "protocol", "remote_ip", "country", "asn",
                        "host")
DAILY_COLUMNS = ("day", "protocol", "allowed", "denied", "failed")
DAILY_HOST_COLUMNS = ("day", "host", "protocol", "allowed", "denied", "failed")
FAILED_BY_IP_COLUMNS = ("remote_ip", "failures", "users", "first_failure", "last_failure")
FAILED_BY_USER_COLUMNS = ("username", "failures", "addresses", "first_failure",
                          "last_failure")


class Rows(list):
    """A report's rows; ``total`` is set when ``limit`` cut the answer short."""

    total: int | None = None        # rows there were before the limit (None: not cut)


def _rows(conn: sa.Connection, query: sa.Select) -> list[dict[str, object]]:
    return [dict(r) for r in conn.execute(query).mappings()]


def _limited(conn: sa.Connection, query: sa.Select, limit: int | None) -> Rows:
    """At most ``limit`` rows; when there were more, ``total`` says how many."""
    if not limit:
        return Rows(_rows(conn, query))
    rows = Rows(_rows(conn, query.limit(limit + 1)))
    if len(rows) > limit:
        del rows[limit:]
        rows.total = conn.execute(sa.select(sa.func.count()).select_from(
            query.order_by(None).subquery())).scalar_one()
    return rows


def last(conn: sa.Connection, user: str | None = None, domain: str | None = None,
         limit: int | None = None, host: str | None = None) -> list[dict[str, object]]:
    """Each user's last login; with ``host``, the users whose last login was there."""
    v = v_last_login
    q = sa.select(*(v.c[c] for c in LAST_COLUMNS)).order_by(v.c.last_seen.desc())
    if host:
        q = q.where(v.c.last_host == host)
    if user:
        q = q.where(v.c.username == user)
    if domain:
        # After the first @, as rules and Dovecot's %d take it (an index-
        # friendly suffix test first, then the exact part).
        wanted = normalize_domain(domain)
        q = q.where(sa.func.lower(v.c.username).endswith("@" + wanted, autoescape=True),
                    sa.func.lower(_after_first_at(conn, v.c.username)) == wanted)
    return _limited(conn, q, limit)


def _after_first_at(conn: sa.Connection, column):
    at = (sa.func.strpos(column, "@") if conn.dialect.name == "postgresql"
          else sa.func.instr(column, "@"))
    return sa.func.substr(column, at + 1)


def inactive(conn: sa.Connection, days: int, now: dt.datetime,
             accounts: Iterable[str] | None = None,
             limit: int | None = None) -> list[dict[str, object]]:
    """Users whose last login is more than ``days`` ago (the longest idle
    first; with ``limit``, at most that many, and ``total`` when there were more).

    With ``accounts`` (every account that exists), those that never logged
    in at all are reported too, and only listed accounts are reported.
    """
    cutoff = now - dt.timedelta(days=days)
    t = last_logins
    per_user = (sa.select(t.c.username, sa.func.max(t.c.last_seen).label("last_seen"))
                .group_by(t.c.username))
    if accounts is None:
        v = v_last_login
        q = (sa.select(v.c.username, v.c.last_seen, v.c.last_protocol)
             .where(v.c.last_seen < cutoff).order_by(v.c.last_seen))
        rows = _limited(conn, q, limit)
    else:
        seen = {r.username: r.last_seen for r in conn.execute(per_user)}
        wanted = list(dict.fromkeys(a for a in accounts if a))
        rows = [{"username": a, "last_seen": _utc(seen.get(a)), "last_protocol": None}
                for a in wanted if a not in seen or _utc(seen[a]) < cutoff]
        rows.sort(key=lambda r: (r["last_seen"] is not None, r["last_seen"] or now))
        if limit and len(rows) > limit:
            total = len(rows)
            rows = Rows(rows[:limit])
            rows.total = total
    for r in rows:
        r["idle_days"] = (now - r["last_seen"]).days if r["last_seen"] else None
    return rows


def _utc(value):
    return UTCDateTime().process_result_value(value, None) if value is not None else None


def history(conn: sa.Connection, user: str, since: dt.datetime | None = None,
            limit: int | None = 1000, host: str | None = None) -> list[dict[str, object]]:
    e = login_events
    q = (sa.select(*(e.c[c] for c in HISTORY_COLUMNS)).where(e.c.username == user)
         .order_by(e.c.occurred_at.desc()))
    if host:
        q = q.where(e.c.host == host)
    if since:
        q = q.where(e.c.occurred_at >= since)
    return _limited(conn, q, limit)


def ips(conn: sa.Connection, user: str) -> list[dict[str, object]]:
    v = v_user_ips
    q = (sa.select(*(v.c[c] for c in IPS_COLUMNS)).where(v.c.username == user)
         .order_by(v.c.last_seen.desc()))
    return _rows(conn, q)


def refused(conn: sa.Connection, since: dt.datetime, limit: int | None = 1000,
            host: str | None = None) -> list[dict[str, object]]:
    v = v_refused_logins
    q = (sa.select(*(v.c[c] for c in REFUSED_COLUMNS)).where(v.c.occurred_at >= since)
         .order_by(v.c.occurred_at.desc()))
    if host:
        q = q.where(v.c.host == host)
    return _limited(conn, q, limit)


def new_locations(conn: sa.Connection, since: dt.datetime, user: str | None = None,
                  limit: int | None = 1000) -> list[dict[str, object]]:
    """Logins flagged new_location since ``since``, newest first (``user``: exact name)."""
    v = v_new_locations
    q = (sa.select(*(v.c[c] for c in NEW_LOCATION_COLUMNS)).where(v.c.occurred_at >= since)
         .order_by(v.c.occurred_at.desc()))
    if user:
        q = q.where(v.c.username == user)
    return _limited(conn, q, limit)


def failed(conn: sa.Connection, since: dt.datetime, by: str = "ip",
           limit: int | None = 1000, host: str | None = None) -> list[dict[str, object]]:
    """Failed authentications since ``since``, per client address (``by='ip'``)
    or per username (``by='user'``): how many, how many distinct users (or
    addresses), first and last; most failures first."""
    e = login_events
    key, other = ((e.c.remote_ip, e.c.username) if by == "ip" else (e.c.username, e.c.remote_ip))
    q = (sa.select(key,
                   sa.func.count().label("failures"),
                   sa.func.count(sa.distinct(other)).label("users" if by == "ip"
                                                            else "addresses"),
                   sa.func.min(e.c.occurred_at).label("first_failure"),
                   sa.func.max(e.c.occurred_at).label("last_failure"))
         .where(e.c.outcome == "failed", e.c.occurred_at >= since)
         .group_by(key)
         .order_by(sa.func.count().desc(), sa.func.max(e.c.occurred_at).desc(), key))
    if host:
        q = q.where(e.c.host == host)
    rows = _limited(conn, q, limit)
    for row in rows:        # SQLite hands aggregated times back as text
        row["first_failure"] = _utc(row["first_failure"])
        row["last_failure"] = _utc(row["last_failure"])
    return rows


def daily(conn: sa.Connection, days: int, now: dt.datetime,
          tz: dt.tzinfo = dt.timezone.utc, host: str | None = None,
          by_host: bool = False) -> list[dict[str, object]]:
    """Logins per day (in ``tz``) and protocol, for the last ``days`` days.

    The database counts per UTC hour (``hourly``); the hours are put into
    days here (``fold_days``), so a day is the operator's day whatever zone
    the database runs in. With ``host`` only that mail host's logins;
    ``by_host`` adds a row per host (``host`` None: logins stored before
    hosts were recorded).
    """
    start_day = now.astimezone(tz).date() - dt.timedelta(days=days - 1)
    start = dt.datetime.combine(start_day, dt.time(), tz).astimezone(dt.timezone.utc)
    return fold_days(hourly(conn, start, host, by_host, bucket_minutes(tz, start, now)), tz,
                     by_host=by_host, first_day=start_day)


def bucket_minutes(tz: dt.tzinfo, *moments: dt.datetime) -> int:
    """How finely ``hourly`` must count for days in ``tz``: 60 where the zone
    is a whole number of hours from UTC on every day between the earliest and
    the latest of ``moments``; 15 where it is not
    (India +5:30, Nepal +5:45, Newfoundland -3:30, ...), else the logins of a
    day's first half hour would land in the UTC hour that began the day before.
    """
    hour, day = dt.timedelta(hours=1), dt.timedelta(days=1)
    at, end = min(moments), max(moments)
    while True:         # each day of the window: a zone may move by half an hour
        if (at.astimezone(tz).utcoffset() or dt.timedelta()) % hour:
            return 15
        if at >= end:
            return 60
        at = min(at + day, end)


# --- what the dashboard adds (app/web) ------------------------------------------

RECENT_COLUMNS = ("occurred_at", "username", "protocol", "outcome", "remote_ip", "country",
                  "rule_id", "host")
LAST_BY_PROTOCOL_COLUMNS = ("protocol", "last_seen", "last_remote_ip", "last_local_ip",
                            "login_count", "first_seen", "last_host")
FOUND_COLUMNS = ("username", "last_seen")


def recent(conn: sa.Connection, limit: int = 50) -> list[dict[str, object]]:
    """The newest logins, allowed and refused (the occurred_at index, newest first)."""
    e = login_events
    q = (sa.select(*(e.c[c] for c in RECENT_COLUMNS))
         .order_by(e.c.occurred_at.desc()).limit(limit))
    return _rows(conn, q)


def last_by_protocol(conn: sa.Connection, user: str) -> list[dict[str, object]]:
    """One user's last allowed login per protocol (last_logins' key)."""
    t = last_logins
    q = (sa.select(*(t.c[c] for c in LAST_BY_PROTOCOL_COLUMNS))
         .where(t.c.username == user).order_by(t.c.last_seen.desc()))
    return _rows(conn, q)


def find_users(conn: sa.Connection, text: str, limit: int = 100) -> Rows:
    """Users whose name holds ``text`` (ASCII case ignored), last seen first.

    Names compare as login.user_key compares them: blanks trimmed, only ASCII
    lowercased (a Kelvin sign is not a k, É is not é), on both backends.
    Reads last_logins (one row per user and protocol), so a user who was
    only ever refused is not found here; their page still opens by name.
    """
    t = last_logins
    pattern = _ascii_lower(conn, t.c.username).contains(user_key(text), autoescape=True)
    q = (sa.select(t.c.username, sa.func.max(t.c.last_seen).label("last_seen"))
         .where(pattern).group_by(t.c.username)
         .order_by(sa.func.max(t.c.last_seen).desc(), t.c.username))
    rows = _limited(conn, q, limit)
    for r in rows:
        r["last_seen"] = _utc(r["last_seen"])       # an aggregate: the type is not applied
    return rows


_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _ascii_lower(conn: sa.Connection, column: sa.ColumnElement) -> sa.ColumnElement:
    """``column`` with A-Z lowercased and nothing else (user_key's rule):
    PostgreSQL's lower() follows the collation, SQLite's is ASCII only."""
    if conn.dialect.name == "postgresql":
        return sa.func.translate(column, _UPPER, _UPPER.lower())
    return sa.func.lower(column)


def hourly(conn: sa.Connection, start: dt.datetime, host: str | None = None,
           by_host: bool = False, minutes: int = 60) -> list[dict[str, object]]:
    """Logins per UTC hour (or quarter hour: ``minutes`` 15), protocol and
    outcome (and host) from ``start`` on; ``hour`` is when the bucket begins."""
    e = login_events
    if conn.dialect.name == "postgresql":
        utc = sa.func.timezone("UTC", e.c.occurred_at)
        hour = sa.func.date_trunc("hour", utc)
        if minutes != 60:
            quarter = sa.cast(sa.func.floor(sa.extract("minute", utc) / minutes) * minutes,
                              sa.Integer)
            hour = hour + sa.func.make_interval(0, 0, 0, 0, 0, quarter)
    elif minutes == 60:
        hour = sa.func.strftime("%Y-%m-%d %H:00:00", e.c.occurred_at)
    else:
        quarter = sa.cast(sa.func.strftime("%M", e.c.occurred_at), sa.Integer) // minutes * minutes
        hour = (sa.func.strftime("%Y-%m-%d %H:", e.c.occurred_at)
                .concat(sa.func.printf("%02d:00", quarter)))
    group = [hour, e.c.protocol, e.c.outcome] + ([e.c.host] if by_host else [])
    q = (sa.select(hour.label("hour"), *group[1:], sa.func.count().label("n"))
         .where(e.c.occurred_at >= start).group_by(*group))
    if host:
        q = q.where(e.c.host == host)
    out = []
    for r in conn.execute(q):
        h = r.hour if isinstance(r.hour, dt.datetime) else dt.datetime.fromisoformat(r.hour)
        row = {"hour": h.replace(tzinfo=dt.timezone.utc), "protocol": r.protocol,
               "outcome": r.outcome, "n": r.n}
        if by_host:
            row["host"] = r.host
        out.append(row)
    return out


def fold_days(hours: Iterable[dict[str, object]], tz: dt.tzinfo = dt.timezone.utc,
              since: dt.datetime | None = None, by_host: bool = False,
              first_day: dt.date | None = None) -> list[dict[str, object]]:
    """``hourly`` rows (those of hours from ``since`` on) as ``daily`` rows in ``tz``.

    In a zone whose days start at half past (or :45), the first UTC hour
    begins before ``first_day`` does but holds only its logins (``hourly``
    counted from the day's start): it is counted on ``first_day``.
    """
    buckets: dict[tuple[object, ...], dict[str, object]] = {}
    for r in hours:
        if since is not None and r["hour"] < since:
            continue
        day = r["hour"].astimezone(tz).date()
        if first_day is not None and day < first_day:
            day = first_day
        where = {"host": r["host"]} if by_host else {}
        row = buckets.setdefault((day, *where.values(), r["protocol"]),
                                 {"day": day, **where, "protocol": r["protocol"],
                                  "allowed": 0, "denied": 0, "failed": 0})
        row[r["outcome"]] += r["n"]
    return sorted(buckets.values(),
                  key=lambda r: (r["day"], r.get("host") or "", r["protocol"]))
