"""Reading configuration rows one at a time, so one bad row spoils nothing else.

Rows may be written with plain SQL (the README allows it), so a value can be
anything the column's storage accepts. Columns whose type converts on the
way out (times; networks on SQLite) are selected without that conversion and
converted per row; a row that fails is skipped and reported, never fatal.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from ..errors import InvalidInput
from .types import UTCDateTime

Skipped = list[tuple[str, int, str]]        # (table, row id, reason)

_TIME = UTCDateTime()


# The checks name what is wrong by its column; a few by what it is.
COLUMN_OF = {"alert": "message", "everyone": "(no match)"}


def why(exc: Exception, table: str) -> str:
    """The reason a row is skipped, naming the column."""
    if isinstance(exc, InvalidInput):
        column = COLUMN_OF.get(exc.field, exc.field)
        if table != "access_rules" and exc.field in ("user", "username", "domain"):
            column = "scope_value"
        return f"{column}: {exc.reason}"
    return str(exc)


def skip(skipped: Skipped, table: str, row_id: int, reason: str | Exception) -> None:
    """Note a row the loader cannot use (the refresher logs each one once)."""
    skipped.append((table, row_id,
                    why(reason, table) if isinstance(reason, Exception) else reason))


def raw_columns(table: sa.Table, names: tuple[str, ...]) -> list[Any]:
    """The table's columns, those in ``names`` without result processing."""
    return [sa.type_coerce(table.c[n], sa.String()).label(n) if n in names else table.c[n]
            for n in table.c.keys()]


def when(value: Any, dialect: sa.Dialect) -> dt.datetime | None:
    """A time column's value as the column type reads it (ValueError if it cannot)."""
    if value is not None and not isinstance(value, (str, dt.datetime)):
        raise ValueError(f"not a time: {value!r}")
    try:
        return _TIME.process_result_value(value, dialect)
    except ValueError:
        raise ValueError(f"not a time: {value!r}") from None


def strict_bool(field: str, value: object) -> bool:
    """A boolean column as written with SQL: 0/1 (or true/false) only.

    SQLite stores any text in a BOOLEAN column and reads 'true' as 0: a row
    written enabled='true' would be silently off. It is refused instead.
    """
    if value in (True, False, 0, 1):
        return bool(value)
    raise InvalidInput(field, f"not a boolean (0 or 1): {value!r}")
