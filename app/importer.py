"""Backfill: Dovecot's own log lines, and the last_login plugin's table.

Log import reads `<proto>-login: Login: user=<...>, method=..., rip=..., lip=...`
lines (2.4 writes `Logged in: user=<...>`); a login that post-login refused is followed by the mail process's
`Post-login script denied access to user ...` line and is counted as refused.
Event ids are derived from the line's content, so importing the same file
twice stores nothing the second time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import os
import re
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

import sqlalchemy as sa

from .db.engine import dialect_insert
from .db.schema import last_logins, login_events
from .db.store import record_logins
from .login import LoginRecord, normalize_ip, username_text

NAMESPACE = uuid.UUID("6f0f7c52-3f43-4c55-9a4e-8a3c1e0b5d21")
PENDING = 5000          # logins kept open for a later "denied" line
BATCH = 1000
MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

_SYSLOG = re.compile(rb"^(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) "
                     rb"(?P<time>\d\d:\d\d:\d\d)(?:\.(?P<frac>\d+))? ")
_ISO = re.compile(rb"^(?P<iso>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?"
                  rb"(?:Z|[+-]\d\d:?\d\d)?) ")
# What may stand between the stamp and Dovecot's own text: a syslog host
# name and the `dovecot[pid]: ` tag. Everything after is parsed field by
# field from a fixed start, never searched for, so text inside a username
# cannot make one kind of line look like another.
_PREFIX = rb"(?:[A-Za-z0-9][A-Za-z0-9._-]* )?(?:dovecot(?:\[\d+\])?: )?"
_LOGIN = re.compile(_PREFIX + rb"(?P<proto>imap|pop3|submission|managesieve)-login: "
                    rb"(?:Info: )?(?:Login|Logged in): user=<(?P<user>.*)>, "
                    rb"method=(?P<method>[^,]*), rip=(?P<rip>[^,]*), lip=(?P<lip>[^,]*)"
                    rb"(?P<rest>(?:, .*)?)$")
# The mail process's errors that end a login at the post-login step.
_FAILURES = (b"Post-login script denied access to user ", b"net_connect_unix(",
             b"Timeout waiting for post-login script", b"fd_read(")
_DENIED = re.compile(_PREFIX + rb"(?P<proto>imap|pop3|submission|managesieve)\((?P<user>.*)\)"
                     rb"(?:<(?P<pid>\d+)>)?(?:<(?P<session>[^>]*)>)?: Error: "
                     rb"(?:" + b"|".join(re.escape(f) for f in _FAILURES) + rb")")
_SUFFIX_SESSION = re.compile(rb"\bsession=<?([A-Za-z0-9+/]+)")
_MPID = re.compile(rb"(?:^|, )mpid=(\d+)")
_SESSION = re.compile(rb"(?:^|, )session=<([^>]*)>")
RECORDED_WINDOW = dt.timedelta(seconds=5)   # log stamp vs the daemon's own record


@dataclass
class ImportStats:
    files: int = 0
    lines: int = 0
    logins: int = 0
    refused: int = 0
    new: int = 0
    recorded: int = 0       # the daemon (or an earlier import) already has them
    outside: int = 0        # before --since or after --until
    empty_user: int = 0     # `user=<>`: nothing to record
    unparsable: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def already(self) -> int:
        return self.logins - self.new

    def bad(self, line: bytes) -> None:
        self.unparsable += 1
        if len(self.examples) < 3:
            self.examples.append(line[:200].decode("utf-8", "backslashreplace"))


class DamagedLog(Exception):
    """A log file ended in the middle (a truncated or corrupt .gz)."""

    def __init__(self, path: str, lines: int, stats: ImportStats, reason: str,
                 unread: int = 0) -> None:
        later = f"; {unread} later file(s) not read" if unread else ""
        super().__init__(f"{path}: {reason} after line {lines:,}; everything before it was "
                         f"imported: {stats.logins:,} logins read, {stats.new:,} new, "
                         f"{stats.already:,} already recorded{later}")
        self.path = path
        self.lines = lines
        self.stats = stats


class StampParser:
    """Turns a line's time stamp into UTC.

    Syslog stamps have no year: it is the file's year (its mtime), or the
    year before for months after the file's month (a log across New Year).
    Stamps without a zone are in ``zone`` (the local zone by default).
    """

    def __init__(self, reference: dt.datetime, zone: dt.tzinfo | None,
                 year: int | None = None) -> None:
        self.reference = reference
        self.zone = zone
        self.year = year

    def parse(self, line: bytes) -> tuple[dt.datetime, int] | None:
        m = _SYSLOG.match(line)
        if m:
            month = MONTHS.get(m.group("mon").decode())
            if month is None:
                return None
            year = self.year or (self.reference.year if month <= self.reference.month
                                 else self.reference.year - 1)
            h, mi, s = (int(x) for x in m.group("time").split(b":"))
            frac = int((m.group("frac") or b"0").ljust(6, b"0")[:6])
            try:
                naive = dt.datetime(year, month, int(m.group("day")), h, mi, s, frac)
            except ValueError:
                return None
            return self._zoned(naive), m.end()
        m = _ISO.match(line)
        if m:
            try:
                stamp = dt.datetime.fromisoformat(m.group("iso").decode().replace("Z", "+00:00"))
            except ValueError:
                return None
            return self._zoned(stamp), m.end()
        return None

    def _zoned(self, stamp: dt.datetime) -> dt.datetime:
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=self.zone) if self.zone else stamp.astimezone()
        return stamp.astimezone(dt.timezone.utc)


def open_log(path: str) -> BinaryIO:
    """A log file, gunzipped when it is gzip (by its magic bytes, not its name)."""
    raw = open(path, "rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    raw.seek(0)
    return raw


def _field(pattern: re.Pattern[bytes], text: bytes) -> bytes | None:
    m = pattern.search(text)
    return m.group(1) if m else None


def parse_login(stamp: dt.datetime, body: bytes) -> tuple[LoginRecord, str] | None:
    """A `<proto>-login: Login: user=<...>, method=..., rip=..., lip=...` line's login.

    ``body`` is the line after its time stamp; the login text must start
    there (after an optional host name and `dovecot: ` tag).
    """
    m = _LOGIN.match(body)
    if m is None:
        return None
    proto = m.group("proto").decode()
    user = m.group("user")
    session = _field(_SESSION, m.group("rest")) or b""
    mpid = _field(_MPID, m.group("rest")) or b""
    key = (session or mpid).decode("ascii", "replace")
    event_id = uuid.uuid5(NAMESPACE, "|".join([
        proto, stamp.isoformat(), session.decode("ascii", "replace"),
        mpid.decode("ascii", "replace"), user.decode("utf-8", "backslashreplace")]))
    method = m.group("method")
    record = LoginRecord(event_id=event_id, occurred_at=stamp, username=user, protocol=proto,
                         remote_ip=normalize_ip(m.group("rip")),
                         local_ip=normalize_ip(m.group("lip")), outcome="allowed",
                         auth_mech=method or None)
    return record, f"{proto}:{key}" if key else f"{proto}:user:{user!r}"


def _denied_key(m: re.Match[bytes], line: bytes) -> list[str]:
    proto = m.group("proto").decode()
    keys = []
    session = m.group("session") or _field(_SUFFIX_SESSION, line[m.end():])
    if session:
        keys.append(f"{proto}:{session.decode('ascii', 'replace')}")
    if m.group("pid"):
        keys.append(f"{proto}:{m.group('pid').decode()}")
    keys.append(f"{proto}:user:{m.group('user')!r}")
    return keys


def read_logins(lines: Iterator[bytes], stamps: StampParser, stats: ImportStats
                ) -> Iterator[LoginRecord]:
    """The logins in ``lines``, refused ones marked denied.

    The login process and the mail process write to the log independently,
    so a mail process's failure line may come just before the `Login:` line
    it belongs to: unmatched failures wait for their login a while too.
    A line is a login only when its text, right after the stamp, is a
    login-process `Login:` message; a failure only when it is a mail
    process's error line. Whatever a username contains, it is a username.
    """
    pending: OrderedDict[str, LoginRecord] = OrderedDict()
    failed: OrderedDict[str, bytes] = OrderedDict()     # key -> the failure line
    for line in lines:
        stats.lines += 1
        line = line.rstrip(b"\r\n")
        maybe_login = b"Login: user=<" in line or b"Logged in: user=<" in line   # 2.3, 2.4
        maybe_denied = b": Error: " in line and any(f in line for f in _FAILURES)
        if not (maybe_login or maybe_denied):
            continue
        parsed = stamps.parse(line)
        if parsed is None:
            stats.bad(line)
            continue
        stamp, offset = parsed
        body = line[offset:]
        found = parse_login(stamp, body) if maybe_login else None
        if found is None:
            m = _DENIED.match(body) if maybe_denied else None
            if m is None:
                if maybe_login and _LOGIN_START.match(body):
                    stats.bad(line)         # a login line we cannot read
                elif maybe_denied and _DENIED_START.match(body):
                    stats.bad(line)
                continue                    # another message that merely quotes the words
            keys = _denied_key(m, line)
            key = next((k for k in keys if k in pending), None)
            if key is None:
                failed[keys[0]] = line
                while len(failed) > PENDING:
                    stats.bad(failed.popitem(last=False)[1])
                continue
            pending[key] = dataclasses.replace(pending[key], outcome="denied")
            continue
        record, key = found
        if key in pending:
            yield pending.pop(key)
        if failed.pop(key, None) is not None:
            record = dataclasses.replace(record, outcome="denied")
        pending[key] = record
        while len(pending) > PENDING:
            yield pending.popitem(last=False)[1]
    yield from pending.values()
    for line in failed.values():
        stats.bad(line)


_LOGIN_START = re.compile(_PREFIX + rb"(?:imap|pop3|submission|managesieve)-login: "
                          rb"(?:Info: )?(?:Login|Logged in): ")
_DENIED_START = re.compile(_PREFIX + rb"(?:imap|pop3|submission|managesieve)\(")


def _unrecorded(conn: sa.Connection, records: list[LoginRecord],
                window: dt.timedelta = RECORDED_WINDOW) -> list[LoginRecord]:
    """The records the database does not have yet, by what the log can show.

    A login the daemon recorded has the same user, protocol and remote
    address and a time within ``window`` of the log's stamp (which is cut
    to the second and written by another process). Each stored event
    matches one log line at most, so two logins in the same second stay two.
    """
    if not records:
        return []
    e = login_events
    names = sorted({username_text(r.username)[0] for r in records})
    lo = min(r.occurred_at for r in records) - window
    hi = max(r.occurred_at for r in records) + window
    stored: dict[tuple[str, str, str | None], list[dt.datetime]] = {}
    for i in range(0, len(names), 500):
        q = (sa.select(e.c.username, e.c.protocol, e.c.remote_ip, e.c.occurred_at)
             .where(e.c.username.in_(names[i:i + 500]), e.c.occurred_at >= lo,
                    e.c.occurred_at <= hi))
        for row in conn.execute(q):
            stored.setdefault((row.username, row.protocol, row.remote_ip), []).append(
                row.occurred_at)
    out = []
    for r in records:
        times = stored.get((username_text(r.username)[0], r.protocol, r.remote_ip))
        if times:
            best = min(times, key=lambda t: abs(t - r.occurred_at))
            if abs(best - r.occurred_at) <= window:
                times.remove(best)
                continue
        out.append(r)
    return out


def import_logs(engine: sa.Engine, paths: list[str], zone: dt.tzinfo | None = None,
                year: int | None = None, progress: Callable[[int], None] | None = None,
                since: dt.datetime | None = None, until: dt.datetime | None = None
                ) -> ImportStats:
    """Import the logins of Dovecot log files, skipping those already recorded.

    Only logins in [``since``, ``until``) are considered. A damaged file
    (e.g. a truncated .gz) stops the import with DamagedLog, after what was
    read before the damage has been committed.
    """
    stats = ImportStats()
    batch: list[LoginRecord] = []

    def flush() -> None:
        if batch:
            with engine.begin() as conn:
                fresh = _unrecorded(conn, batch)
                stats.recorded += len(batch) - len(fresh)
                stats.new += record_logins(conn, fresh)
            batch.clear()

    for path in paths:
        stats.files += 1
        mtime = dt.datetime.fromtimestamp(os.path.getmtime(path)).astimezone()
        stamps = StampParser(mtime, zone, year)
        damage: list[BaseException] = []
        lines_before = stats.lines
        with open_log(path) as fh:
            for record in read_logins(_lines(fh, progress, damage), stamps, stats):
                if (since and record.occurred_at < since) or (
                        until and record.occurred_at >= until):
                    stats.outside += 1
                    continue
                if not record.username.strip():
                    stats.empty_user += 1
                    continue
                stats.logins += 1
                stats.refused += record.outcome == "denied"
                batch.append(record)
                if len(batch) >= BATCH:
                    flush()
        if damage:
            flush()
            reason = str(damage[0]).strip() or type(damage[0]).__name__
            raise DamagedLog(path, stats.lines - lines_before, stats,
                             f"damaged or truncated ({reason})", len(paths) - stats.files)
    flush()
    return stats


def _lines(fh: BinaryIO, progress: Callable[[int], None] | None,
           damage: list[BaseException]) -> Iterator[bytes]:
    """The file's lines; a read error ends them and is put in ``damage``."""
    raw = getattr(fh, "fileobj", fh)
    last = 0
    i = 0
    while True:
        try:
            line = fh.readline()
        except (EOFError, OSError, zlib.error) as exc:    # BadGzipFile is an OSError
            damage.append(exc)
            return
        if not line:
            break
        yield line
        if progress and i % 1000 == 0:
            pos = raw.tell()
            progress(pos - last)
            last = pos
        i += 1
    if progress:
        progress(raw.tell() - last)


# --- the last_login plugin's dict-sql table ------------------------------------

_PRECISION = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_PRECISION_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds",
                    "ns": "nanoseconds"}
# Plausible login times: a stamp read with the right precision falls here.
_EARLIEST = dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc)
_LATEST_AHEAD = dt.timedelta(days=366)


class SourceError(Exception):
    """The source table cannot be read as asked; names the option to change."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{reason} ({option})")
        self.option = option
        self.reason = reason


class SourceUnreachable(Exception):
    """The plugin's database could not be reached or read."""


@dataclass
class TableImport:
    rows: int = 0
    imported: int = 0
    skipped: int = 0
    precision: str = "s"


def guess_precision(stamps: list[int], now: dt.datetime) -> str | None:
    """The precision under which every stamp is a plausible login time, if one is."""
    if not stamps:
        return None
    lo, hi = min(stamps), max(stamps)
    for name, divisor in _PRECISION.items():
        if _plausible(lo, divisor, now) and _plausible(hi, divisor, now):
            return name
    return None


def _plausible(stamp: int, divisor: int, now: dt.datetime) -> bool:
    seconds = stamp / divisor
    return _EARLIEST.timestamp() <= seconds <= (now + _LATEST_AHEAD).timestamp()


def check_source(source: sa.Engine, table: str, user_column: str, time_column: str) -> None:
    """Name an unknown table or column plainly, with what there is instead."""
    inspector = sa.inspect(source)
    tables = inspector.get_table_names()
    if table not in tables:
        shown = ", ".join(sorted(tables)[:20]) or "none"
        raise SourceError("table", f"no table {table!r} in the source database "
                                     f"(its tables: {shown})")
    columns = [c["name"] for c in inspector.get_columns(table)]
    for option, column in (("user_column", user_column), ("time_column", time_column)):
        if column not in columns:
            raise SourceError(option, f"no column {column!r} in table {table!r} "
                                      f"(its columns: {', '.join(columns)})")


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else \
        value.astimezone(dt.timezone.utc)


def import_last_login_table(source: sa.Engine, target: sa.Engine, table: str = "last_login",
                            user_column: str = "userid", time_column: str = "last_login",
                            precision: str = "auto", protocol: str = "imap",
                            now: dt.datetime | None = None) -> TableImport:
    """Fold the plugin's (user, timestamp) rows into last_logins.

    The plugin keeps neither protocol nor address nor count: rows land under
    ``protocol`` with a count of 1, and only move a last_seen forward, so a
    second run changes nothing. ``precision`` ``auto`` tells seconds from
    milliseconds, microseconds and nanoseconds by the stamps' size; a given
    precision that makes the stamps implausible is refused with the one that
    fits. Rows without a user (NULL or empty) or a time are skipped.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    src = sa.table(table, sa.column(user_column), sa.column(time_column))
    result = TableImport()
    try:
        check_source(source, table, user_column, time_column)
        with source.connect() as sconn:
            rows = sconn.execute(sa.select(src.c[user_column], src.c[time_column])).all()
    except sa.exc.DBAPIError as exc:
        first = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
        raise SourceUnreachable(first[0] if first else type(exc).__name__) from None
    usable: list[tuple[bytes, object]] = []
    for user, stamp in rows:
        result.rows += 1
        name = user.encode() if isinstance(user, str) else bytes(user) if user else b""
        if not name.strip() or stamp is None:
            result.skipped += 1
            continue
        usable.append((name, stamp))
    numbers: list[int] = []
    for _, stamp in usable:
        if isinstance(stamp, dt.datetime):
            continue
        try:
            numbers.append(int(stamp))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise SourceError("time_column", f"column {time_column!r} holds {stamp!r}, "
                                               "not a Unix time stamp") from None
    guessed = guess_precision(numbers, now)
    if precision == "auto":
        if numbers and guessed is None:
            raise SourceError("precision", "the time stamps fit no precision (s, ms, us, "
                                             f"ns): they range from {min(numbers)} to "
                                             f"{max(numbers)}")
        precision = guessed or "s"
    elif numbers and not all(_plausible(n, _PRECISION[precision], now)
                             for n in (min(numbers), max(numbers))):
        hint = (f"timestamps look like {_PRECISION_NAMES[guessed]}: use --precision "
                f"{guessed}" if guessed else "the time stamps fit no precision")
        raise SourceError("precision", hint)
    result.precision = precision
    divisor = _PRECISION[precision]
    out = []
    for name, stamp in usable:
        if isinstance(stamp, dt.datetime):
            when = _as_utc(stamp)
        else:
            when = dt.datetime.fromtimestamp(int(stamp) / divisor,  # type: ignore[call-overload]
                                             dt.timezone.utc)
        text, raw = username_text(name)
        out.append({"username": text, "username_raw": raw, "protocol": protocol,
                    "first_seen": when, "last_seen": when, "login_count": 1})
    t = last_logins
    with target.begin() as conn:
        for i in range(0, len(out), BATCH):
            ins = dialect_insert(conn, t)
            newer = ins.excluded.last_seen > t.c.last_seen
            stmt = ins.on_conflict_do_update(
                index_elements=["username", "protocol"],
                set_={"last_seen": sa.case((newer, ins.excluded.last_seen), else_=t.c.last_seen),
                      "first_seen": sa.case((ins.excluded.first_seen < t.c.first_seen,
                                             ins.excluded.first_seen), else_=t.c.first_seen)},
                where=sa.or_(newer, ins.excluded.first_seen < t.c.first_seen))
            conn.execute(stmt, out[i:i + BATCH])
    result.imported = len(out)
    return result


def source_engine(url: str, where: str = "SOURCE_URL") -> sa.Engine:
    """A read-only view of the plugin's database: SQLite, PostgreSQL or MySQL/MariaDB.

    MySQL and MariaDB go through PyMySQL (pure Python, no client library).
    An SQLite source is opened read-only and must exist. ``where`` names the
    place the URL came from; errors never quote the URL (it may hold a password).
    """
    from sqlalchemy.engine import make_url
    scheme = url.split(":", 1)[0].lower()
    rewrite = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
               "mysql": "mysql+pymysql", "mariadb": "mysql+pymysql",
               "mariadb+pymysql": "mysql+pymysql"}
    if scheme in rewrite:
        url = rewrite[scheme] + url[len(scheme):]
        scheme = rewrite[scheme]
    known = ("sqlite", "postgresql+psycopg", "mysql+pymysql")
    if scheme not in known:
        # (the value is not quoted: a file named by mistake may hold a secret)
        raise SourceError(where, "not a URL of a supported database: use sqlite:///PATH, "
                                 "postgresql://... or mysql://... (MariaDB too)")
    try:
        parsed = make_url(url)
        parsed.port     # a non-numeric port fails here
    except (ValueError, sa.exc.ArgumentError):
        raise SourceError(where, "not a database URL (value not shown: it may hold "
                                 "a password)") from None
    if scheme == "sqlite":
        path = parsed.database or ""
        if not path or path == ":memory:" or not os.path.isfile(path):
            raise SourceError(where, f"no SQLite database file at {path!r}")
        from urllib.parse import quote
        return sa.create_engine(f"sqlite:///file:{quote(os.path.abspath(path))}?mode=ro&uri=true")
    if scheme == "mysql+pymysql":
        return sa.create_engine(parsed, connect_args={"connect_timeout": 5})
    return sa.create_engine(parsed, connect_args={"connect_timeout": 5,
                                                  "application_name": "lastlogin-import"})
