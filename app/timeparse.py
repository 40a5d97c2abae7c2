"""Times and durations as operators type them."""

from __future__ import annotations

import datetime as dt
import re

from .errors import InvalidInput

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, field: str) -> dt.datetime:
    """ISO 8601 (``2026-12-01``, ``2026-12-01T08:00``, ``...+01:00``) or ``now``.

    A time without a zone is the operator's local time.
    """
    if text.strip().lower() == "now":
        return dt.datetime.now(dt.timezone.utc)
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(field, f"not a date/time like 2026-12-01T08:00: {text!r}") from None
    if value.tzinfo is None:
        value = value.astimezone()          # local zone
    return value.astimezone(dt.timezone.utc)


def parse_duration(text: str, field: str) -> dt.timedelta:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    m = _DURATION.match(text)
    if not m or int(m.group(1)) == 0:
        raise InvalidInput(field, f"not a duration like 30m, 12h or 7d: {text!r}")
    return dt.timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
