"""Retention: old login history goes; last_logins and login_places stay.

They are summaries, not history: a user's last login per protocol, and the
countries and AS numbers the user ever logged in from (so a place does not
become "new" again because the logins that showed it were pruned).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable

import sqlalchemy as sa

from .partitions import drop_months_before, ensure_partitions, months_from
from .schema import login_events


@dataclass
class PruneResult:
    partitions: list[str] = field(default_factory=list)
    rows_dropped: int = 0       # with whole partitions
    rows_deleted: int = 0       # one batch at a time


def rows_older_than(conn: sa.Connection, cutoff: dt.datetime) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(login_events)
                        .where(login_events.c.occurred_at < cutoff)).scalar_one()


@dataclass
class Affected:
    """What a prune at ``cutoff`` would remove (for --dry-run and the confirmation)."""

    rows: int
    oldest: dt.datetime | None
    newest: dt.datetime | None


def affected(conn: sa.Connection, cutoff: dt.datetime) -> Affected:
    e = login_events
    count, oldest, newest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(e.c.occurred_at), sa.func.max(e.c.occurred_at))
        .where(e.c.occurred_at < cutoff)).one()
    return Affected(count, oldest, newest)


def prune(engine: sa.Engine, cutoff: dt.datetime, batch: int = 10_000,
          progress: Callable[[int], None] | None = None,
          on_total: Callable[[int], None] | None = None) -> PruneResult:
    """Remove login_events older than ``cutoff`` in bounded transactions.

    Whole months go as partitions (PostgreSQL); what is left is deleted in
    batches of ``batch`` rows, each its own short transaction, so logins
    keep committing in between.
    """
    result = PruneResult()
    with engine.begin() as conn:
        result.partitions, result.rows_dropped = drop_months_before(conn, cutoff)
    with engine.connect() as conn:
        total = rows_older_than(conn, cutoff)
    if on_total:
        on_total(total)
    t = login_events
    while True:
        with engine.begin() as conn:
            keys = (sa.select(t.c.event_id, t.c.occurred_at)
                    .where(t.c.occurred_at < cutoff).limit(batch))
            n = conn.execute(t.delete().where(
                sa.tuple_(t.c.event_id, t.c.occurred_at).in_(keys))).rowcount
        result.rows_deleted += n
        if progress and n:
            progress(n)
        if n < batch:
            return result


def maintain(engine: sa.Engine, now: dt.datetime, retention_days: int) -> PruneResult | None:
    """The daemon's daily job: partitions ahead, and retention if set."""
    with engine.begin() as conn:
        ensure_partitions(conn, months_from(now, 4))
    if retention_days <= 0:
        return None
    return prune(engine, now - dt.timedelta(days=retention_days))
