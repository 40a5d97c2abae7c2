"""Monthly partitions of login_events on PostgreSQL (nothing to do on SQLite)."""

from __future__ import annotations

import datetime as dt
import re

import sqlalchemy as sa

_NAME = re.compile(r"^login_events_p(\d{4})(\d{2})$")


def month_start(y: int, m: int) -> dt.datetime:
    return dt.datetime(y, m, 1, tzinfo=dt.timezone.utc)


def next_month(y: int, m: int) -> tuple[int, int]:
    return (y + 1, 1) if m == 12 else (y, m + 1)


def months_from(start: dt.datetime, count: int) -> list[tuple[int, int]]:
    y, m = start.year, start.month
    out = []
    for _ in range(count):
        out.append((y, m))
        y, m = next_month(y, m)
    return out


def partition_name(y: int, m: int) -> str:
    return f"login_events_p{y:04d}{m:02d}"


def existing_months(conn: sa.Connection) -> set[tuple[int, int]]:
    rows = conn.execute(sa.text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'login_events'")).scalars()
    return {(int(m.group(1)), int(m.group(2))) for m in map(_NAME.match, rows) if m}


def ensure_partitions(conn: sa.Connection, months: list[tuple[int, int]]) -> list[str]:
    """Create the monthly partitions that are missing; return their names.

    Rows that already went to the DEFAULT partition for such a month are
    moved into the new partition before it is attached.
    """
    if conn.dialect.name != "postgresql":
        return []
    have = existing_months(conn)
    made = []
    for y, m in sorted(set(months) - have):
        name = partition_name(y, m)
        lo, hi = month_start(y, m), month_start(*next_month(y, m))
        conn.execute(sa.text(f"CREATE TABLE {name} (LIKE login_events "
                             "INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
        conn.execute(sa.text(
            f"WITH moved AS (DELETE FROM login_events_pdefault "
            f"WHERE occurred_at >= :lo AND occurred_at < :hi RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved"), {"lo": lo, "hi": hi})
        conn.execute(sa.text(f"ALTER TABLE login_events ATTACH PARTITION {name} "
                             f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"))
        made.append(name)
    return made


def drop_months_before(conn: sa.Connection, cutoff: dt.datetime) -> tuple[list[str], int]:
    """Drop every monthly partition that ends on or before ``cutoff``.

    Returns the names dropped and how many rows went with them.
    """
    if conn.dialect.name != "postgresql":
        return [], 0
    dropped, rows = [], 0
    for y, m in sorted(existing_months(conn)):
        if month_start(*next_month(y, m)) <= cutoff:
            name = partition_name(y, m)
            rows += conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one()
            conn.execute(sa.text(f"ALTER TABLE login_events DETACH PARTITION {name}"))
            conn.execute(sa.text(f"DROP TABLE {name}"))
            dropped.append(name)
    return dropped, rows
