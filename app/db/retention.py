"""Retention: old login history goes; last_logins stays (it is not history).

login_places is derived from the history (the places each user logged in
from, each at its earliest stored login), so it follows it: after a prune a
place keeps only what is still stored -- its earliest login left, or it goes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable

import sqlalchemy as sa

from .partitions import drop_months_before, ensure_partitions, months_from
from .schema import login_events, login_places


@dataclass
class PruneResult:
    partitions: list[str] = field(default_factory=list)
    rows_dropped: int = 0       # with whole partitions
    rows_deleted: int = 0       # one batch at a time
    places_forgotten: int = 0   # login_places rows whose every login went
    places_moved: int = 0       # ... whose earliest login went, not the others


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
            break
    result.places_forgotten, result.places_moved = follow_places(engine, cutoff)
    return result


def follow_places(engine: sa.Engine, cutoff: dt.datetime, batch: int = 500) -> tuple[int, int]:
    """Make login_places agree with the history again after a prune at
    ``cutoff``: a place first seen before it gets its earliest allowed login
    still stored, or goes. (forgotten, moved).

    In key order, a batch per short transaction. On PostgreSQL each batch
    first takes a lock that waits for the writers' statements in flight and
    holds new ones back until it commits (SHARE ROW EXCLUSIVE: each writer's
    statement takes ROW EXCLUSIVE on the table, even when it adds no row).
    Without it, a writer that found a place stored, and so left it alone,
    could commit a login from it just after this transaction's snapshot
    and lose its place to the delete below.
    """
    p, e = login_places, login_events
    key = sa.tuple_(p.c.username, p.c.kind, p.c.place)
    matches = {"country": e.c.country == p.c.place,
               "asn": sa.cast(e.c.asn, sa.Text) == p.c.place}
    forgotten = moved = 0
    after = None
    while True:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("LOCK TABLE login_places IN SHARE ROW EXCLUSIVE MODE"))
            q = sa.select(p.c.username, p.c.kind, p.c.place).where(p.c.first_seen < cutoff)
            if after is not None:
                q = q.where(key > sa.tuple_(*after))
            keys = [tuple(k) for k in conn.execute(
                q.order_by(p.c.username, p.c.kind, p.c.place).limit(batch))]
            if not keys:
                return forgotten, moved
            for kind, match in matches.items():
                stored = sa.select(e.c.occurred_at).where(
                    e.c.username == p.c.username, e.c.outcome == "allowed", match)
                mine = (key.in_(keys), p.c.kind == kind)
                forgotten += conn.execute(p.delete().where(
                    *mine, ~stored.exists())).rowcount
                moved += conn.execute(p.update().where(*mine).values(
                    first_seen=stored.with_only_columns(sa.func.min(e.c.occurred_at))
                    .scalar_subquery())).rowcount
            after = keys[-1]


def maintain(engine: sa.Engine, now: dt.datetime, retention_days: int) -> PruneResult | None:
    """The daemon's daily job: partitions ahead, and retention if set."""
    with engine.begin() as conn:
        ensure_partitions(conn, months_from(now, 4))
    if retention_days <= 0:
        return None
    return prune(engine, now - dt.timedelta(days=retention_days))
