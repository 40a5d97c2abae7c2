"""Times and durations as operators type them, and times as they read them.

The one time rule of the CLI: a time typed without a zone is local time
(UTC with ``--utc``), a time with an explicit offset (``+01:00``, ``Z``) is
honoured as written, and times are shown in the local zone (UTC with
``--utc``). Durations name their unit without ambiguity: ``m`` could be
minutes or months, so it is refused; ``min`` and ``mo`` say which.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import InvalidInput

_DURATION = re.compile(r"^\s*(\d+)\s*(s|sec|min|h|d|w|mo|y|m)\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "sec": "seconds", "min": "minutes", "h": "hours", "d": "days",
          "w": "weeks"}
DURATION_HELP = "30s, 10min, 12h, 7d, 2w, 6mo, 1y"


@dataclass(frozen=True)
class Duration:
    """A span an operator typed; months and years are calendar months and years.

    ``moment - duration`` and ``moment + duration`` work on datetimes.
    """

    amount: int
    unit: str           # seconds, minutes, hours, days, weeks, months, years
    text: str = ""

    def shift(self, moment: dt.datetime, sign: int) -> dt.datetime:
        try:
            if self.unit in ("months", "years"):
                months = self.amount * (12 if self.unit == "years" else 1) * sign
                return _add_months(moment, months)
            return moment + sign * dt.timedelta(**{self.unit: self.amount})
        except (OverflowError, ValueError):
            raise InvalidInput(self.text or "duration",
                               f"too long a duration: {self.text!r}") from None

    def __radd__(self, moment: Any) -> dt.datetime:
        if not isinstance(moment, dt.datetime):
            return NotImplemented
        return self.shift(moment, 1)

    def __rsub__(self, moment: Any) -> dt.datetime:
        if not isinstance(moment, dt.datetime):
            return NotImplemented
        return self.shift(moment, -1)


def _add_months(moment: dt.datetime, months: int) -> dt.datetime:
    index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(index, 12)
    if not 1 <= year <= 9999:
        raise OverflowError("year out of range")
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def zone(utc: bool) -> dt.tzinfo:
    """The zone times are typed and shown in: local, or UTC with --utc."""
    if utc:
        return dt.timezone.utc
    tz = dt.datetime.now().astimezone().tzinfo
    assert tz is not None
    return tz


def parse_time(text: str, field: str, utc: bool = False) -> dt.datetime:
    """ISO 8601 (``2026-12-01``, ``2026-12-01T08:00``, ``...+01:00``, ``...Z``) or ``now``.

    A time without a zone is local time (UTC with ``utc``); an explicit
    offset is honoured. The result is in UTC.
    """
    stripped = text.strip()
    if stripped.lower() == "now":
        return dt.datetime.now(dt.timezone.utc)
    iso = stripped[:-1] + "+00:00" if stripped[-1:] in ("Z", "z") else stripped
    try:
        value = dt.datetime.fromisoformat(iso)
    except ValueError:
        raise InvalidInput(field, f"not a date/time like 2026-12-01T08:00 or "
                                  f"2026-12-01T08:00+01:00: {text!r}") from None
    try:
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc) if utc else value.astimezone()
        return value.astimezone(dt.timezone.utc)
    except (OverflowError, ValueError):     # year 1 in a zone east of UTC, and the like
        raise InvalidInput(field, f"out of range: {text!r}") from None


def parse_duration(text: str, field: str) -> Duration:
    """``90s``, ``30min``, ``12h``, ``7d``, ``2w``, ``6mo``, ``1y``; ``1m`` is refused."""
    m = _DURATION.match(text)
    if m and m.group(2).lower() == "m":
        raise InvalidInput(field, f"{text.strip()!r} is ambiguous: write "
                                  f"{m.group(1)}min for minutes or {m.group(1)}mo for months")
    if not m or int(m.group(1)) == 0:
        raise InvalidInput(field, f"not a duration like {DURATION_HELP}: {text!r}")
    unit = m.group(2).lower()
    name = {"mo": "months", "y": "years"}.get(unit) or _UNITS[unit]
    duration = Duration(int(m.group(1)), name, text.strip())
    # Check the range once here, so every later use is safe.
    duration.shift(dt.datetime.now(dt.timezone.utc), -1)
    duration.shift(dt.datetime.now(dt.timezone.utc), 1)
    return duration


def parse_since(text: str, field: str, now: dt.datetime, utc: bool = False) -> dt.datetime:
    """A DURATION ago, or a TIME (one rule for every --since/--until)."""
    if _DURATION.match(text):
        return now - parse_duration(text, field)
    return parse_time(text, field, utc)


def localize(rows: Iterable[dict[str, Any]], utc: bool) -> None:
    """Show the datetimes of ``rows`` in the local zone (UTC with ``utc``), in place."""
    tz = zone(utc)
    for row in rows:
        for key, value in row.items():
            if isinstance(value, dt.datetime):
                if value.tzinfo is None:
                    value = value.replace(tzinfo=dt.timezone.utc)
                row[key] = value.astimezone(tz)
