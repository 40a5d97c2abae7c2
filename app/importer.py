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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

import sqlalchemy as sa

from .db.engine import dialect_insert
from .db.schema import last_logins
from .db.store import record_logins
from .login import LoginRecord, normalize_ip, text_form

NAMESPACE = uuid.UUID("6f0f7c52-3f43-4c55-9a4e-8a3c1e0b5d21")
PENDING = 5000          # logins kept open for a later "denied" line
BATCH = 1000
MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

_SYSLOG = re.compile(rb"^(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) "
                     rb"(?P<time>\d\d:\d\d:\d\d)(?:\.(?P<frac>\d+))? ")
_ISO = re.compile(rb"^(?P<iso>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?"
                  rb"(?:Z|[+-]\d\d:?\d\d)?) ")
_LOGIN = re.compile(rb"(?P<proto>imap|pop3|submission|managesieve)-login: (?:Info: )?"
                    rb"(?:Login|Logged in): user=<(?P<user>.*)>, method=(?P<method>[^,]*), "
                    rb"rip=(?P<rip>[^,]*), lip=(?P<lip>[^,]*)(?P<rest>.*)$")
# The mail process's errors that end a login at the post-login step.
_FAILURES = (b"Post-login script denied access to user ", b"net_connect_unix(",
             b"Timeout waiting for post-login script", b"fd_read(")
_DENIED = re.compile(rb"(?P<proto>imap|pop3|submission|managesieve)\((?P<user>.*?)\)"
                     rb"(?:<(?P<pid>\d+)>)?(?:<(?P<session>[^>]*)>)?: Error: "
                     rb"(?:" + b"|".join(re.escape(f) for f in _FAILURES) + rb")")
_SUFFIX_SESSION = re.compile(rb"\bsession=<?([A-Za-z0-9+/]+)")
_MPID = re.compile(rb"mpid=(\d+)")
_SESSION = re.compile(rb"session=<([^>]*)>")


@dataclass
class ImportStats:
    files: int = 0
    lines: int = 0
    logins: int = 0
    refused: int = 0
    new: int = 0
    unparsable: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def already(self) -> int:
        return self.logins - self.new

    def bad(self, line: bytes) -> None:
        self.unparsable += 1
        if len(self.examples) < 3:
            self.examples.append(line[:200].decode("utf-8", "backslashreplace"))



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
    m = _LOGIN.search(body)
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
    """
    pending: OrderedDict[str, LoginRecord] = OrderedDict()
    failed: OrderedDict[str, bytes] = OrderedDict()     # key -> the failure line
    for line in lines:
        stats.lines += 1
        line = line.rstrip(b"\r\n")
        is_login = b"Login: user=<" in line or b"Logged in: user=<" in line   # 2.3, 2.4
        is_denied = b": Error: " in line and any(f in line for f in _FAILURES)
        if not (is_login or is_denied):
            continue
        parsed = stamps.parse(line)
        if parsed is None:
            stats.bad(line)
            continue
        stamp, offset = parsed
        if is_denied:
            m = _DENIED.search(line, offset)
            if m is None:
                stats.bad(line)
                continue
            keys = _denied_key(m, line)
            key = next((k for k in keys if k in pending), None)
            if key is None:
                failed[keys[0]] = line
                while len(failed) > PENDING:
                    stats.bad(failed.popitem(last=False)[1])
                continue
            pending[key] = dataclasses.replace(pending[key], outcome="denied")
            continue
        found = parse_login(stamp, line[offset:])
        if found is None:
            stats.bad(line)
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


def import_logs(engine: sa.Engine, paths: list[str], zone: dt.tzinfo | None = None,
                year: int | None = None, progress: Callable[[int], None] | None = None
                ) -> ImportStats:
    stats = ImportStats()
    batch: list[LoginRecord] = []

    def flush() -> None:
        if batch:
            with engine.begin() as conn:
                stats.new += record_logins(conn, batch)
            batch.clear()

    for path in paths:
        stats.files += 1
        mtime = dt.datetime.fromtimestamp(os.path.getmtime(path)).astimezone()
        stamps = StampParser(mtime, zone, year)
        with open_log(path) as fh:
            for record in read_logins(_lines(fh, progress), stamps, stats):
                stats.logins += 1
                stats.refused += record.outcome == "denied"
                batch.append(record)
                if len(batch) >= BATCH:
                    flush()
    flush()
    return stats


def _lines(fh: BinaryIO, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    raw = getattr(fh, "fileobj", fh)
    last = 0
    for i, line in enumerate(fh):
        yield line
        if progress and i % 1000 == 0:
            pos = raw.tell()
            progress(pos - last)
            last = pos
    if progress:
        progress(raw.tell() - last)


# --- the last_login plugin's dict-sql table ------------------------------------

_PRECISION = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass
class TableImport:
    rows: int = 0
    imported: int = 0
    skipped: int = 0


def import_last_login_table(source: sa.Engine, target: sa.Engine, table: str = "last_login",
                            user_column: str = "userid", time_column: str = "last_login",
                            precision: str = "s", protocol: str = "imap") -> TableImport:
    """Fold the plugin's (user, timestamp) rows into last_logins.

    The plugin keeps neither protocol nor address nor count: rows land under
    ``protocol`` with a count of 1, and only move a last_seen forward, so a
    second run changes nothing.
    """
    divisor = _PRECISION[precision]
    src = sa.table(table, sa.column(user_column), sa.column(time_column))
    result = TableImport()
    with source.connect() as sconn:
        rows = sconn.execute(sa.select(src.c[user_column], src.c[time_column])).all()
    out = []
    for user, stamp in rows:
        result.rows += 1
        if user is None or stamp is None:
            result.skipped += 1
            continue
        name, raw = text_form(user.encode() if isinstance(user, str) else bytes(user))
        when = dt.datetime.fromtimestamp(int(stamp) / divisor, dt.timezone.utc)
        out.append({"username": name, "username_raw": raw, "protocol": protocol,
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


